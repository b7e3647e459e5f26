"""Stability-guided core-neuron selection (CoreInfer, arXiv 2410.18311, section 4.1).

Per sparse layer, over a prompt's real tokens only:
  1. limit = floor(token_keep * P / T), P = positive activations over the T tokens;
  2. each token's `limit` largest activations are its token-wise core neurons;
  3. count, per neuron, the tokens that have it as token-wise core;
  4. the `int(F * keep)` neurons with the largest counts are the sentence's core neurons.
The data-dependent `limit` only enters as a comparison against ranks, so shapes stay
static and a new `limit` never recompiles.

Also the device-side parts of similarity-guided selection: sentence signatures, the
per-token counts its calibration ranks neurons by, and nearest-centroid assignment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from coreinfer_jax.errors import MethodError


def check_fraction(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise MethodError(f"{name} must be in (0, 1], got {value}")


def n_keep_for(width: int, keep: float) -> int:
    """Neurons kept per layer: `int(F * keep)`, the reference's rounding."""
    return int(width * keep)


def sharded_count(width: int, fraction: float, shards: int) -> int:
    """Neurons a fraction keeps of `width` split in `shards` equal blocks: each block's
    `int(width / shards * fraction)` (an equal share per tensor-parallel device)."""
    return shards * n_keep_for(width // shards, fraction)


def select_core_neurons(activations: jnp.ndarray, valid: jnp.ndarray, keep: float,
                        token_keep: float) -> jnp.ndarray:
    """Core neurons `int32 [B, int(F * keep)]` of activations `[B, T, F]` over `valid` `[B, T]`.

    Ties in counts (and neurons beyond those with a non-zero count) are taken in index
    order, so the result always has `n_keep` entries.
    """
    if activations.ndim != 3 or valid.shape != activations.shape[:2]:
        raise MethodError(f"select_core_neurons takes activations [B, T, F] and valid [B, T], got shapes "
                          f"{tuple(activations.shape)} and {tuple(valid.shape)}")
    check_fraction("keep", keep)
    check_fraction("token_keep", token_keep)
    counts = stability_counts(activations, valid, token_keep)  # [B, F]
    _, idx = lax.top_k(counts, n_keep_for(activations.shape[-1], keep))  # [B, n_keep]
    return idx.astype(jnp.int32)


def stability_counts(activations: jnp.ndarray, valid: jnp.ndarray, token_keep: float,
                     by_magnitude: bool = False) -> jnp.ndarray:
    """Steps 1-3: per neuron, the number of real tokens that have it among their `limit`
    largest activations (`by_magnitude`: largest |activation|; `limit` always counts the
    signed positives). Returns int32 `[B, F]`."""
    F = activations.shape[-1]
    a = activations.astype(jnp.float32)
    valid = valid.astype(bool)
    n_tokens = valid.sum(-1)  # [B]
    positives = jnp.sum((a > 0) & valid[..., None], axis=(1, 2))  # [B]
    # As the reference computes it, in Python floats: (token_keep * P) / T, then floor. In
    # float32 it differs by one for some counts: token_keep 0.35 with P = 180 over one token
    # gives 63, not 62; at the default 0.2 once P passes 2^24 (over 1170 tokens at Llama-3-8B's
    # 14336 neurons). So these B scalars are float64, whatever the rest of the program.
    with jax.enable_x64(True):
        limit = jnp.floor(token_keep * positives.astype(jnp.float64)
                          / jnp.maximum(n_tokens, 1).astype(jnp.float64)).astype(jnp.int32)  # [B]
    # P / T <= F, so limit <= token_keep * F: a static top-k of that size (one more, as the
    # reference's rounding of token_keep * P can reach the next integer, e.g. 0.29 * 300 / 3 =
    # 29 > int(0.29 * 100)) holds every token's first `limit` neurons; top_k orders ties by
    # index, like a stable sort, and is much faster than a full sort on CPU.
    k_max = min(F, int(token_keep * F) + 1)
    limits = jnp.where(valid, limit[:, None], 0)  # [B, T]
    return token_core_counts(jnp.abs(a) if by_magnitude else a, limits, k_max)


# Similarity-guided selection: a token's token-wise core neurons are its
# `round(0.4 * its positives)` largest activations in a sentence signature, and its
# `floor(0.4 * mean positives)` largest in a cluster's neuron lists.
SIMILARITY_TOKEN_FRACTION = 0.4


def rank_bound(width: int, fraction: float = SIMILARITY_TOKEN_FRACTION) -> int:
    """A static upper bound of any token limit `fraction * positives` (rounded), positives <= `width`."""
    return min(width, int(fraction * width) + 1)


def token_core_counts(activations: jnp.ndarray, limits: jnp.ndarray, k_max: int) -> jnp.ndarray:
    """Per neuron, the number of tokens that have it among their `limits` largest activations.

    `activations` `[B, T, F]`, `limits` int32 `[B, T]` (0 for padding), every limit <= the
    static `k_max`. Returns int32 `[B, F]`; ties in value are taken in index order.
    """
    B, _, F = activations.shape
    _, order = lax.top_k(activations.astype(jnp.float32), k_max)  # [B, T, k_max]
    token_core = jnp.arange(k_max) < limits[..., None]  # [B, T, k_max]
    rows = jnp.arange(B)[:, None, None]
    return jnp.zeros((B, F), jnp.int32).at[rows, order].add(token_core.astype(jnp.int32))  # [B, F]


def sentence_signature(activations: jnp.ndarray, valid: jnp.ndarray, size: int) -> jnp.ndarray:
    """Multi-hot signature `bool [B, F]` of activations `[B, T, F]` over `valid` `[B, T]` tokens.

    Each token's `round(0.4 * its positive count)` largest activations are token-wise core;
    the `size` neurons core in the most tokens form the signature (ties in index order;
    neurons core in no token never do, so a short sentence may have fewer).
    """
    with jax.named_scope("sentence_signature"):
        a = activations.astype(jnp.float32)
        B, _, F = a.shape
        positives = jnp.sum(a > 0, axis=-1).astype(jnp.float32)  # [B, T]
        limits = jnp.where(valid, jnp.round(SIMILARITY_TOKEN_FRACTION * positives), 0).astype(jnp.int32)  # [B, T]
        counts = token_core_counts(a, limits, rank_bound(F))  # [B, F]
        _, top = lax.top_k(counts, size)  # [B, size]
        chosen = jnp.zeros((B, F), bool).at[jnp.arange(B)[:, None], top].set(True)  # [B, F]
        return chosen & (counts > 0)


def assign_clusters(signatures: jnp.ndarray, centroids: jnp.ndarray) -> jnp.ndarray:
    """Nearest centroid (squared Euclidean, ties to the lowest index) `int32 [B]` of multi-hot
    `signatures` `[B, F]` among `centroids` `[k, F]`, as k-means assigns points."""
    with jax.named_scope("assign_cluster"):
        diff = signatures[:, None, :].astype(jnp.float32) - centroids[None].astype(jnp.float32)  # [B, k, F]
        return jnp.argmin(jnp.sum(diff * diff, axis=-1), axis=-1).astype(jnp.int32)
