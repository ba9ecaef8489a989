"""Joining the processes of a multi-host job (``jax.distributed.initialize``), from the environment.

    initialize()          # no-op for a one-process run; call before any other JAX call

A process is part of a multi-host job when it is told so:
  READMEJAX_DISTRIBUTED=1            TPU VMs / SLURM / other clusters JAX detects itself (launch/tpu_vm.sh,
                                     launch/slurm.sh): ``jax.distributed.initialize()`` without arguments;
  JAX_COORDINATOR_ADDRESS=host:port  with JAX_NUM_PROCESSES and JAX_PROCESS_ID (e.g. two CPU processes on
                                     127.0.0.1 in the tests; any cluster without auto-detection).
On CPU the processes exchange collectives through gloo. After it: every process sees the global device
list; ``make_mesh`` spans all of them; batches are placed from each process's rows
(``parallel.mesh.shard_batch``); metrics, records and the run-folder lock are process 0's; orbax
checkpoints are written by every process for its shards and finalised together.
"""

from __future__ import annotations

import os

import jax


def multiprocess_env() -> dict | None:
    """The arguments of ``jax.distributed.initialize`` this process's environment asks for, or None."""
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not os.environ.get(k)]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS={addr} is set but {', '.join(missing)} is not "
                             "(expected the number of processes and this process's id, 0-based)")
        try:
            n, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except ValueError:
            raise ValueError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got "
                             f"{os.environ['JAX_NUM_PROCESSES']!r} and {os.environ['JAX_PROCESS_ID']!r}") from None
        if not 0 <= pid < n:
            raise ValueError(f"JAX_PROCESS_ID={pid} is outside [0, JAX_NUM_PROCESSES={n})")
        return {"coordinator_address": addr, "num_processes": n, "process_id": pid}
    if os.environ.get("READMEJAX_DISTRIBUTED") == "1":
        return {}
    return None


def initialize() -> bool:
    """Join the job the environment describes (see the module docstring); False for a one-process run."""
    args = multiprocess_env()
    if args is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")     # the CPU client's; others ignore it
    jax.distributed.initialize(**args)
    return True
