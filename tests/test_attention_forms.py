"""Decode attention in its two forms: the CPU's (attend to the cache and to the new token
apart, then write the token) and the GPU's (write the token, then attend to the cache up
to the query's position). Each equals a NumPy restatement, and decoding with either gives
the same tokens for every family."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from coreinfer_jax import Dense, Generator, Stability
from coreinfer_jax.models import attend, products

PROMPTS = [[5, 17, 33, 100, 2, 9, 250, 41, 7, 61, 3, 90, 14, 15], [7, 8, 9, 10, 11]]


def numpy_attention(q, k, v, cache_k, cache_v, pos, window):
    """One new token per row: `q` `[B, Hkv, G, 1, hd]`, `k`, `v` `[B, Hkv, hd, 1]`, caches
    `[B, Hkv, hd, S]` holding the slots before `pos[b]` (later slots are stale). Returns the
    output `[B, 1, Hkv, G, hd]` and the caches with the token written at `pos[b]`."""
    B, Hkv, G, _, hd = q.shape
    cache_k, cache_v = cache_k.copy(), cache_v.copy()
    out = np.zeros((B, 1, Hkv, G, hd), np.float64)
    for b in range(B):
        cache_k[b, :, :, pos[b]] = k[b, :, :, 0]
        cache_v[b, :, :, pos[b]] = v[b, :, :, 0]
        first = 0 if window is None else max(0, pos[b] - window + 1)
        slots = np.arange(first, pos[b] + 1)
        for h in range(Hkv):
            for g in range(G):
                scores = np.array([q[b, h, g, 0] @ cache_k[b, h, :, s] for s in slots], np.float64)
                p = np.exp(scores - scores.max())
                out[b, 0, h, g] = (p / p.sum()) @ cache_v[b, h, :, slots].astype(np.float64)
    return out, cache_k, cache_v


@pytest.mark.parametrize("form", [attend.attend_then_write, attend.write_then_attend])
@pytest.mark.parametrize("window", [None, 3])
def test_each_form_equals_numpy(form, window) -> None:
    rng = np.random.default_rng(0)
    B, Hkv, G, hd, S = 3, 2, 2, 8, 12
    pos = np.array([0, 5, 11], np.int32)  # the first slot, a middle one, the last
    q = rng.normal(size=(B, Hkv, G, 1, hd)).astype(np.float32)
    k, v = (rng.normal(size=(B, Hkv, hd, 1)).astype(np.float32) for _ in range(2))
    cache = {n: rng.normal(size=(B, Hkv, hd, S)).astype(np.float32) for n in ("k", "v")}
    out, kv = form(q, k, v, cache, pos, pos[:, None], window=window)
    want, want_k, want_v = numpy_attention(q, k, v, cache["k"], cache["v"], pos, window)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(kv["k"]), want_k)
    np.testing.assert_array_equal(np.asarray(kv["v"]), want_v)


def test_the_gpu_form_is_what_a_gpu_program_runs() -> None:
    """Lowered for a GPU, decode attention writes the token first: the program has no
    concatenation of scores (the CPU form's), whose kernel recomputed the new key."""
    q = jax.ShapeDtypeStruct((1, 2, 2, 1, 8), np.float32)
    kv = jax.ShapeDtypeStruct((1, 2, 8, 1), np.float32)
    cache = {n: jax.ShapeDtypeStruct((1, 2, 8, 16), np.float32) for n in ("k", "v")}
    pos = jax.ShapeDtypeStruct((1,), np.int32)

    def step(q, k, v, cache, pos):
        return products.by_platform(attend.attend_then_write, attend.write_then_attend, q, k, v, cache, pos,
                                    pos[:, None], None)

    lowered = {p: jax.jit(step).trace(q, kv, kv, cache, pos).lower(lowering_platforms=(p,)).as_text()
               for p in ("cpu", "cuda")}
    assert "concatenate" in lowered["cpu"]
    assert "concatenate" not in lowered["cuda"]



@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2_window", "phi3", "gemma3", "opt"])
def test_decoding_with_either_form_gives_the_same_tokens(name, tiny_checkpoint, forced) -> None:
    """Dense and stability, batch 2 and batch 1 (its cache write is a plain slice update),
    past the sliding windows of mistral (16), qwen2_window (8) and gemma3 (8)."""
    gen = Generator.load(tiny_checkpoint(name))
    runs = {}
    for form in ("cpu", "gpu"):
        forced(form)
        runs[form] = [gen.generate_ids(prompts, 14, method=method, stop_at_eos=False).tokens
                      for prompts in (PROMPTS, PROMPTS[:1]) for method in (Dense(), Stability(keep=0.5, layers=(0, 2)))]
    assert runs["gpu"] == runs["cpu"]
    assert all(len(t) == 14 for run in runs["cpu"] for t in run)
