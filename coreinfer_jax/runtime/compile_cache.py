"""A persistent cache of XLA's compiled programs, shared by the runs of the commands.

Every process traces and lowers its programs again, but with a cache directory JAX keeps what
XLA compiled and reads it back in the next process that builds the same program (the same
HLO, compiler flags, devices and jaxlib). On this 2-core CPU a second `generate` on SmolLM2
compiled in 2.4 s instead of 7.8 s dense, and in 6.9 s instead of 14.2 s with the hybrid.

The commands that run a model use `$COREINFER_HOME/xla_cache` (bounded, least recently used
programs dropped first); `COREINFER_COMPILE_CACHE` names another directory, or `off`. `bench`
measures compile times, so it never reads the cache. A cache directory JAX was given
(`JAX_COMPILATION_CACHE_DIR`, `jax.config`) is kept as it is. In Python, call
`use_compile_cache()` before the first generation.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

import jax

from coreinfer_jax.models.checkpoint import DEFAULT_CHECKPOINT

ENV = "COREINFER_COMPILE_CACHE"
MAX_BYTES = 2 << 30  # a few hundred programs of an 8B model; SmolLM2's are ~0.2 MB each
_HIT = "/jax/compilation_cache/cache_hits"
_hits = threading.local()  # .count: this thread's programs read from the cache since the import


def _on_event(name: str, **_: Any) -> None:
    if name == _HIT:
        _hits.count = getattr(_hits, "count", 0) + 1


jax.monitoring.register_event_listener(_on_event)


def use_compile_cache(directory: str | Path | None = None) -> Path | None:
    """Keep compiled programs in `directory` (default: `COREINFER_COMPILE_CACHE`, else
    `$COREINFER_HOME/xla_cache`) and return the directory in use: JAX's own when it has one
    already, None when the setting is `off` or the directory cannot be written (one warning;
    JAX would otherwise warn at every program)."""
    given = jax.config.values["jax_compilation_cache_dir"]
    if given:
        return Path(given)
    setting = str(directory or os.environ.get(ENV) or DEFAULT_CHECKPOINT.parent / "xla_cache")
    if setting.lower() == "off":
        return None
    try:
        Path(setting).mkdir(parents=True, exist_ok=True)
        writable = os.access(setting, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        warnings.warn(f"no compile cache: cannot write to {setting}; set {ENV} to a writable directory, or to off",
                      stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", setting)
    if jax.config.values["jax_compilation_cache_max_size"] == -1:  # JAX's default: unbounded
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return Path(setting)


def cache_hits() -> int:
    """Programs this thread has read from the cache so far (subtract two readings)."""
    return getattr(_hits, "count", 0)
