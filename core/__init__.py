"""Methods, networks, losses, synthetic anomalies and metrics: single-device PyTorch, no I/O."""
