"""The GPU forms of one token's products (multiply-and-reduce over gathered or unpacked rows)
equal the CPU forms and a NumPy restatement, and decode with them gives the same tokens."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from coreinfer_jax import Generator, Hybrid
from coreinfer_jax.models.products import gathered_times, times_gathered, times_rows

PROMPTS = [[5, 17, 33, 100, 2, 9, 250, 41, 7, 61, 3, 90, 14, 15], [7, 8, 9, 10, 11]]


@pytest.mark.parametrize("form", ["cpu", "gpu"])
def test_each_form_equals_numpy(form, forced) -> None:
    forced(form)
    rng = np.random.default_rng(1)
    F, D, n = 300, 40, 37
    w = rng.normal(size=(F, D)).astype(np.float32)
    x = rng.normal(size=(2, D)).astype(np.float32)
    idx = np.stack([rng.permutation(F)[:n] for _ in range(2)]).astype(np.int32)
    h = rng.normal(size=(2, n)).astype(np.float32)
    np.testing.assert_allclose(times_rows(jnp.asarray(x[:, None]), jnp.asarray(w))[:, 0], x @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(times_gathered(jnp.asarray(x), jnp.asarray(w), jnp.asarray(idx)),
                               np.einsum("bd,bnd->bn", x, w[idx]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gathered_times(jnp.asarray(h), jnp.asarray(w), jnp.asarray(idx)),
                               np.einsum("bn,bnd->bd", h, w[idx]), rtol=1e-5, atol=1e-5)


def test_the_gpu_forms_finish_a_norm_after_the_reduction(forced) -> None:
    """With `row_scale` (a decode step's unfinished norm, `forward.norm_for_products`), the GPU
    forms equal the products of the finished input `x * r`."""
    forced("gpu")
    rng = np.random.default_rng(2)
    F, D, n = 300, 40, 37
    w = rng.normal(size=(F, D)).astype(np.float32)
    x = rng.normal(size=(2, D)).astype(np.float32)
    r = np.array([0.25, 3.0], np.float32)[:, None]  # [B, 1]
    idx = np.stack([rng.permutation(F)[:n] for _ in range(2)]).astype(np.int32)
    np.testing.assert_allclose(times_rows(jnp.asarray(x[:, None]), jnp.asarray(w), jnp.asarray(r[:, None]))[:, 0],
                               (x * r) @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(times_gathered(jnp.asarray(x), jnp.asarray(w), jnp.asarray(idx), jnp.asarray(r)),
                               np.einsum("bd,bnd->bn", x * r, w[idx]), rtol=1e-5, atol=1e-5)


HYBRIDS = {"sketch": Hybrid(keep=0.25, dynamic=0.25, layers=(0, 2), select_by="sketch"),
           # The per-token rows less their prompt means, and a selection that reads the finished norm.
           "compensated": Hybrid(keep=0.25, dynamic=0.25, layers=(0, 2), select_by="sketch", compensate=True),
           "oracle": Hybrid(keep=0.25, dynamic=0.25, layers=(0, 2), select_by="oracle")}


@pytest.mark.parametrize("name, kind, rows", [("llama", "sketch", 2), ("gemma3", "sketch", 2), ("opt", "sketch", 2),
                                              ("llama", "compensated", 2), ("llama", "oracle", 2),
                                              # alone, gated steps read the sketch's rows outside the core
                                              ("llama", "sketch", 1)])
def test_hybrid_decode_with_the_gpu_forms_gives_the_cpu_tokens(name, kind, rows, tiny_checkpoint, forced) -> None:
    gen = Generator.load(tiny_checkpoint(name))
    method = HYBRIDS[kind]
    tokens = {}
    for form in ("cpu", "gpu"):
        forced(form)
        tokens[form] = gen.generate_ids(PROMPTS[:rows], 12, method=method, stop_at_eos=False).tokens
    assert tokens["gpu"] == tokens["cpu"]
    assert all(len(t) == 12 for t in tokens["cpu"])
