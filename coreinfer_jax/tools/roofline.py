"""What bounds decode speed: bytes read per generated token, and the machine's bandwidth."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import Params
from coreinfer_jax.runtime.batching import cache_windows, prompt_bucket
from coreinfer_jax.sparse.gather import NEURON_ROWS
from coreinfer_jax.sparse.method import Method


def bytes_per_token(cfg: ModelConfig, params: Params, method: Method, kv_slots: float) -> int:
    """Bytes one decode step reads: every weight it touches, plus `kv_slots` slots of the KV cache.

    The token embedding contributes one row unless it is also the (tied) LM head, which
    reads all of it; sparse layers read only their kept neurons (`n_keep`, or the layer's
    count of a per-layer budget) of their `F` FFN neurons. Attention reads every slot of the
    cache it is given, live or not: `kv_slots` is that cache length (`decode_kv_slots`).
    """
    itemsize = jnp.dtype(params["embed"].dtype).itemsize
    total = ffn_bytes_per_token(cfg, params, method)
    for layer in params["layers"]:
        for group, tensors in layer.items():
            if group != "ffn":
                total += sum(w.size for w in tensors.values()) * itemsize
    embed_row = cfg.embed_dim * itemsize
    head = params["embed"].size * itemsize if cfg.tie_word_embeddings else params["lm_head"].size * itemsize + embed_row
    total += head
    for name in ("final_norm", "project_in", "project_out"):
        if name in params:
            total += sum(x.size for x in jax.tree.leaves(params[name])) * itemsize
    if "pos_embed" in params:
        total += cfg.hidden_size * itemsize
    kv = 2 * cfg.num_layers * kv_slots * cfg.num_kv_heads * cfg.head_dim * itemsize
    return round(total + kv)


def decode_kv_slots(prompt_tokens: int, new_tokens: int, context: int) -> float:
    """Cache slots a decode step reads, averaged over the `new_tokens - 1` steps of one
    prompt's generation: the step at position p runs on the first of `cache_windows` longer than p."""
    if new_tokens < 2:
        raise CoreInferError(f"a generation of {new_tokens} token(s) runs no decode step")
    windows = cache_windows(prompt_bucket(prompt_tokens, context), prompt_tokens, new_tokens)
    positions = range(prompt_tokens, prompt_tokens + new_tokens - 1)
    return float(np.mean([next(w for w in windows if w > p) for p in positions]))


def ffn_bytes_per_token(cfg: ModelConfig, params: Params, method: Method) -> int:
    """Bytes of FFN weights one decode step reads (every layer; sparse ones only their kept neurons)."""
    return sum(method.ffn_bytes(params))


def padding_bytes(params: Params, method: Method) -> int:
    """Of `ffn_bytes_per_token`, the zero rows this project's gather adds to each sparse layer
    (`Method.read_rows` over `layer_neurons`: the GPU's product tile), which a decoding of the
    same neurons without that layout does not read."""
    first = params["layers"][0]["ffn"]
    F = first["w_up"].shape[0]
    row = sum(w.nbytes // F for name, w in first.items() if name in NEURON_ROWS)  # one neuron's weights
    return row * (sum(method.read_rows(F)) - sum(method.layer_neurons(F)))


# A probe reads a buffer of at least 8x the largest cache between it and memory, so that at most
# an eighth of a read could be served from cache; never under 1 GiB, 17x an H200's 60 MB L2 (the
# 2026-12-04 H200 run's 512 MiB probe, timed one call at a time, read 0.7 TB/s, a third of what
# dense decoding itself reached). A CPU's last-level cache can be far larger than a GPU's L2: one
# kind of this project's 2-core machines lists 300 MiB of L3, which takes a 2.3 GiB probe (there
# 1, 2.5 and 4 GiB all read 23-25 GB/s, so little of that L3 is the machine's own, but the rule
# holds wherever the probe runs).
PROBE_BYTES = 1 << 30
CACHE_MULTIPLE = 8
CPU_CACHES = Path("/sys/devices/system/cpu")
PROBE_COLUMNS = 1024
# A sample repeats the reads until it lasts about this long: one read of 1 GiB takes 0.2 ms on
# an H200, where a single timed call would mostly measure dispatch and synchronisation.
PROBE_SAMPLE_S = 0.02
PROBE_MAX_CALLS = 64


def largest_cpu_cache(root: Path | None = None) -> int:
    """Bytes of the largest CPU cache Linux lists under `root` (default `CPU_CACHES`; each
    `cpu*/cache/index*/size` reads like "32768K"); 0 where it lists none."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = [f.read_text().strip() for f in (root or CPU_CACHES).glob("cpu*/cache/index*/size")]
    return max((int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s) for s in sizes), default=0)


def probe_bytes(platform: str | None = None) -> int:
    """The default probe's buffer for `platform` (default: JAX's default backend's):
    `CACHE_MULTIPLE` x the CPU's largest cache on a CPU, and never under `PROBE_BYTES`."""
    cache = largest_cpu_cache() if (platform or jax.default_backend()) == "cpu" else 0
    return max(PROBE_BYTES, CACHE_MULTIPLE * cache)


@jax.jit(static_argnames=("rows",))
def _probe_matrix(rows: int) -> jnp.ndarray:
    """`[rows, PROBE_COLUMNS]` float32 of distinct values in [-0.5, 0.5): a multiplicative hash
    of each element's index. Not constant, because a host that merges identical pages serves a
    constant matrix from cache; not `jax.random`, which takes 19 s for 1 GiB on a 2-core CPU."""
    shape = (rows, PROBE_COLUMNS)
    index = (jax.lax.broadcasted_iota(jnp.uint32, shape, 0) * PROBE_COLUMNS
             + jax.lax.broadcasted_iota(jnp.uint32, shape, 1))
    return ((index * jnp.uint32(2654435761)) >> 8).astype(jnp.float32) / (1 << 24) - 0.5


class BandwidthProbe:
    """Samples the default device's memory read bandwidth in bytes/s: one sample times `calls`
    back-to-back reads of an `nbytes` matrix `W` (`calls` chosen once, so that a sample lasts
    about `PROBE_SAMPLE_S`) and reports the faster of two read patterns.

    Decoding a token at batch 1 is a chain of matrix-vector products that read weights and
    write almost nothing, so the first pattern is `W x` (on the 2-core CPU a plain reduction
    read 10-25% slower than the dot). The second is a row sum of `W`, the plain streaming
    read a GPU's reduction kernels reach near peak with, in case the compiler's matrix-vector
    kernel for this shape does not. `nbytes` is the buffer one read covers; it must exceed
    the caches by far (default `probe_bytes()`).
    """

    def __init__(self, nbytes: int | None = None):
        nbytes = probe_bytes() if nbytes is None else nbytes
        self.w = _probe_matrix(rows=math.ceil(nbytes / (4 * PROBE_COLUMNS)))  # [N, PROBE_COLUMNS]
        self.nbytes = self.w.nbytes
        x = jnp.ones((PROBE_COLUMNS,), jnp.float32)
        self.reads = (jax.jit(lambda w: w @ x), jax.jit(lambda w: jnp.sum(w, axis=1)))
        for read in self.reads:
            read(self.w).block_until_ready()  # compile, first touch
        once = min(self._seconds(read, 1) for read in self.reads)
        self.calls = max(1, min(PROBE_MAX_CALLS, math.ceil(PROBE_SAMPLE_S / once)))

    def _seconds(self, read: Callable[[jnp.ndarray], jnp.ndarray], calls: int) -> float:
        """Seconds per read over `calls` reads dispatched back to back, waited for at the end."""
        t = time.perf_counter()
        for _ in range(calls):
            out = read(self.w)
        out.block_until_ready()
        return (time.perf_counter() - t) / calls

    def __call__(self) -> float:
        return self.nbytes / min(self._seconds(read, self.calls) for read in self.reads)


# The name `bench` and `bench --batch` build their probe by (tests swap it for a smaller one).
bandwidth_probe = BandwidthProbe


def median(xs: list[float]) -> float:
    return float(np.median(xs))
