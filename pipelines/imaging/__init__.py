"""Medical images to model-ready volumes: DICOM and NIfTI reading, selection, preprocessing."""
