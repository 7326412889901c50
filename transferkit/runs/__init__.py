"""A run directory: its records (records.py), its files and lock (directory.py), and its
training checkpoints (checkpoints.py)."""
