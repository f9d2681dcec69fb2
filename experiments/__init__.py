"""The project's measurements, by purpose; each script runs as ``python -m experiments.<sub>.<name>`` from the
checkout's root and prints what ran, its table, and appends a section to experiments/RESULTS.md.

- ``benchmarks``: timed on a device (a GPU; ``--tiny`` on a CPU), JAX against the PyTorch reference;
- ``plans``: programs compiled for an H100 without one (deviceless AOT on a CPU), their memory, kernels and roofline;
- ``studies``: one question each, answered on a CPU (compile times, conversion memory).

The modules here are what they share: the workload (``workloads``), FLOP counts (``flop_counts``), the DiT's
inputs (``model_inputs``), the run's provenance (``provenance``), tables and files (``reporting``), timing
(``timing``), paths (``paths``), child processes (``processes``) and the tiny training setup (``tiny_training``).
Importing any of them changes nothing: no environment variable, no jax config, no file.
"""
