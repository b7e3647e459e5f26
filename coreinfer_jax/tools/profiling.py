"""`jax.profiler` traces of generation, readable by TensorBoard's profile plugin or XProf."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import jax


@contextlib.contextmanager
def maybe_profile(directory: Path | None) -> Iterator[None]:
    """Trace the enclosed work into `directory` when it is set; do nothing otherwise."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(directory)):
        yield
    print(f"profile written to {directory} (view: tensorboard --logdir {directory}, or xprof)", file=sys.stderr)
