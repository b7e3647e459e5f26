"""The hybrid method's estimate of the neurons it leaves out (`rest="sketch"`, `sparse.token_step`).

Expected values: a PyTorch restatement of decoding (dense pre-fill, the paper's core in NumPy,
per-token neurons ranked by a NumPy 4-bit restatement of the sketch, the rest's estimate
through a NumPy 4-bit down projection), NumPy restatements of the packing, and bytes by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import run_main
from coreinfer_jax import Generator, Hybrid
from coreinfer_jax.errors import MethodError
from coreinfer_jax.sparse.sketch import Sketch, pack_down, rest_output
from coreinfer_jax.tools.args import hybrid_arg
from coreinfer_jax.tools.cli import main
from coreinfer_jax.tools.roofline import ffn_bytes_per_token
from test_sketch import numpy_levels
from test_hybrid import assert_scores_equal_generation, torch_prompt_core
from test_sparse import PROMPTS, greedy_with_hooks


def sketched(w: torch.Tensor) -> torch.Tensor:
    """`w` `[R, C]` as the sketch holds it: 4-bit levels per row times the row's scale."""
    levels, scale = numpy_levels(w.detach().double().numpy())
    return torch.as_tensor(levels * scale[:, None], dtype=torch.float32)


def torch_rest_generate(model: torch.nn.Module, family: str, ids: list[int], keep: float, dynamic: float,
                        layers: range, n: int) -> list[int]:
    """`n` greedy tokens restated in PyTorch: a dense pre-fill of `ids` picks each sparse layer's
    core with the paper's rule (NumPy); each decode step computes the core and the `dynamic` other
    neurons of largest sketched |activation| (OPT: sketched pre-activation) exactly, and adds
    every other neuron's sketched activation times its 4-bit down-projection row."""
    acts, core = torch_prompt_core(model, family, ids, keep, layers)
    core = {i: torch.as_tensor(c) for i, c in core.items()}
    blocks = model.model.decoder.layers if family == "opt" else model.model.layers
    inputs, downs, sketches = {}, {}, {}
    for i in layers:
        if family == "opt":
            inputs[i], downs[i] = blocks[i].fc1, blocks[i].fc2
            sketches[i] = (sketched(blocks[i].fc1.weight),)
        else:
            inputs[i], downs[i] = blocks[i].mlp.gate_proj, blocks[i].mlp.down_proj
            sketches[i] = (sketched(blocks[i].mlp.gate_proj.weight), sketched(blocks[i].mlp.up_proj.weight))
    down_sketch = {i: sketched(downs[i].weight.T.contiguous()) for i in layers}  # [F, D], one row per neuron
    width = acts[layers[0]].shape[1]
    n_dynamic = int(width * dynamic)
    seen = {}

    def decode_out(i: int, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x = seen[i].reshape(-1)  # [D]
        if family == "opt":
            score = x @ sketches[i][0].T + inputs[i].bias  # [F]
            estimate = torch.relu(score)
        else:
            estimate = torch.nn.functional.silu(x @ sketches[i][0].T) * (x @ sketches[i][1].T)
            score = estimate.abs()
        score[core[i]] = -float("inf")
        chosen = torch.zeros(width)
        chosen[core[i]] = 1.0
        chosen[torch.topk(score, n_dynamic).indices] = 1.0
        exact = torch.nn.functional.linear(a.reshape(-1) * chosen, downs[i].weight, downs[i].bias)
        return (exact + (estimate * (1 - chosen)) @ down_sketch[i]).reshape(out.shape)

    hooks = []
    for i in layers:
        hooks.append(inputs[i].register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0])))
        hooks.append(downs[i].register_forward_hook(
            lambda m, a, o, i=i: decode_out(i, a[0], o) if a[0].numel() == a[0].shape[-1] else o))
    return greedy_with_hooks(model, ids, n, hooks)


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_rest_estimate_matches_a_pytorch_restatement(name, tiny_checkpoint, tiny_torch_model) -> None:
    gen = Generator.load(tiny_checkpoint(name))
    layers = (1, gen.cfg.num_layers)
    method = Hybrid(keep=0.2, dynamic=0.2, rule="paper", layers=layers, select_by="sketch",
                    rest="sketch").validate(gen.cfg)
    ours = gen.generate_ids(PROMPTS, 16, method=method, stop_at_eos=False, return_logits=True)
    zero = gen.generate_ids(PROMPTS, 16, method=dataclasses.replace(method, rest="zero"), stop_at_eos=False,
                            return_logits=True)
    assert not np.allclose(ours.logits, zero.logits, atol=1e-3), "the rest's estimate should change the logits"
    for b, ids in enumerate(PROMPTS):
        want = torch_rest_generate(tiny_torch_model(name), gen.cfg.family, ids, 0.2, 0.2, method.sparse_layers(), 16)
        assert ours.tokens[b] == want
        # Alone, a gated model's steps read the sketch's rows outside the core (`sketch.outside_rows`).
        assert gen.generate_ids([ids], 16, method=method, stop_at_eos=False).tokens[0] == want


@pytest.mark.parametrize("D", [6, 5])
def test_down_sketch_packing_and_product_equal_numpy(D) -> None:
    F = 7
    w = np.random.default_rng(D).standard_normal((F, D)).astype(np.float32)  # [F, D]
    packed, scales = pack_down(jnp.asarray(w))
    levels, want_scales = numpy_levels(w.astype(np.float64))  # [F, D], [F]
    packed = np.asarray(packed).astype(np.int64)
    half = (D + 1) // 2
    assert packed.shape == (half, F)
    np.testing.assert_array_equal((packed & 15) - 8, levels[:, :half].T)  # outputs 0..half-1: the low nibble
    np.testing.assert_array_equal(((packed >> 4) - 8)[: D - half], levels[:, half:].T)
    np.testing.assert_array_equal(packed[D - half:] >> 4, 8 * np.ones((2 * half - D, F)))  # an odd D's padding: level 0
    np.testing.assert_allclose(np.asarray(scales), want_scales, rtol=1e-6)
    hidden = np.random.default_rng(1).standard_normal((2, 3, F)).astype(np.float32)  # [B, T, F]
    got = rest_output({"down": jnp.asarray(packed.astype(np.uint8)), "down_scales": scales}, jnp.asarray(hidden), D)
    np.testing.assert_allclose(np.asarray(got), hidden @ (levels * want_scales[:, None]), rtol=1e-5, atol=1e-5)


def test_all_neurons_exact_leaves_no_rest(tiny_checkpoint) -> None:
    """keep + dynamic = 1: no neuron is left to estimate, so the output is dense's."""
    gen = Generator.load(tiny_checkpoint("llama"))
    method = Hybrid(keep=0.5, dynamic=0.5, layers=(0, gen.cfg.num_layers), rest="sketch")
    dense = gen.generate_ids(PROMPTS, 10, stop_at_eos=False, return_logits=True)
    got = gen.generate_ids(PROMPTS, 10, method=method, stop_at_eos=False, return_logits=True)
    assert got.tokens == dense.tokens
    np.testing.assert_allclose(got.logits, dense.logits, atol=1e-4)


@pytest.mark.parametrize("keep,dynamic", [(0.2, 0.3), (0.3, 0.0)])
def test_teacher_forced_scores_equal_generation_logits(keep, dynamic, tiny_checkpoint) -> None:
    assert_scores_equal_generation(Generator.load(tiny_checkpoint("llama")),
                                   Hybrid(keep=keep, dynamic=dynamic, layers=(0, 2), rest="sketch"))


def test_defaults_and_bytes_by_hand(tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    cfg = gen.cfg
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers  # 64, 128, 2
    assert Hybrid().validate(cfg).rest == "sketch"
    assert Hybrid(select_by="oracle").validate(cfg).rest == "zero"  # the estimate needs the sketch
    assert Hybrid(compensate=True).validate(cfg).rest == "zero"  # which would fill the same neurons
    method = Hybrid(keep=0.25, dynamic=0.125, layers=(1, 2), rest="sketch").validate(cfg)
    assert method.label == "hybrid 0.25+0.125 int4+rest normalized_magnitude"
    rows = 32 + 16  # int(128 * 0.25) + int(128 * 0.125)
    # A batch of one reads the sketch of the 96 neurons outside its core: a byte per (gate, up) weight
    # pair and two float32 scales per neuron; a byte per two of its down weights and a float32 scale.
    sketch = 96 * D + 2 * 96 * 4
    down = D // 2 * 96 + 96 * 4
    assert ffn_bytes_per_token(cfg, gen.params, method) == (L - 1) * 3 * F * D * 4 + 3 * rows * D * 4 + sketch + down
    static_only = Hybrid(keep=0.25, dynamic=0.0, layers=(1, 2), rest="sketch").validate(cfg)
    assert ffn_bytes_per_token(cfg, gen.params, static_only) == (L - 1) * 3 * F * D * 4 + 3 * 32 * D * 4 + sketch + down


@pytest.mark.parametrize("kwargs,words", [
    ({"rest": "mean"}, "rest must be one of zero, sketch"),
    ({"rest": "sketch", "select_by": "oracle"}, "needs select_by='sketch'"),
    ({"rest": "sketch", "compensate": True}, "no compensation"),
    ({"rest": "sketch", "predictor": "SKETCH"}, "a sketch with the down projection"),
])
def test_bad_rest_settings_are_one_clear_error(kwargs, words, tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    if kwargs.get("predictor") == "SKETCH":
        kwargs = dict(kwargs, predictor=Sketch.build(gen.params, (1, 2)), layers=(1, 2))
    with pytest.raises(MethodError, match=words):
        Hybrid(**kwargs).validate(gen.cfg)


def test_rest_on_the_command_line(tiny_checkpoint, tmp_path) -> None:
    ckpt = str(tiny_checkpoint("llama"))
    rows = {}
    for rest in ("zero", "sketch"):
        run = run_main(main, "generate", "--checkpoint", ckpt, "--prompt", "The quick brown fox", "--max-new-tokens",
                       "4", "--method", "hybrid", "--rest", rest, "--json")
        assert run.returncode == 0, run.stderr
        rows[rest] = json.loads(run.stdout)
    assert rows["zero"]["rest"] == "zero" and rows["sketch"]["rest"] == "sketch"
    F, D = 128, 64
    # The down projection's sketch of the 98 neurons outside the core of int(128 * 0.24) = 30: a byte per
    # two of a neuron's down weights, a float32 scale per neuron.
    assert rows["sketch"]["ffn_bytes_per_token"] - rows["zero"]["ffn_bytes_per_token"] == (F - 30) * (D // 2 + 4)
    run = run_main(main, "generate", "--checkpoint", ckpt, "--prompt", "x", "--method", "stability", "--rest", "zero")
    assert run.returncode != 0 and "--rest apply to --method hybrid" in run.stderr
    assert "Traceback" not in run.stderr


def test_rest_in_sweep_specs_and_lm_eval(tiny_checkpoint) -> None:
    from coreinfer_jax.evaluation.lm_eval_adapter import CoreInferLM

    assert hybrid_arg("0.24+0.24:rest=zero") == {"keep": 0.24, "dynamic": 0.24, "rest": "zero"}
    with pytest.raises(argparse.ArgumentTypeError, match="rest=zero or rest=sketch"):
        hybrid_arg("0.24+0.24:rest=mean")
    lm = CoreInferLM.create_from_arg_string(f"checkpoint={tiny_checkpoint('llama')},method=hybrid,rest=zero")
    assert lm.method.rest == "zero" and lm.method.select_by == "sketch"
