"""Training: the unfreezing schedule, the loop, the Ray Train worker and driver, export,
evaluation, Ray Tune and experiment tracking (MLflow)."""
