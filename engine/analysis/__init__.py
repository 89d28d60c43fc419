"""What is computed from a run database: pruning by importance."""
