"""One run function per command: each takes a validated config and does the work (the CLI only parses)."""
