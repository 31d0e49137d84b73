"""Training engine: the training loop, checkpoints, distributed helpers and run folders."""
