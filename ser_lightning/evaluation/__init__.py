"""What scores a model: metrics, calibration, and the linear baselines fitted on the same split."""
