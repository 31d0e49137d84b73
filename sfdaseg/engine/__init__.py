"""Training engine: the one training loop, its hooks, distributed helpers and run folders."""
