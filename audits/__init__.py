"""Fairness metrics, disparities and reports over score tables."""
