"""Data: which images and labels (sources, digests, downloads), and how they become batches (pipeline)."""
