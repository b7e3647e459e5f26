"""The Flax NNX face (`models.nnx`): the same logits as Transformers and the engine, a state that
is the param tree, split/merge, and an optax step that lowers the loss and flows back to `Generator`.

Expected values come from outside the module: the PyTorch model's logits and cross-entropy,
the engine's jitted pre-fill, and the checkpoint's own param tree.
"""

from __future__ import annotations

import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jax
import jax.numpy as jnp

from coreinfer_jax import Dense, Generator, load_checkpoint
from coreinfer_jax.errors import InputError
from coreinfer_jax.models.nnx import CausalLM, next_token_loss, train_step
from coreinfer_jax.models.params import flat_shapes, path_str
from coreinfer_jax.runtime import engine

FAMILIES = ["llama", "opt"]  # gated RMSNorm + RoPE; LayerNorm + learned positions + tied head
PROMPTS = [[5, 17, 33, 100, 2, 9, 250, 41, 7, 61, 3, 90], [7, 8, 9], [11, 12, 13, 14, 15, 16, 200]]


def padded(prompts: list[list[int]], pad: int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Right-padded tokens `[B, T]` and the mask of real ones."""
    T = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), T), pad, np.int32)
    for row, p in zip(tokens, prompts):
        row[: len(p)] = p
    lengths = np.array([len(p) for p in prompts])
    return jnp.asarray(tokens), jnp.asarray(np.arange(T)[None, :] < lengths[:, None])


def torch_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def torch_loss(model: torch.nn.Module, prompts: list[list[int]]) -> float:
    """Next-token cross-entropy averaged over every predicted real token, by PyTorch."""
    total = sum(torch.nn.functional.cross_entropy(torch_logits(model, p)[:-1], torch.tensor(p[1:]),
                                                  reduction="sum").item() for p in prompts)
    return total / sum(len(p) - 1 for p in prompts)


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tiny_checkpoint, tiny_torch_model):
    path = tiny_checkpoint(request.param)
    return path, load_checkpoint(path), tiny_torch_model(request.param)


def test_logits_match_transformers_and_engine_prefill(case) -> None:
    path, (cfg, params, _), torch_model = case
    model = CausalLM.from_checkpoint(path)
    tokens, mask = padded(PROMPTS)
    ours = np.asarray(model(tokens))  # [B, T, V]
    assert ours.shape == (len(PROMPTS), tokens.shape[1], cfg.vocab_size)
    for b, ids in enumerate(PROMPTS):
        np.testing.assert_allclose(ours[b, : len(ids)], torch_logits(torch_model, ids).numpy(), atol=1e-4, rtol=0)
    lengths = mask.sum(1).astype(jnp.int32)
    first, _, _ = engine.prefill(params, tokens, lengths, cfg=cfg, method=Dense(), cache_len=tokens.shape[1])
    last = ours[np.arange(len(PROMPTS)), np.asarray(lengths) - 1]  # [B, V]
    np.testing.assert_allclose(last, np.asarray(first), atol=1e-5, rtol=0)


def test_one_row_without_its_batch_axis_is_named(case) -> None:
    path, _, _ = case
    with pytest.raises(InputError, match=r"tokens must be \[B, T\] \(a batch of rows\), got shape \(3,\)"):
        CausalLM.from_checkpoint(path)(jnp.asarray([1, 2, 3]))


def test_state_is_the_param_tree_and_split_merge_keeps_logits(case) -> None:
    _, (cfg, params, _), _ = case
    model = CausalLM.from_params(cfg, params)
    graphdef, state = nnx.split(model)
    flat = {path_str(p): v for p, v in nnx.to_flat_state(state)}
    assert {k: v.shape for k, v in flat.items()} == flat_shapes(cfg)
    assert all(isinstance(v, nnx.Param) for v in flat.values())
    mine = model.params()
    assert jax.tree.structure(mine) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(params)))
    merged = nnx.merge(graphdef, state)
    tokens, _ = padded(PROMPTS)
    np.testing.assert_array_equal(np.asarray(merged(tokens)), np.asarray(model(tokens)))


def test_loss_matches_torch_and_is_blind_to_padding(case) -> None:
    _, (cfg, params, _), torch_model = case
    model = CausalLM.from_params(cfg, params)
    tokens, mask = padded(PROMPTS)
    loss = float(next_token_loss(model, tokens, mask))
    assert loss == pytest.approx(torch_loss(torch_model, PROMPTS), abs=1e-4)
    other, other_mask = padded(PROMPTS, pad=3)  # different padding ids, same real tokens
    np.testing.assert_array_equal(np.asarray(other_mask), np.asarray(mask))
    assert float(next_token_loss(model, other, mask)) == pytest.approx(loss, abs=1e-6)


@pytest.fixture(scope="module")
def trained(case):
    """One Adam step on the prompts: (model after it, loss the step returned, loss after it)."""
    _, (cfg, params, _), _ = case
    model = CausalLM.from_params(cfg, params)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    tokens, mask = padded(PROMPTS)
    before = float(train_step(model, optimizer, tokens, mask))
    return model, before, float(next_token_loss(model, tokens, mask))


def test_optax_step_lowers_the_loss(case, trained) -> None:
    _, _, torch_model = case
    _, before, after = trained
    assert before == pytest.approx(torch_loss(torch_model, PROMPTS), abs=1e-4)
    assert after < before - 0.1, (before, after)


def test_fine_tuned_params_flow_into_generator(case, trained) -> None:
    _, (cfg, params, tokenizer), _ = case
    model, _, _ = trained
    tuned = model.params()
    assert jax.tree.structure(tuned) == jax.tree.structure(params)
    for (path, new), old in zip(jax.tree_util.tree_flatten_with_path(tuned)[0], jax.tree.leaves(params)):
        assert not np.array_equal(new, old), f"{path_str(path)} did not change"
    prompt = [1, 2, 3]
    out = Generator(cfg, tuned, tokenizer).generate_ids([prompt], 4, stop_at_eos=False, return_logits=True)
    assert len(out.tokens[0]) == 4
    np.testing.assert_allclose(out.logits[0, 0], np.asarray(model(jnp.asarray([prompt])))[0, -1], atol=1e-5)


def test_zero_learning_rate_keeps_generation(case) -> None:
    _, (cfg, params, tokenizer), _ = case
    model = CausalLM.from_params(cfg, params)
    tokens, mask = padded(PROMPTS)
    train_step(model, nnx.Optimizer(model, optax.sgd(0.0), wrt=nnx.Param), tokens, mask)
    want = Generator(cfg, params, tokenizer).generate_ids([[1, 2, 3]], 4, stop_at_eos=False).tokens
    assert Generator(cfg, model.params(), tokenizer).generate_ids([[1, 2, 3]], 4, stop_at_eos=False).tokens == want
