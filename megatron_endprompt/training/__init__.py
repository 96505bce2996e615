"""Training: device setup, batches, loss, loop, checkpoints, logging."""
