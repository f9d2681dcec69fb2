"""Compiled without a device: Helios' programs planned for an H100 on a CPU (memory, kernels, collectives, roofline)."""
