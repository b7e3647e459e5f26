"""Real model shapes without checkpoints (`bench --shapes NAME --random-weights`), and compile
time vs depth (`bench --compile-depths`)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from coreinfer_jax import Generator, Stability
from coreinfer_jax.models.params import param_shapes
from coreinfer_jax.tools import bench, compile_time
from coreinfer_jax.tools.bench import markdown, peak_memory, run_random_bench
from coreinfer_jax.tools.cli import main
from coreinfer_jax.tools.roofline import bandwidth_probe
from coreinfer_jax.tools.shapes import HF_CONFIGS, ShapesError, model_config, random_params, random_prompt

# The parameter counts the models' own pages publish: the configs written out here must give
# exactly these (a wrong width, head count, tie or bias would not).
PUBLISHED_PARAMETERS = {"smollm2-135m": 134_515_008, "llama-3.2-1b": 1_235_814_400, "llama-3-8b": 8_030_261_248,
                        "qwen2.5-7b": 7_615_616_512, "opt-6.7b": 6_658_473_984}


def count(shapes) -> int:
    return sum(math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple)
                                                       and all(isinstance(i, int) for i in s)))


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_configs_have_the_published_parameter_counts(name) -> None:
    cfg, hf = model_config(name)
    assert count(param_shapes(cfg)) == PUBLISHED_PARAMETERS[name]
    assert hf["architectures"] == HF_CONFIGS[name]["architectures"]


def test_configs_keep_what_sets_numerics() -> None:
    llama32, _ = model_config("llama-3.2-1b")
    assert dict(llama32.rope_scaling)["rope_type"] == "llama3" and llama32.rope_theta == 500000.0
    assert llama32.tie_word_embeddings and llama32.eos_token_ids == (128001,)
    qwen, _ = model_config("qwen2.5-7b")
    assert qwen.qkv_bias and not qwen.o_bias and qwen.sliding_window is None and qwen.norm_eps == 1e-6
    opt, _ = model_config("opt-6.7b")
    assert (opt.family, opt.hidden_act, opt.position_offset) == ("opt", "relu", 2)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_tiny_keeps_the_layout_and_shrinks_the_widths(name) -> None:
    full, _ = model_config(name)
    tiny, _ = model_config(name, tiny=True)
    assert (tiny.architecture, tiny.family, tiny.rope_scaling, tiny.qkv_bias, tiny.tie_word_embeddings) == \
        (full.architecture, full.family, full.rope_scaling, full.qkv_bias, full.tie_word_embeddings)
    assert count(param_shapes(tiny)) < 1_000_000
    assert all(0 <= i < tiny.vocab_size for i in tiny.eos_token_ids)
    assert model_config(name, tiny=True, num_layers=7)[0].num_layers == 7


def test_unknown_names_and_bad_depths_are_clear_errors() -> None:
    with pytest.raises(ShapesError, match="unknown model shape 'llama-9'; known: smollm2-135m, llama-3.2-1b"):
        model_config("llama-9")
    with pytest.raises(ShapesError, match="at least one layer"):
        model_config("llama-3-8b", num_layers=0)


def test_random_params_have_the_shapes_dtype_and_init() -> None:
    cfg, _ = model_config("opt-6.7b", tiny=True)
    params = random_params(cfg, "bfloat16")
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes == jax.tree.map(tuple, param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
    layer = params["layers"][0]
    assert np.all(np.asarray(layer["attn_norm"]["scale"], np.float32) == 1)
    assert np.all(np.asarray(layer["ffn"]["b_up"], np.float32) == 0)
    assert np.std(np.asarray(layer["ffn"]["w_up"], np.float32)) == pytest.approx(0.02, rel=0.1)
    assert not np.array_equal(np.asarray(layer["attn"]["w_q"]), np.asarray(layer["attn"]["w_k"]))
    again = random_params(cfg, "bfloat16")
    assert np.array_equal(np.asarray(again["embed"]), np.asarray(params["embed"]))  # seeded


def test_random_params_straight_into_pinned_host_memory() -> None:
    cfg, _ = model_config("llama-3-8b", tiny=True)
    params = random_params(cfg, memory_kind="pinned_host")
    assert {x.sharding.memory_kind for x in jax.tree.leaves(params)} == {"pinned_host"}


def test_random_prompt_is_in_the_vocabulary_without_stop_tokens() -> None:
    cfg, _ = model_config("smollm2-135m", tiny=True)
    prompt = random_prompt(cfg, 200)
    assert len(prompt) == 200 and all(0 <= t < cfg.vocab_size for t in prompt)
    assert not set(prompt) & set(cfg.eos_token_ids) and prompt == random_prompt(cfg, 200)


def test_generator_without_a_tokenizer_decodes_ids() -> None:
    cfg, _ = model_config("qwen2.5-7b", tiny=True)
    gen = Generator(cfg, random_params(cfg), tokenizer=None)
    out = gen.generate_ids([random_prompt(cfg, 9)], max_new_tokens=5, method=Stability(keep=0.5), stop_at_eos=False)
    assert len(out.tokens[0]) == 5 and out.core_neurons.shape[-1] == cfg.intermediate_size // 2


def test_random_weight_bench_rows_report_compile_and_memory(monkeypatch) -> None:
    monkeypatch.setattr(bench, "bandwidth_probe", lambda: bandwidth_probe(16 << 20))  # not 512 MiB
    report = run_random_bench("llama-3.2-1b", [Stability(keep=0.5, layers=(0, 2))], new_tokens=4, reps=1, tiny=True)
    assert report["model"] == "llama-3.2-1b (tiny), random weights" and report["dtype"] == "float32"
    (row,) = report["rows"]
    assert row["compile_s"] > 0 and row["decode_tokens_per_s"] > 0
    assert row["peak_memory_bytes"] > 0 and row["peak_memory_kind"] == peak_memory()[1]
    table = markdown(report)
    assert "jax-stability-keep0.5" in table and "compile s" in table and "(RSS)" in table


def test_peak_memory_on_cpu_is_the_process_peak() -> None:
    assert jax.devices()[0].memory_stats() is None  # the CPU backend reports none
    bytes_, kind = peak_memory()
    assert kind == "process max RSS" and bytes_ > 50 * 2**20  # at least the interpreter and JAX


@pytest.mark.parametrize("args,words", [
    (["--shapes", "llama-9", "--random-weights"], "unknown model shape 'llama-9'; known: smollm2-135m"),
    (["--random-weights"], "--random-weights needs --shapes NAME (smollm2-135m, llama-3.2-1b"),
    (["--shapes", "llama-3-8b"], "--shapes needs --random-weights"),
    (["--tiny"], "--tiny applies to --shapes, --suite and --compile-depths"),
    (["--shapes", "llama-3-8b", "--random-weights", "--tiny", "--method", "hybrid", "--select-by", "predictor"],
     "random weights have none"),
])
def test_bad_options_are_one_line(args, words, capsys) -> None:
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_compile_seconds_per_stage(capsys) -> None:
    row = compile_time.compile_seconds("llama-3-8b", 2, Stability(keep=0.5))
    assert row["layers"] == 2 and row["method"] == "stability keep 0.5"
    for stage in ("prefill_lower_s", "prefill_compile_s", "gather_s", "decode_lower_s", "decode_compile_s"):
        assert row[stage] > 0, stage
    assert main(["bench", "--compile-depths", "1", "--shapes", "smollm2-135m", "--method", "dense"]) == 0
    table = capsys.readouterr().out
    assert "| 1 | dense |" in table and "smollm2-135m family at tiny width" in table
