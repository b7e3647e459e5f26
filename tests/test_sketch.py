"""The hybrid method's 4-bit sketch predictor (`sparse.sketch`) and the defaults built on it.

Expected values are restated in NumPy (quantisation, packing, scores), by hand (bytes), or
come from the oracle mode, which `test_hybrid` checks against a PyTorch restatement.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_main
from coreinfer_jax import Dense, Generator, Hybrid
from coreinfer_jax.calibrate.predictor import fit_predictor
from coreinfer_jax.errors import MethodError
from coreinfer_jax.models.forward import activation_fn
from coreinfer_jax.runtime import engine
from coreinfer_jax.sparse.predictor import PredictorError
from coreinfer_jax.sparse.sketch import Sketch, outside_rows, quantize_rows, sketch_estimate
from coreinfer_jax.tools.cli import main
from coreinfer_jax.tools.roofline import ffn_bytes_per_token
from test_sparse import PROMPTS


def numpy_levels(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit rounding per row, restated: levels -7..7 and scale max|row| / 7."""
    scale = np.abs(w).max(axis=1) / 7
    return np.clip(np.round(w / scale[:, None]), -7, 7), scale


def numpy_silu(z: np.ndarray) -> np.ndarray:
    return z / (1 + np.exp(-z))


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_sketch_equals_a_numpy_restatement(name, tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint(name))
    L = gen.cfg.num_layers
    sketch = Sketch.build(gen.params, (0, L))
    x = np.random.default_rng(1).standard_normal((3, gen.cfg.hidden_size)).astype(np.float32)  # [N, D]
    for j, factors in enumerate(sketch.layer_factors(0, L)):
        ffn = {k: np.asarray(v, np.float64) for k, v in gen.params["layers"][j]["ffn"].items()}
        packed = np.asarray(factors["packed"]).astype(np.int64)
        low, high = (packed & 15) - 8, (packed >> 4) - 8
        if name == "llama":  # low nibble gate, high nibble up
            parts = [numpy_levels(ffn["w_gate"]), numpy_levels(ffn["w_up"])]
        else:  # fc1's first and second halves of rows
            half = ffn["w_up"].shape[0] // 2
            parts = [numpy_levels(ffn["w_up"][:half]), numpy_levels(ffn["w_up"][half:])]
        np.testing.assert_array_equal(low, parts[0][0])
        np.testing.assert_array_equal(high, parts[1][0])
        np.testing.assert_allclose(np.asarray(factors["scales"]), [parts[0][1], parts[1][1]], rtol=1e-6)
        approx = [levels * scale[:, None] for levels, scale in parts]  # the weights as the sketch holds them
        if name == "llama":
            hidden = numpy_silu(x @ approx[0].T) * (x @ approx[1].T)
            want = np.abs(hidden)
        else:
            want = x @ np.concatenate(approx).T + ffn["b_up"]
            hidden = np.maximum(want, 0)
        got, got_hidden = sketch_estimate(factors, gen.params["layers"][j]["ffn"], jnp.asarray(x),
                                          activation_fn(gen.cfg), name == "opt")
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got_hidden), hidden, rtol=1e-4, atol=1e-5)


def test_an_all_zero_row_is_level_zero_with_a_finite_scale() -> None:
    w = np.array([[0.0, 0.0, 0.0], [0.6, -1.4, 0.2]], np.float32)  # row 1: scale 1.4 / 7 = 0.2, levels 3, -7, 1
    q, scale = quantize_rows(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(q), [[8, 8, 8], [11, 1, 9]])  # stored as level + 8
    assert np.isfinite(np.asarray(scale)).all() and float(scale[1]) == pytest.approx(0.2)


def on_the_grid(gen: Generator) -> Generator:
    """`gen` with every input-projection row a multiple of one step by integers -7..7 (each row
    reaching 7): the sketch then holds these weights exactly."""
    rng = np.random.default_rng(2)
    layers = []
    for layer in gen.params["layers"]:
        ffn = dict(layer["ffn"])
        for name in ("w_gate", "w_up"):
            if name in ffn:
                F, D = ffn[name].shape
                levels = rng.integers(-7, 8, (F, D)).astype(np.float32)
                levels[:, 0] = 7
                step = rng.uniform(0.01, 0.05, (F, 1)).astype(np.float32)
                ffn[name] = jnp.asarray(levels * step)
        layers.append(dict(layer, ffn=ffn))
    return Generator(gen.cfg, dict(gen.params, layers=layers), gen.tokenizer)


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_on_exactly_representable_weights_the_sketch_picks_the_true_activations_neurons(name, tiny_checkpoint) -> None:
    gen = on_the_grid(Generator.load(tiny_checkpoint(name)))
    layers = (0, gen.cfg.num_layers)
    oracle = gen.generate_ids(PROMPTS, 12, method=Hybrid(keep=0.25, dynamic=0.25, layers=layers, select_by="oracle"),
                              stop_at_eos=False, return_logits=True)
    sketch = gen.generate_ids(PROMPTS, 12, method=Hybrid(keep=0.25, dynamic=0.25, layers=layers, select_by="sketch",
                                                         rest="zero"), stop_at_eos=False, return_logits=True)
    dense = gen.generate_ids(PROMPTS, 12, stop_at_eos=False, return_logits=True)
    assert sketch.tokens == oracle.tokens
    np.testing.assert_allclose(sketch.logits, oracle.logits, atol=1e-4)
    assert not np.allclose(sketch.logits, dense.logits, atol=1e-3), "half the neurons should change the logits"


def test_default_hybrid_is_the_recommended_sketch_configuration_built_once(tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    L = gen.cfg.num_layers
    method = Hybrid().validate(gen.cfg)
    assert (method.keep, method.dynamic, method.rule, method.select_by, method.layers) == \
        (0.24, 0.24, "normalized_magnitude", "sketch", (1, L))
    assert method.label == "hybrid 0.24+0.24 int4+rest normalized_magnitude"
    with pytest.raises(PredictorError, match="needs a predictor"):  # ReLU models: the fitted predictor
        Hybrid().validate(Generator.load(tiny_checkpoint("opt")).cfg)
    programs = engine.prefill, engine.decode
    first = gen.generate_ids([[5, 6, 7]], 8, method=Hybrid())
    sizes = [f._cache_size() for f in programs]
    again = gen.generate_ids([[9, 10, 11, 12]], 8, method=Hybrid())
    assert [f._cache_size() for f in programs] == sizes
    assert len(first.tokens[0]) == len(again.tokens[0]) == 8
    assert [type(v) for v in gen.derived.values()] == [Sketch]


def test_sketch_bytes_by_hand(tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    cfg = gen.cfg
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers  # 64, 128, 2
    dense = ffn_bytes_per_token(cfg, gen.params, Dense())
    assert dense == L * 3 * F * D * 4
    method = Hybrid(keep=0.25, dynamic=0.125, layers=(1, 2), select_by="sketch", rest="zero").validate(cfg)
    rows = 32 + 16  # int(128 * 0.25) + int(128 * 0.125)
    # A batch of one reads the sketch of the 96 neurons outside its core of 32: a byte per (gate, up)
    # weight pair, two float32 scales per neuron.
    sketch = (F - 32) * D + 2 * (F - 32) * 4
    assert ffn_bytes_per_token(cfg, gen.params, method) == (L - 1) * 3 * F * D * 4 + 3 * rows * D * 4 + sketch
    weighted = dataclasses.replace(method, down_weighted=True)  # and the 96 neurons' float32 down-row norms
    assert ffn_bytes_per_token(cfg, gen.params, weighted) == (L - 1) * 3 * F * D * 4 + 3 * rows * D * 4 + sketch + \
        (F - 32) * 4
    per_token_only = Hybrid(keep=0.0, dynamic=0.125, layers=(1, 2), select_by="sketch", rest="zero").validate(cfg)
    assert ffn_bytes_per_token(cfg, gen.params, per_token_only) == \
        (L - 1) * 3 * F * D * 4 + 3 * 16 * D * 4 + F * D + 2 * F * 4  # no core: the whole sketch


def test_outside_rows_are_the_sketch_of_the_neurons_outside_the_core(tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    ffn = dict(gen.params["layers"][1]["ffn"], b_gate=jnp.arange(128.0), b_up=-jnp.arange(128.0))
    factors = Sketch.build({"layers": [{"ffn": ffn}]}, (0, 1), down=True).factors[0]
    core = np.random.default_rng(0).choice(128, 40, replace=False)
    mask = np.zeros((1, 128), bool)
    mask[0, core] = True
    norms = jnp.linspace(1.0, 2.0, 128)
    got = {k: np.asarray(v) for k, v in outside_rows(factors, ffn, jnp.asarray(mask), norms, size=88).items()}
    ids = np.setdiff1d(np.arange(128), core)  # increasing
    np.testing.assert_array_equal(got.pop("ids"), ids)
    full = {k: np.asarray(v) for k, v in factors.items()}
    np.testing.assert_array_equal(got.pop("packed"), full["packed"][ids])
    np.testing.assert_array_equal(got.pop("scales"), full["scales"][:, ids])
    np.testing.assert_array_equal(got.pop("down"), full["down"][:, ids])  # output-major: a column per neuron
    np.testing.assert_array_equal(got.pop("down_scales"), full["down_scales"][ids])
    np.testing.assert_array_equal(got.pop("b_gate"), ids.astype(np.float32))
    np.testing.assert_array_equal(got.pop("b_up"), -ids.astype(np.float32))
    np.testing.assert_array_equal(got.pop("down_norm"), np.asarray(norms)[ids])
    assert not got


ALONE = {"default": Hybrid(),
         "down-weighted, no rest": Hybrid(keep=0.25, dynamic=0.25, rest="zero", down_weighted=True),
         "compensated": Hybrid(keep=0.25, dynamic=0.25, compensate=True),
         "no per-token rows, the rest estimated": Hybrid(keep=0.25, dynamic=0.0, rest="sketch")}


@pytest.mark.parametrize("kind", list(ALONE))
def test_a_prompt_alone_decodes_as_in_a_batch(kind, tiny_checkpoint) -> None:
    """Alone, a prompt's steps rank the sketch's rows outside its core, gathered once
    (`outside_rows`); in a batch they rank every row with the core masked out, as the PyTorch
    restatement of `test_rest` does: the same neurons, so the same tokens."""
    gen = Generator.load(tiny_checkpoint("llama"))
    method = dataclasses.replace(ALONE[kind], layers=(0, 2)).validate(gen.cfg)
    prompts = [np.random.default_rng(b).integers(3, 300, size=n).tolist() for b, n in enumerate((14, 9, 5))]
    batch = gen.generate_ids(prompts, 16, method=method, stop_at_eos=False, return_logits=True)
    for b, prompt in enumerate(prompts):
        alone = gen.generate_ids([prompt], 16, method=method, stop_at_eos=False, return_logits=True)
        assert alone.tokens[0] == batch.tokens[b]
        np.testing.assert_allclose(alone.logits[0], batch.logits[b], atol=1e-4)
    core = np.asarray(alone.core_neurons)  # [1, 2, K]
    weights = method.decode_weights(gen.params, jnp.asarray(core))["layers"]
    assert all(weights[i]["ffn"]["outside"]["packed"].shape == (128 - core.shape[-1], 64) for i in (0, 1))
    assert "outside" not in method.decode_weights(gen.params, jnp.asarray(batch.core_neurons))["layers"][0]["ffn"]


def test_sketch_errors(tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    tokens = list(np.random.default_rng(0).integers(3, 300, size=4 * 64 * 4))
    predictor = fit_predictor(gen, tokens, rank=4, layers=(0, 2), window=64, progress=False)
    with pytest.raises(MethodError, match="a fitted predictor is for select_by='predictor'"):
        Hybrid(select_by="sketch", predictor=predictor).validate(gen.cfg)
    with pytest.raises(PredictorError, match="the sketch covers layers 1:2, not the sparse layers 0:2"):
        Hybrid(select_by="sketch", predictor=Sketch.build(gen.params, (1, 2)), layers=(0, 2)).validate(gen.cfg)
    assert Hybrid(predictor=predictor).validate(gen.cfg).select_by == "predictor"


def test_method_hybrid_alone_runs_from_the_command_line(tiny_checkpoint) -> None:
    run = run_main(main, "generate", "--checkpoint", str(tiny_checkpoint("llama")), "--prompt", "The quick brown fox",
                   "--max-new-tokens", "4", "--method", "hybrid", "--json")
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout)
    assert (row["select_by"], row["keep"], row["dynamic"], row["layers"]) == ("sketch", 0.24, 0.24, [1, 2])
    assert row["ffn_bytes_per_token"] < row["dense_ffn_bytes_per_token"]
