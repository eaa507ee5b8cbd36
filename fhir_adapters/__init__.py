"""Edge to the EHR: FHIR R4 in and out, HL7 v2 to FHIR, and the PatientRecord view."""
