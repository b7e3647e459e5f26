"""Several hosts (or processes) driving one mesh: `jax.distributed`, wired for the CLI.

Every process runs the same command with its own `--process-id`; JAX then sees the devices
of all of them (`jax.devices()`), a `--mesh` spans them, each process restores and holds only
its devices' shards, and every compiled program runs on all processes at once (SPMD). Only
process 0 prints results and writes output files (`is_main_process`). On CPU the processes
exchange tensors through Gloo.

    python -m coreinfer_jax generate --mesh 1x8 --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0 ...
"""

from __future__ import annotations

import jax

from coreinfer_jax.errors import CoreInferError


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join the `num_processes`-process job whose process 0 listens at `coordinator` (HOST:PORT);
    call before anything touches a device."""
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise CoreInferError(f"--process-id must be in 0..{num_processes - 1} for --num-processes {num_processes}, "
                             f"got {process_id}")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise CoreInferError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    # Cross-process collectives on CPU need an implementation; GPUs and TPUs bring their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def is_main_process() -> bool:
    """Whether this process reports results (process 0; the only one without jax.distributed)."""
    return jax.process_index() == 0
