"""Training: one loop (core.py), data (data.py), one file a stage (stages/)."""
