"""Training objectives. Each returns a loss from ``training_step`` and never steps an optimizer."""
