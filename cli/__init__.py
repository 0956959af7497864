"""eda command-line programs: one module per program plus shared plumbing."""
