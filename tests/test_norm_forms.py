"""A decode step's RMS norm before products, in its two forms: finished before the products
(the CPU's) or scaled after them (the GPU's, `forward.norm_for_products`). Each equals a
NumPy restatement of Llama's and Gemma's RMS norm followed by the product; decoding with
either gives the same tokens (`test_attention_forms`, `test_products`: every GPU form forced)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.forward import finished, norm_for_products, rescaled


def config(family: str) -> ModelConfig:
    return ModelConfig(architecture="Gemma3ForCausalLM" if family == "gemma" else "LlamaForCausalLM",
                       family=family, vocab_size=8, hidden_size=40, intermediate_size=64, num_layers=1,
                       num_heads=1, num_kv_heads=1, head_dim=40, hidden_act="silu", norm_eps=1e-3,
                       rope_theta=1e4, max_position_embeddings=8, tie_word_embeddings=True)


def numpy_norm(x: np.ndarray, scale: np.ndarray, family: str, eps: float) -> np.ndarray:
    """Llama: `scale * x / rms(x)`; Gemma: `(1 + scale) * x / rms(x)` (its weights are offsets from 1)."""
    x = x.astype(np.float64)
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return h * (1.0 + scale if family == "gemma" else scale)


@pytest.mark.parametrize("form", ["cpu", "gpu"])
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_each_norm_form_equals_numpy(form, family, forced) -> None:
    forced(form)
    rng = np.random.default_rng(3)
    cfg = config(family)
    # Rows of very different sizes: a norm that left the scaling out would be far off.
    x = (rng.normal(size=(2, 1, 40)) * np.array([0.01, 30.0])[:, None, None]).astype(np.float32)
    scale = rng.normal(size=40).astype(np.float32)
    w = rng.normal(size=(40, 24)).astype(np.float32)
    y, r = norm_for_products({"scale": jnp.asarray(scale)}, jnp.asarray(x), cfg)
    assert r.shape == (2, 1, 1) and r.dtype == jnp.float32
    want = numpy_norm(x, scale, family, cfg.norm_eps)  # [2, 1, 40]
    np.testing.assert_allclose(np.asarray(rescaled("btd,de->bte", y, jnp.asarray(w), r)), want @ w,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(finished(y, r)), want, rtol=1e-5, atol=1e-5)


def test_the_gpu_form_scales_after_the_product(forced) -> None:
    """The GPU form's first output is `scale * x`, not the norm: the scaling is left to
    the consumers, so a product reading it without `r` would be off by the row's RMS."""
    forced("gpu")
    cfg = config("llama")
    x = np.full((1, 1, 40), 3.0, np.float32)
    scale = np.linspace(-1, 1, 40).astype(np.float32)
    y, r = norm_for_products({"scale": jnp.asarray(scale)}, jnp.asarray(x), cfg)
    np.testing.assert_allclose(np.asarray(y)[0, 0], scale * 3.0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(r), 1 / np.sqrt(9.0 + 1e-3), rtol=1e-6)
