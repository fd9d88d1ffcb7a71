"""Training: the pure train step, the loop, optimizer, checkpoints, metrics, evaluation."""
