"""FLAP-style compensation: left-out neurons contribute their prompt means, against a PyTorch
restatement (`test_hybrid.torch_oracle_generate`: dense pre-fill, per-token masks, means filled
in by hooks) and by hand."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import run_main
from coreinfer_jax import Generator, Hybrid, Stability
from coreinfer_jax.evaluation.sweep import sweep_methods
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.sparse.token_step import TokenNeurons
from coreinfer_jax.tools.args import hybrid_arg
from coreinfer_jax.sparse.compensation import dropped_bias
from coreinfer_jax.tools.cli import main
from coreinfer_jax.tools.roofline import ffn_bytes_per_token
from test_hybrid import assert_scores_equal_generation, torch_oracle_generate
from test_sparse import PROMPTS


@pytest.mark.parametrize("name", ["llama", "opt"])
@pytest.mark.parametrize("dynamic", [0.0, 0.2])
def test_compensation_matches_pytorch_restatement(name, dynamic, tiny_checkpoint, tiny_torch_model) -> None:
    """Batched with padding here, one prompt at a time in PyTorch: padding must not enter the means."""
    gen = Generator.load(tiny_checkpoint(name))
    layers = (1, gen.cfg.num_layers)
    if dynamic:
        method = Hybrid(keep=0.3, dynamic=dynamic, rule="paper", layers=layers, select_by="oracle", compensate=True)
    else:
        method = Stability(keep=0.3, layers=layers, compensate=True)
    method = method.validate(gen.cfg)
    ours = gen.generate_ids(PROMPTS, 16, method=method, stop_at_eos=False)
    plain = gen.generate_ids(PROMPTS, 16, method=dataclasses.replace(method, compensate=False), stop_at_eos=False)
    assert ours.tokens != plain.tokens, "compensation should change something on a random model"
    for b, ids in enumerate(PROMPTS):
        assert ours.tokens[b] == torch_oracle_generate(tiny_torch_model(name), gen.cfg.family, ids, 0.3, dynamic,
                                                       method.sparse_layers(), 16, compensate=True)


@pytest.mark.parametrize("name", ["llama", "opt", "gemma3"])
@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_every_neuron_computed_leaves_no_bias(name, keep, tiny_checkpoint) -> None:
    """keep + dynamic = 1: each dynamic neuron's mean must come off the bias again, or the
    logits move away from dense."""
    gen = Generator.load(tiny_checkpoint(name))
    method = Hybrid(keep=keep, dynamic=1.0 - keep, layers=(0, gen.cfg.num_layers), select_by="sketch", compensate=True)
    dense = gen.generate_ids(PROMPTS, 10, stop_at_eos=False, return_logits=True)
    got = gen.generate_ids(PROMPTS, 10, method=method, stop_at_eos=False, return_logits=True)
    assert got.tokens == dense.tokens
    np.testing.assert_allclose(got.logits, dense.logits, atol=1e-4)


@pytest.mark.parametrize("method", [Stability(keep=0.3, layers=(0, 2), compensate=True),
                                    Hybrid(keep=0.2, dynamic=0.3, layers=(0, 2), select_by="sketch", compensate=True)])
def test_teacher_forced_scores_equal_generation_logits(method, tiny_checkpoint) -> None:
    assert_scores_equal_generation(Generator.load(tiny_checkpoint("llama")), method)


def test_dropped_bias_by_hand() -> None:
    means = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]], np.float32)
    w_down = np.array([[1, 0], [0, 1], [1, 1], [2, -1]], np.float32)
    core = np.array([[1, 3], [0, 2]], np.int32)
    # row 0 drops neurons 0 and 2: 1 * [1, 0] + 3 * [1, 1]; row 1 drops 1 and 3: 0 + 2 * [2, -1]
    got = dropped_bias(jnp.asarray(means), jnp.asarray(core), jnp.asarray(w_down))
    np.testing.assert_allclose(np.asarray(got), [[4.0, 3.0], [4.0, -2.0]])


@pytest.mark.parametrize("name", ["llama", "opt"])
@pytest.mark.parametrize("shards", [1, 2])
def test_per_token_rows_add_their_activations_less_their_means_by_hand(name, shards, tiny_checkpoint) -> None:
    """A compensated decode step's per-token rows add sum_n (h_n - mean_n) * W_down[n] over the
    token's `dynamic` neurons n (their means leave the bias again), restated in NumPy; for the
    one-device products (`shards=1`) and the gathered rows of a neuron-sharded method (2)."""
    cfg = ModelConfig.load(tiny_checkpoint(name) / "config.json")
    rng = np.random.default_rng(4)
    B, F, D, n = 2, 32, 8, 5
    full = {key: rng.normal(size=(F, D)).astype(np.float32) for key in ("w_gate", "w_up", "w_down")}
    if cfg.family == "opt":
        full = {"w_up": full["w_up"], "b_up": rng.normal(size=F).astype(np.float32), "w_down": full["w_down"],
                "b_down": rng.normal(size=D).astype(np.float32)}  # b_down is the core's to add, not these rows'
    means = rng.normal(size=(B, F)).astype(np.float32)
    y = rng.normal(size=(B, 1, D)).astype(np.float32)
    dynamic = np.stack([rng.permutation(F)[:n] for _ in range(B)]).astype(np.int32)  # [B, n]
    step = TokenNeurons(dynamic=n / F, select_by="sketch", shards=shards)
    got = step.dynamic_rows({"full": jax.tree.map(jnp.asarray, full), "means": jnp.asarray(means)}, jnp.asarray(y),
                            jnp.asarray(dynamic), cfg)
    want = np.zeros((B, D), np.float32)
    for b in range(B):
        for j in dynamic[b]:
            if cfg.family == "opt":
                h = max(float(y[b, 0] @ full["w_up"][j] + full["b_up"][j]), 0.0)
            else:
                gate = float(y[b, 0] @ full["w_gate"][j])
                h = gate / (1 + np.exp(-gate)) * float(y[b, 0] @ full["w_up"][j])
            want[b] += (h - means[b, j]) * full["w_down"][j]
    np.testing.assert_allclose(np.asarray(got)[:, 0], want, rtol=1e-5, atol=1e-5)


def test_bytes_add_the_bias_and_the_dynamic_means(tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    cfg = gen.cfg
    D, F = cfg.hidden_size, cfg.intermediate_size
    stability = Stability(keep=0.25, layers=(0, 2)).validate(cfg)
    plain = ffn_bytes_per_token(cfg, gen.params, stability)
    assert ffn_bytes_per_token(cfg, gen.params, dataclasses.replace(stability, compensate=True)) == plain + 2 * D * 4
    hybrid = Hybrid(keep=0.25, dynamic=0.125, layers=(0, 2), select_by="sketch").validate(cfg)
    plain = ffn_bytes_per_token(cfg, gen.params, hybrid)
    want = plain + 2 * (D * 4 + int(F * 0.125) * 4)  # float32 bias and the 16 dynamic neurons' means
    assert ffn_bytes_per_token(cfg, gen.params, dataclasses.replace(hybrid, compensate=True)) == want


@pytest.mark.parametrize("host", ["pinned_host", "numpy"])
def test_offloaded_compensation_equals_on_device(host, tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    method = Stability(keep=0.4, layers=(0, 2), compensate=True)
    want = gen.generate_ids(PROMPTS, 10, method=method, stop_at_eos=False, return_logits=True)
    offloaded = Generator(gen.cfg, gen.params, gen.tokenizer, offload=True, host_memory=host)
    got = offloaded.generate_ids(PROMPTS, 10, method=method, stop_at_eos=False, return_logits=True)
    plain = offloaded.generate_ids(PROMPTS, 10, method=dataclasses.replace(method, compensate=False),
                                   stop_at_eos=False, return_logits=True)
    assert got.tokens == want.tokens
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-5, rtol=0)
    assert np.abs(plain.logits - want.logits).max() > 1e-3, "the bias should reach the offloaded decode"


def test_refusals_are_one_clear_error(tiny_checkpoint) -> None:
    opt = Generator.load(tiny_checkpoint("opt")).cfg
    with pytest.raises(ValueError, match="compensation supports OPT models with ReLU, not 'gelu'"):
        Stability(keep=0.5, compensate=True).validate(dataclasses.replace(opt, hidden_act="gelu"))


def test_cli_and_sweep_name_compensated_rows(tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint("llama")
    result = run_main(main, "generate", "--checkpoint", ckpt, "--prompt", "hello", "--max-new-tokens", "3",
                      "--method", "stability", "--keep", "0.5", "--layers", "0:2", "--compensate", "--json")
    out = json.loads(result.stdout)
    assert result.returncode == 0 and out["compensate"] is True and len(out["core_neurons"]) == 2
    refused = run_main(main, "generate", "--checkpoint", ckpt, "--prompt", "hello", "--compensate")
    assert refused.returncode == 2 and "--compensate applies only to the sparse methods" in refused.stderr
    assert hybrid_arg("0.25+0.25:compensate:down") == {"keep": 0.25, "dynamic": 0.25, "compensate": True,
                                                       "down_weighted": True}
    labels = [m.label for m in sweep_methods(["normalized_magnitude"], [0.4], layers=(0, 2), compensate=True)]
    assert labels == ["dense", "stability keep 0.4 normalized_magnitude",
                      "stability keep 0.4 normalized_magnitude+comp"]
