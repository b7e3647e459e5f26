"""The converter: key table round trip on every tiny family, source layouts, dtypes and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from conftest import TINY_CONFIGS, build_tiny_tokenizer, run_main
from convert import convert_checkpoint, keymap, torch_model_from_checkpoint
from convert.__main__ import main as convert_main
from convert.core import end_tokens
from coreinfer_jax.models.checkpoint import CheckpointError, load_checkpoint, load_metadata, load_params
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import count_params, flat_shapes, param_shapes, path_str

REPO = Path(__file__).resolve().parents[1]


def _hf_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(f, framework="np") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
    return tensors


def _flat(params: dict) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_same_params(a: dict, b: dict) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_every_tiny_config_converts_through_the_key_table(name: str, tiny_hf_dir: Callable[[str], Path],
                                                          tiny_checkpoint: Callable[[str], Path],
                                                          tiny_torch_model: Callable[[str], PreTrainedModel],
                                                          tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    cfg, params, tokenizer = load_checkpoint(tiny_checkpoint(name))
    hf_config = tiny_torch_model(name).config
    assert cfg.tie_word_embeddings == hf_config.tie_word_embeddings
    assert jax.tree.map(lambda x: x.shape, params) == param_shapes(cfg)

    hf = _hf_tensors(tiny_hf_dir(name))
    flat = _flat(params)
    assert flat.keys() == flat_shapes(cfg).keys()
    assert {x.dtype for x in flat.values()} == {np.dtype(np.float32)}
    # The key table run backwards gives back every HF tensor exactly (fused ones re-fused).
    back = keymap.hf_tensors(cfg, flat)
    assert back.keys() == hf.keys() - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    for hf_name, array in back.items():
        np.testing.assert_array_equal(array, hf[hf_name], err_msg=hf_name)

    meta = load_metadata(tiny_checkpoint(name))
    assert meta["source"] == str(tiny_hf_dir(name))
    assert meta["source_format"] == "hf-safetensors"
    assert meta["architecture"] == hf_config.architectures[0] == cfg.architecture
    assert meta["dtype"] == "float32"
    assert meta["parameter_count"] == count_params(params) == tiny_torch_model(name).num_parameters()

    text = "The quick brown fox jumps over the lazy dog."
    assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]


def test_transposes_follow_the_documented_layout(tiny_checkpoint: Callable[[str], Path],
                                                 tiny_torch_model: Callable[[str], PreTrainedModel]) -> None:
    _, params, _ = load_checkpoint(tiny_checkpoint("llama"))
    layer = tiny_torch_model("llama").model.layers[0]
    np.testing.assert_array_equal(params["layers"][0]["attn"]["w_q"], layer.self_attn.q_proj.weight.detach().T)
    np.testing.assert_array_equal(params["layers"][0]["ffn"]["w_up"], layer.mlp.up_proj.weight.detach())
    np.testing.assert_array_equal(params["layers"][0]["ffn"]["w_down"], layer.mlp.down_proj.weight.detach().T)


def test_fused_and_renamed_tensors_follow_transformers(tiny_checkpoint: Callable[[str], Path],
                                                       tiny_torch_model: Callable[[str], PreTrainedModel]) -> None:
    # Phi-3 stacks q, k, v (heads * head_dim rows, then kv heads * head_dim twice) and gate, up.
    _, params, _ = load_checkpoint(tiny_checkpoint("phi3"))
    layer, phi3 = params["layers"][1], tiny_torch_model("phi3").model.layers[1]
    q, kv = 4 * 16, 2 * 16
    qkv = phi3.self_attn.qkv_proj.weight.detach().numpy()
    np.testing.assert_array_equal(layer["attn"]["w_q"], qkv[:q].T)
    np.testing.assert_array_equal(layer["attn"]["w_k"], qkv[q:q + kv].T)
    np.testing.assert_array_equal(layer["attn"]["w_v"], qkv[q + kv:].T)
    gate_up = phi3.mlp.gate_up_proj.weight.detach().numpy()
    np.testing.assert_array_equal(layer["ffn"]["w_gate"], gate_up[:128])
    np.testing.assert_array_equal(layer["ffn"]["w_up"], gate_up[128:])
    # Gemma's `post_attention_layernorm` follows the attention; `pre_feedforward_layernorm` precedes the FFN.
    _, params, _ = load_checkpoint(tiny_checkpoint("gemma3"))
    layer, gemma = params["layers"][0], tiny_torch_model("gemma3").model.layers[0]
    for ours, theirs in (("attn_norm", gemma.input_layernorm), ("post_attn_norm", gemma.post_attention_layernorm),
                         ("ffn_norm", gemma.pre_feedforward_layernorm),
                         ("post_ffn_norm", gemma.post_feedforward_layernorm)):
        np.testing.assert_array_equal(layer[ours]["scale"], theirs.weight.detach().numpy(), err_msg=ours)
    np.testing.assert_array_equal(layer["attn"]["k_norm"], gemma.self_attn.k_norm.weight.detach().numpy())


@pytest.mark.parametrize("name", ["phi3", "gemma3"])
def test_export_rebuilds_the_transformers_model(name: str, tiny_checkpoint: Callable[[str], Path],
                                                tiny_torch_model: Callable[[str], PreTrainedModel]) -> None:
    model = torch_model_from_checkpoint(tiny_checkpoint(name), attn_implementation="eager")
    ids = torch.tensor([[5, 17, 33, 100, 2, 9, 250, 41, 7, 61, 3, 90]])
    with torch.no_grad():
        np.testing.assert_array_equal(model(ids).logits.numpy(), tiny_torch_model(name)(ids).logits.numpy())


def test_key_table_aliases_and_ignored_names(tiny_checkpoint: Callable[[str], Path]) -> None:
    opt = ModelConfig.load(tiny_checkpoint("opt") / "config.json")
    assert keymap.lookup(opt, "decoder.layers.1.fc2.weight") == keymap.Target(("layers/1/ffn/w_down",),
                                                                              keymap.TRANSPOSE)
    assert keymap.lookup(opt, "lm_head.weight") is None  # tied
    llama = ModelConfig.load(tiny_checkpoint("llama") / "config.json")
    assert keymap.lookup(llama, "model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert keymap.lookup(llama, "lm_head.weight") == keymap.Target(("lm_head",), keymap.AS_IS)


def _save_bin(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: Path, shards: int) -> None:
    # Transformers 5 only writes safetensors, so write the legacy torch layout by hand.
    path.mkdir()
    model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    state = model.state_dict()
    names = list(state)
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return
    weight_map = {}
    for s in range(shards):
        file = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[s::shards]}
        torch.save(part, path / file)
        weight_map.update(dict.fromkeys(part, file))
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("name", ["llama", "opt_350m_like"])
@pytest.mark.parametrize("layout", ["sharded-safetensors", "bin", "sharded-bin"])
def test_other_layouts_convert_to_identical_params(name: str, layout: str, tmp_path: Path,
                                                   tiny_checkpoint: Callable[[str], Path],
                                                   tiny_torch_model: Callable[[str], PreTrainedModel],
                                                   tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    src = tmp_path / "src"
    model = tiny_torch_model(name)
    if layout == "sharded-safetensors":
        model.save_pretrained(src, safe_serialization=True, max_shard_size="20KB")
        tiny_tokenizer.save_pretrained(src)
        assert (src / "model.safetensors.index.json").exists() and len(list(src.glob("*.safetensors"))) > 1
        # A second copy of every weight beside the shards, as Mistral's repositories ship: the index wins.
        save_file({n: t.clone().contiguous() for n, t in model.state_dict().items()}, src / "consolidated.safetensors")
    else:
        _save_bin(model, tiny_tokenizer, src, shards=1 if layout == "bin" else 3)
    out = convert_checkpoint(src, tmp_path / "out")
    cfg = ModelConfig.load(out / "config.json")
    reference = tiny_checkpoint(name)
    _assert_same_params(load_params(out, cfg), load_params(reference, ModelConfig.load(reference / "config.json")))
    assert load_metadata(out)["source_format"] == ("hf-safetensors" if layout == "sharded-safetensors" else "hf-bin")


def test_bfloat16_is_stored_as_bfloat16(tmp_path: Path, tiny_hf_dir: Callable[[str], Path],
                                        tiny_checkpoint: Callable[[str], Path]) -> None:
    out = convert_checkpoint(tiny_hf_dir("qwen2"), tmp_path / "bf16", dtype="bfloat16")
    cfg, params, _ = load_checkpoint(out)
    assert load_metadata(out)["dtype"] == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jax.numpy.bfloat16)}
    _, reference, _ = load_checkpoint(tiny_checkpoint("qwen2"))
    _assert_same_params(params, jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), reference))
    # Loading casts too: a float32 checkpoint read as bfloat16 holds the same values, and the reverse.
    _, cast, _ = load_checkpoint(tiny_checkpoint("qwen2"), "bfloat16")
    _assert_same_params(cast, params)
    _, widened, _ = load_checkpoint(out, "float32")
    _assert_same_params(widened, jax.tree.map(lambda x: x.astype(jax.numpy.float32), params))


def test_a_checkpoint_missing_a_part_is_named(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    for part in ("config.json", "metadata.json", "params", "tokenizer"):
        broken = tmp_path / part
        shutil.copytree(tiny_checkpoint("llama"), broken)
        (shutil.rmtree if (broken / part).is_dir() else os.remove)(broken / part)
        with pytest.raises(CheckpointError, match=f"^{broken} is not a converted checkpoint: {part} is missing$"):
            load_checkpoint(broken)


def test_force_replaces_an_existing_checkpoint(tmp_path: Path, tiny_hf_dir: Callable[[str], Path]) -> None:
    out = convert_checkpoint(tiny_hf_dir("llama"), tmp_path / "out")
    (out / "stale").write_text("old")
    convert_checkpoint(tiny_hf_dir("opt"), out, force=True)
    assert not (out / "stale").exists()
    assert load_metadata(out)["architecture"] == "OPTForCausalLM"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_end_tokens_come_from_the_generation_config_and_named_special_tokens(
        tmp_path: Path, tiny_hf_dir: Callable[[str], Path], tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_hf_dir("llama"), src)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 9]}))
    cfg = load_checkpoint(convert_checkpoint(src, tmp_path / "out"))[0]
    assert cfg.eos_token_ids == (2, 7, 9)  # config.json's </s> first, each once
    # Special tokens with an end text count (Qwen's <|endoftext|>, Gemma's <end_of_turn>);
    # the same text as an ordinary token, or a special token with another text, does not.
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>"]})
    tok.add_tokens(["<end_of_turn>"])
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<end_of_turn>"])
    cfg = dataclasses.replace(cfg, vocab_size=len(tok), eos_token_ids=(2,))
    assert end_tokens(cfg, tok, [5]) == (2, 5, ids[0])
    assert end_tokens(cfg, tiny_tokenizer) == (2,)


def run_convert(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_main(convert_main, *args)


def run_convert_process(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A real `python -m convert`, for settings read from the environment when Python starts."""
    return subprocess.run([sys.executable, "-m", "convert", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO), **env), timeout=300)


def assert_clean_error(proc: subprocess.CompletedProcess[str], out: Path, *words: str) -> None:
    """Exit 2, one `error:` line naming `words`, no traceback, nothing written next to `out`."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists()
    assert not list(out.parent.glob("*.partial")) and not list(out.parent.glob(".*.partial"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_error_missing_source(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_clean_error(run_convert(tmp_path / "nope", "--out", out), out, "does not exist", "nope")


def test_error_a_file_that_is_not_a_gguf(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").write_text("not weights")
    out = tmp_path / "out"
    assert_clean_error(run_convert(tmp_path / "weights.txt", "--out", out), out,
                       "weights.txt is neither a checkpoint directory nor a .gguf file")


def test_error_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_clean_error(run_convert(tmp_path / "empty", "--out", out), out, "config.json")


def test_error_unsupported_architecture(tmp_path: Path, tiny_hf_dir: Callable[[str], Path]) -> None:
    src = _copy(tiny_hf_dir("llama"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, architectures=["GPT2LMHeadModel"])))
    out = tmp_path / "out"
    assert_clean_error(run_convert(src, "--out", out), out, "unsupported architecture", "GPT2LMHeadModel",
                       "LlamaForCausalLM")


def test_error_truncated_safetensors(tmp_path: Path, tiny_hf_dir: Callable[[str], Path]) -> None:
    src = _copy(tiny_hf_dir("llama"), tmp_path / "src")
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert_clean_error(run_convert(src, "--out", out), out, str(weights))


class _OpensAFile:
    """Unpickled, it opens (creates) `path`: what a malicious `.bin` could do instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> tuple:
        return open, (str(self.path), "w")


def test_error_a_bin_that_runs_code_is_refused_unrun(tmp_path: Path, tiny_torch_model: Callable[[str], PreTrainedModel],
                                                      tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    src, out, ran = tmp_path / "src", tmp_path / "out", tmp_path / "ran"
    _save_bin(tiny_torch_model("llama"), tiny_tokenizer, src, shards=1)
    torch.save({"model.embed_tokens.weight": _OpensAFile(ran)}, src / "pytorch_model.bin")
    assert_clean_error(run_convert(src, "--out", out), out, "cannot read torch checkpoint", "pytorch_model.bin")
    assert not ran.exists()


def test_error_a_bin_holding_more_than_tensors(tmp_path: Path, tiny_torch_model: Callable[[str], PreTrainedModel],
                                               tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    model = tiny_torch_model("llama")
    _save_bin(model, tiny_tokenizer, src, shards=1)
    torch.save({**model.state_dict(), "step": 3}, src / "pytorch_model.bin")  # plain values load with weights_only
    assert_clean_error(run_convert(src, "--out", out), out, "pytorch_model.bin is not a state dict of tensors")


def test_error_wrong_shape(tmp_path: Path, tiny_hf_dir: Callable[[str], Path]) -> None:
    src = _copy(tiny_hf_dir("llama"), tmp_path / "src")
    name = "model.layers.1.mlp.down_proj.weight"
    _rewrite_weights(src, lambda t: t.update({name: torch.zeros(64, 100)}))
    out = tmp_path / "out"
    assert_clean_error(run_convert(src, "--out", out), out, name, "[64, 100]", "[64, 128]")


def test_error_unmapped_tensor(tmp_path: Path, tiny_hf_dir: Callable[[str], Path]) -> None:
    src = _copy(tiny_hf_dir("llama"), tmp_path / "src")
    name = "model.layers.0.mlp.extra_proj.weight"
    _rewrite_weights(src, lambda t: t.update({name: torch.zeros(4, 4)}))
    out = tmp_path / "out"
    assert_clean_error(run_convert(src, "--out", out), out, "unexpected tensor", name)


def test_error_missing_tensor(tmp_path: Path, tiny_hf_dir: Callable[[str], Path]) -> None:
    src = _copy(tiny_hf_dir("qwen2"), tmp_path / "src")
    name = "model.layers.1.self_attn.k_proj.bias"
    _rewrite_weights(src, lambda t: t.pop(name))
    out = tmp_path / "out"
    assert_clean_error(run_convert(src, "--out", out), out, "missing 1 tensor", name)


def test_error_duplicate_tensor(tmp_path: Path, tiny_torch_model: Callable[[str], PreTrainedModel],
                                tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    src = tmp_path / "src"
    tiny_torch_model("llama").save_pretrained(src, safe_serialization=True, max_shard_size="20KB")
    tiny_tokenizer.save_pretrained(src)
    first, second = sorted(src.glob("*.safetensors"))[:2]
    a, b = load_file(first), load_file(second)
    name = next(iter(a))
    save_file({**b, name: a[name]}, second, metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_clean_error(run_convert(src, "--out", out), out, "duplicate tensor", name)


def test_error_existing_out_without_force(tmp_path: Path, tiny_hf_dir: Callable[[str], Path]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    proc = run_convert(tiny_hf_dir("llama"), "--out", out)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ")
    assert "already exists" in proc.stderr and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep"]
    assert not list(tmp_path.glob(".*.partial"))


def test_error_out_required_for_directories(tiny_hf_dir: Callable[[str], Path]) -> None:
    proc = run_convert(tiny_hf_dir("llama"))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: --out is required when converting {tiny_hf_dir('llama')} "
        f"(only the bundled smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b have a default)")


def test_no_source_reports_an_existing_default_checkpoint(tmp_path: Path,
                                                          tiny_checkpoint: Callable[[str], Path]) -> None:
    # Stand-in for a finished SmolLM2 conversion: only its metadata is looked at.
    default = _copy(tiny_checkpoint("llama"), tmp_path / "smollm2-135m")
    meta = json.loads((default / "metadata.json").read_text())
    (default / "metadata.json").write_text(json.dumps(dict(meta, source="smollm2-135m")))
    proc = run_convert_process(env={"COREINFER_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"smollm2-135m is already converted in {default} (use --force to convert again)"


@pytest.mark.slow
def test_smollm2_converts(smollm2_checkpoint: Path) -> None:
    # The session's SmolLM2 checkpoint is written by `python -m convert smollm2-135m --out DIR` (conftest).
    cfg, params, tokenizer = load_checkpoint(smollm2_checkpoint)
    assert (cfg.family, cfg.num_layers, cfg.tie_word_embeddings) == ("llama", 30, True)
    assert "lm_head" not in params
    meta = load_metadata(smollm2_checkpoint)
    assert meta["source"] == "smollm2-135m" and meta["source_format"] == "gguf"
    assert abs(meta["parameter_count"] - 134.5e6) < 0.1e6
    assert len(tokenizer) == cfg.vocab_size == 49152


@pytest.mark.slow
def test_a_gguf_is_parsed_once_for_config_weights_and_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Transformers opens a GGUF afresh for the config, the weights and the tokenizer; a source
    shares one parse among them (the parse was most of a conversion), and `release` drops it."""
    import gguf

    from convert.sources import open_source

    opened: list[str] = []

    class Counting(gguf.GGUFReader):
        def __init__(self, path: str, mode: str = "r") -> None:
            opened.append(Path(path).name)
            super().__init__(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    source = open_source("smollm2-135m")
    assert source.hf_config()["model_type"] == "llama"
    assert len(source.tokenizer()) == 49152
    assert opened == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert gguf.GGUFReader is Counting  # put back after each read
    source.release()
    source.tokenizer()
    assert len(opened) == 2
