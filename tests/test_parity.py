"""The parity ladder on tiny random HF models of every supported family.

Per-layer FFN activations and full-forward logits vs Transformers PyTorch, greedy
generation vs `generate`, cached decode vs the full forward pass, no recompiles within
a bucket, and a decode loop that updates the KV cache in place.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from coreinfer_jax import Dense, Generator, Stability
from coreinfer_jax.runtime import engine
from coreinfer_jax.sparse.gather import gather_core_layers
from coreinfer_jax.models.forward import cache_shape, forward, init_cache, logits
from coreinfer_jax.runtime.sampling import Sampling

FAMILIES = ["llama", "llama_tied", "llama3_rope", "mistral", "qwen2", "qwen2_window", "qwen3", "phi3", "gemma3",
            "gemma3_softcap", "opt", "opt_350m_like"]
PROMPTS = [[5, 17, 33, 100, 2, 9, 250, 41, 7, 61, 3, 90], [7, 8, 9], [11, 12, 13, 14, 15, 16, 200]]


def hf_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def full_forward_logits(gen: Generator, ids: list[list[int]]) -> np.ndarray:
    """Our logits `[B, T, V]` for right-padded prompts, from the pre-fill forward."""
    T = max(len(p) for p in ids)
    tokens = np.zeros((len(ids), T), np.int32)
    for row, p in zip(tokens, ids):
        row[: len(p)] = p
    cache = init_cache(gen.cfg, len(ids), T, jnp.float32)
    h, _, _ = forward(gen.params, gen.cfg, jnp.asarray(tokens), jnp.zeros((len(ids),), jnp.int32), cache)
    return np.asarray(logits(gen.params, gen.cfg, h))


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tiny_checkpoint, tiny_torch_model):
    name = request.param
    return name, Generator.load(tiny_checkpoint(name)), tiny_torch_model(name)


def test_logits_match_transformers(pair) -> None:
    _, gen, model = pair
    ours = full_forward_logits(gen, PROMPTS)  # batch of different lengths, right-padded
    for b, ids in enumerate(PROMPTS):
        np.testing.assert_allclose(ours[b, : len(ids)], hf_logits(model, ids), atol=1e-4, rtol=0)


def test_ffn_activations_match_transformers_per_layer(pair) -> None:
    """The activation CoreInfer ranks (down_proj input / fc1 output) agrees layer by layer."""
    name, gen, model = pair
    ids = PROMPTS[0]
    captured: list[np.ndarray] = []
    if gen.cfg.family == "opt":
        mods = [layer.fc1 for layer in model.model.decoder.layers]
        hooks = [m.register_forward_hook(lambda m, i, o: captured.append(o.detach().numpy().copy())) for m in mods]
    else:
        mods = [layer.mlp.down_proj for layer in model.model.layers]
        hooks = [m.register_forward_hook(lambda m, i, o: captured.append(i[0].detach().numpy().copy())) for m in mods]
    hf_logits(model, ids)
    for h in hooks:
        h.remove()
    ours: list[np.ndarray] = []
    cache = init_cache(gen.cfg, 1, len(ids), jnp.float32)
    forward(gen.params, gen.cfg, jnp.asarray([ids]), jnp.zeros((1,), jnp.int32), cache,
            select=lambda i, a: ours.append(np.asarray(a)))
    assert len(ours) == len(captured) == gen.cfg.num_layers
    for layer, (a, b) in enumerate(zip(ours, captured)):
        np.testing.assert_allclose(a.reshape(b.shape), b, atol=1e-4, rtol=0, err_msg=f"{name} layer {layer}")


def test_greedy_generation_matches_transformers(pair) -> None:
    _, gen, model = pair
    out = gen.generate_ids(PROMPTS, max_new_tokens=32, stop_at_eos=False)
    for ids, tokens in zip(PROMPTS, out.tokens):
        assert tokens == hf_greedy(model, ids, 32)


def test_cached_decode_equals_full_forward(pair) -> None:
    _, gen, _ = pair
    out = gen.generate_ids(PROMPTS, max_new_tokens=12, stop_at_eos=False, return_logits=True)
    full = full_forward_logits(gen, [p + t for p, t in zip(PROMPTS, out.tokens)])
    for b, ids in enumerate(PROMPTS):
        n = len(ids)
        # Token k was chosen from the logits at position n - 1 + k.
        np.testing.assert_allclose(out.logits[b], full[b, n - 1: n - 1 + 12], atol=1e-4, rtol=0)


def test_sparse_keep_one_equals_dense(pair) -> None:
    _, gen, _ = pair
    dense = gen.generate_ids(PROMPTS, max_new_tokens=16, stop_at_eos=False, return_logits=True)
    every_layer = Stability(keep=1.0, token_keep=0.2, layers=(0, gen.cfg.num_layers))
    sparse = gen.generate_ids(PROMPTS, max_new_tokens=16, stop_at_eos=False, return_logits=True,
                              method=every_layer)
    assert sparse.tokens == dense.tokens
    np.testing.assert_allclose(sparse.logits, dense.logits, atol=1e-4, rtol=0)
    assert sparse.core_neurons.shape == (len(PROMPTS), gen.cfg.num_layers, gen.cfg.intermediate_size)


def limits(gen: Generator, ids: list[int], layer: int, token_keep: float) -> int:
    """The method's `limit` for `ids` at `layer`, from our own pre-fill activations."""
    acts: dict[int, np.ndarray] = {}
    cache = init_cache(gen.cfg, 1, len(ids), jnp.float32)
    forward(gen.params, gen.cfg, jnp.asarray([ids]), jnp.zeros((1,), jnp.int32), cache,
            select=lambda i, a: acts.__setitem__(i, np.asarray(a)[0]))
    return int(token_keep * (acts[layer] > 0).sum() / len(ids))


def test_same_bucket_does_not_recompile(tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    first, second, third = [1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1], list(range(20, 34))
    for method in (Stability(keep=0.5), Stability(keep=0.5, token_keep=0.9)):
        layer = method.validate(gen.cfg).sparse_layers()[0]
        gen.generate_ids([first], max_new_tokens=8, method=method)
        programs = engine.prefill, gather_core_layers, engine.decode
        sizes = [f._cache_size() for f in programs]
        # 9 and 14 tokens share the 16-token bucket with 5, and their `limit`s differ.
        assert len({limits(gen, p, layer, method.token_keep) for p in (first, second, third)}) > 1
        gen.generate_ids([second], max_new_tokens=8, method=method)
        gen.generate_ids([third], max_new_tokens=8, method=method)
        assert [f._cache_size() for f in programs] == sizes


@pytest.mark.parametrize("method", [Stability(keep=0.5), Dense()], ids=["stability", "dense"])
def test_decode_loop_updates_the_kv_cache_in_place(tiny_checkpoint, method) -> None:
    # A copy of a cache buffer inside the loop costs a read and a write of that layer's
    # cache on every token; the compiled loop must have none. Batch 1 (the benchmark's
    # case) is the one where XLA's CPU backend inserted them.
    gen = Generator.load(tiny_checkpoint("llama"))
    method = method.validate(gen.cfg)
    tokens, lengths, cache_len = gen._pack([PROMPTS[0]], 8)
    first_logits, cache, _, weights = gen._prefill(tokens, lengths, cache_len, method)
    compiled = engine.decode.lower(weights, first_logits, cache, lengths, jnp.int32(8), jnp.zeros((0,), jnp.int32),
                                   jax.random.key(0), cfg=gen.cfg, sampling=Sampling(),
                                   max_steps=cache_len - tokens.shape[1]).compile().as_text()
    shape = ",".join(map(str, cache_shape(gen.cfg, 1, cache_len)))
    assert re.search(rf"f32\[{shape}\]", compiled)  # the pattern below can match
    assert not re.findall(rf"= f32\[{shape}\]\S* copy\(", compiled)
