"""Data to tensors and jobs: imaging, EHR features, notes, the synthetic cohort."""
