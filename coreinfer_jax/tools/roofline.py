"""What bounds decode speed: bytes read per generated token, and the machine's bandwidth."""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import Params
from coreinfer_jax.runtime.batching import cache_windows, prompt_bucket
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


def bandwidth_probe(nbytes: int = 512 << 20) -> Callable[[], float]:
    """A function that times one matrix-vector product `W x` over a matrix `W` far larger
    than any cache, on the default device, and returns the bytes/s it read.

    Decoding a token at batch 1 is a chain of matrix-vector products that read weights and
    write almost nothing, so this is the access pattern to measure the bound with (on the
    2-core CPU a plain reduction read 10-25% slower than the dots). The matrix is random: a
    constant one has identical pages, which a host that merges pages serves from cache.
    """
    cols = 1024
    w = jax.random.normal(jax.random.key(0), (nbytes // 4 // cols, cols), jnp.float32)  # [N, cols]
    x = jnp.ones((cols,), jnp.float32)
    read = jax.jit(lambda w, x: w @ x)
    read(w, x).block_until_ready()

    def probe() -> float:
        t = time.perf_counter()
        read(w, x).block_until_ready()
        return w.nbytes / (time.perf_counter() - t)

    return probe


def median(xs: list[float]) -> float:
    return float(np.median(xs))
