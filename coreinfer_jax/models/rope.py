"""Rotary position embeddings, computed the way Transformers computes them (float32)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from coreinfer_jax.models.config import SLIDING, ModelConfig

Tables = tuple[jnp.ndarray, jnp.ndarray]


def inverse_frequencies(cfg: ModelConfig, layer_type: str | None = None) -> np.ndarray:
    """`inv_freq` `[head_dim // 2]` of layers of `layer_type` (None: the model's only type)
    for the config's rope type (default, linear, llama3)."""
    layer_type = layer_type or cfg.only_layer_type()
    dim = cfg.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    if layer_type == SLIDING and cfg.sliding_rope_theta is not None:
        return (1.0 / (np.float32(cfg.sliding_rope_theta) ** exponent)).astype(np.float32)
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
    rope = cfg.rope
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        return (inv_freq / np.float32(rope["factor"])).astype(np.float32)
    if kind == "llama3":
        return _llama3(inv_freq, rope)
    return inv_freq


def _llama3(inv_freq: np.ndarray, rope: dict) -> np.ndarray:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and the band
    # between them interpolated smoothly.
    factor = rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg: ModelConfig, positions: jnp.ndarray) -> dict[str, Tables] | None:
    """cos, sin `[B, T, head_dim]` per layer type for `positions` `[B, T]`; None without RoPE (OPT)."""
    if cfg.family == "opt":
        return None
    return {kind: rotary_tables(jnp.asarray(inverse_frequencies(cfg, kind)), positions)
            for kind in sorted(set(cfg.attention_types))}


def rotary_tables(inv_freq: jnp.ndarray, positions: jnp.ndarray) -> Tables:
    """cos, sin `[B, T, head_dim]` for integer `positions` `[B, T]`."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, hd]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate `x` `[B, T, H, hd]` by the tables `[B, T, hd]` (the rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
