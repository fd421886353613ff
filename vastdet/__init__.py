"""vastdet package."""
