"""Training: datasets, the epoch loop, checkpoints."""
