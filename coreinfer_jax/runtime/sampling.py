"""Next-token choice: greedy, or temperature / top-k / top-p sampling with an explicit key."""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

from coreinfer_jax.errors import CoreInferError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """`temperature == 0` is greedy; `top_k == 0` and `top_p == 1` disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise CoreInferError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise CoreInferError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise CoreInferError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample(logits: jnp.ndarray, key: jax.Array | None, sampling: Sampling) -> jnp.ndarray:
    """Token ids `[B]` from float32 logits `[B, V]`; greedy needs no `key`."""
    if sampling.greedy:
        return first_argmax(logits)
    logits = logits / sampling.temperature
    neg = jnp.finfo(logits.dtype).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)  # [B, V]
        sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs >= sampling.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def first_argmax(logits: jnp.ndarray) -> jnp.ndarray:
    """`jnp.argmax(logits, -1)` `[B]` (the first maximum; the first NaN if any), as a max then
    a min over the indices that reach it: XLA's CPU backend does not vectorise argmax's
    (value, index) reduction, which took ~3x longer over SmolLM2's 49152 logits."""
    top = logits.max(axis=-1, keepdims=True)  # [B, 1]
    hit = (logits == top) | jnp.isnan(logits)  # [B, V]
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, ids, logits.shape[-1]), axis=-1)
