"""Stability-guided core-neuron selection (CoreInfer, arXiv 2410.18311, section 4.1).

Per sparse layer, over a prompt's real tokens only:
  1. limit = floor(token_keep * P / T), P = positive activations over the T tokens;
  2. each token's `limit` largest activations are its token-wise core neurons;
  3. count, per neuron, the tokens that have it as token-wise core;
  4. the `int(F * keep)` neurons with the largest counts are the sentence's core neurons.
The data-dependent `limit` only enters as a comparison against ranks, so shapes stay
static and a new `limit` never recompiles.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def n_keep_for(width: int, keep: float) -> int:
    """Neurons kept per layer: `int(F * keep)`, the reference's rounding."""
    return int(width * keep)


def select_core_neurons(activations: jnp.ndarray, valid: jnp.ndarray, keep: float,
                        token_keep: float) -> jnp.ndarray:
    """Core neurons `int32 [B, int(F * keep)]` of activations `[B, T, F]` over `valid` `[B, T]`.

    Ties in counts (and neurons beyond those with a non-zero count) are taken in index
    order, so the result always has `n_keep` entries.
    """
    B, T, F = activations.shape
    a = activations.astype(jnp.float32)
    valid = valid.astype(bool)
    n_tokens = valid.sum(-1)  # [B]
    positives = jnp.sum((a > 0) & valid[..., None], axis=(1, 2))  # [B]
    # Same order of operations as the reference, (token_keep * P) / T, then floor.
    limit = jnp.floor(token_keep * positives.astype(jnp.float32)
                      / jnp.maximum(n_tokens, 1).astype(jnp.float32)).astype(jnp.int32)  # [B]
    # P / T <= F, so limit <= token_keep * F: a static top-k of that size (one more for
    # float32 rounding) holds every token's first `limit` neurons; top_k orders ties by
    # index, like a stable sort, and is much faster than a full sort on CPU.
    k_max = min(F, int(token_keep * F) + 1)
    _, order = lax.top_k(a, k_max)  # [B, T, k_max]
    token_core = (jnp.arange(k_max) < limit[:, None, None]) & valid[..., None]  # [B, T, k_max]
    rows = jnp.arange(B)[:, None, None]
    counts = jnp.zeros((B, F), jnp.int32).at[rows, order].add(token_core.astype(jnp.int32))  # [B, F]
    _, idx = lax.top_k(counts, n_keep_for(F, keep))  # [B, n_keep]
    return idx.astype(jnp.int32)
