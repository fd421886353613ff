"""Detection models and their building blocks."""
