"""Torch encoders, the fusion model, calibration, artifacts and explainers."""
