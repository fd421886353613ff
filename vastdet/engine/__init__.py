"""Training and evaluation on DeepSpeed: one entry point for every launcher."""
