"""Data: sources of examples and the batching path to device-shaped numpy batches."""
