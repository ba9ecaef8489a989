"""Expert extraction from a dense model: calibration statistics -> masks -> materialised experts."""
