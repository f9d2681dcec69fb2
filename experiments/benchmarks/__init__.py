"""Timed on a device: JAX against the PyTorch reference, and the orchestrators of a GPU session (run_all, headline)."""
