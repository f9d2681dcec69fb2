"""Several processes (one per host, or one per GPU) as one JAX program: ``jax.distributed.initialize``.

Every process runs the same command; the coordinator's address, the process count and this process's
index come from flags, else from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``,
else from the cluster JAX detects itself (SLURM, Open MPI, Kubernetes). After it, ``jax.devices()`` lists
every process's devices, so ``make_mesh`` spans all hosts.
"""

from __future__ import annotations

import os

import jax

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the multi-process run (a no-op for a single process with nothing configured).

    On CPU-only processes the cross-process collectives are gloo's (XLA's CPU backend has no other)."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    for name, var in ENV.items():
        if given[name] is None and os.environ.get(var):
            given[name] = os.environ[var] if name == "coordinator_address" else int(os.environ[var])
    configured = any(v is not None for v in given.values())
    if not configured and not os.environ.get("SLURM_JOB_ID") and not os.environ.get("OMPI_COMM_WORLD_SIZE"):
        return
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
