"""Pieces of the training system that train.py assembles: optimizer, checkpoints, reporting."""
