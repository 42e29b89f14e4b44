"""A run on disk: its directory, its records, and a finished run read back."""
