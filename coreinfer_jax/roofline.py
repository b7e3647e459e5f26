"""What bounds decode speed: bytes read per generated token, and the machine's bandwidth."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax.config import ModelConfig
from coreinfer_jax.methods import Method, Stability
from coreinfer_jax.params import Params
from coreinfer_jax.selection import n_keep_for

_FFN_NEURON_ROWS = ("w_gate", "w_up", "w_down", "b_gate", "b_up")


def bytes_per_token(cfg: ModelConfig, params: Params, method: Method, context: int) -> int:
    """Bytes one decode step reads: every weight it touches, plus the KV cache at `context`.

    The token embedding contributes one row unless it is also the (tied) LM head, which
    reads all of it; sparse layers read only `n_keep` of their `F` FFN neurons.
    """
    itemsize = jnp.dtype(params["embed"].dtype).itemsize
    sparse = set(method.sparse_layers()) if isinstance(method, Stability) else set()
    frac = n_keep_for(cfg.intermediate_size, method.keep) / cfg.intermediate_size if sparse else 1.0
    total = 0
    for i, layer in enumerate(params["layers"]):
        for group, tensors in layer.items():
            for name, w in tensors.items():
                share = frac if (i in sparse and group == "ffn" and name in _FFN_NEURON_ROWS) else 1.0
                total += int(w.size * share) * itemsize
    embed_row = cfg.embed_dim * itemsize
    head = params["embed"].size * itemsize if cfg.tie_word_embeddings else params["lm_head"].size * itemsize + embed_row
    total += head
    for name in ("final_norm", "project_in", "project_out"):
        if name in params:
            total += sum(x.size for x in jax.tree.leaves(params[name])) * itemsize
    if "pos_embed" in params:
        total += cfg.hidden_size * itemsize
    kv = 2 * cfg.num_layers * context * cfg.num_kv_heads * cfg.head_dim * itemsize
    return total + kv


def measure_bandwidth(nbytes: int = 512 << 20, repeats: int = 9) -> float:
    """Sustained read bandwidth in bytes/s: the median of `repeats` XLA reductions over a
    buffer far larger than any cache, on the default device with all its threads.

    Decoding reads weights and writes almost nothing, so reading is the bound that matters;
    a copy would also time page faults on its freshly allocated output. The buffer is random:
    a constant one has identical pages, which a host that merges pages serves from cache.
    """
    x = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)
    read = jax.jit(jnp.sum)
    read(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        read(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return nbytes / median(times)


def median(xs: list[float]) -> float:
    return float(np.median(xs))
