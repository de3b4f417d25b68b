"""The DeepSpeed training loop, rank/launch helpers, checkpointing, metric logging, evaluation runner."""
