"""Fitting to calibration data: similarity-guided clusters (k-means) and per-layer neuron budgets."""
