"""`ModelConfig.from_hf` against Transformers' own config classes: which layers slide, which RoPE
each layer type uses, and one clear error for what this project cannot run."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from coreinfer_jax.models.config import ConfigError, ModelConfig
from coreinfer_jax.models.rope import inverse_frequencies

_SMALL: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=100, max_position_embeddings=128)


def _raw(config: Any) -> dict[str, Any]:
    """The dict as a config.json written before Transformers recorded `layer_types` holds it."""
    d = config.to_dict()
    d.pop("layer_types", None)
    return d


@pytest.mark.parametrize("cls", [Qwen2Config, Qwen3Config])
@pytest.mark.parametrize("use_sliding_window,max_window_layers", [(True, 2), (True, 0), (True, 6), (False, 2)])
def test_qwen_window_applies_from_max_window_layers_on(cls, use_sliding_window: bool, max_window_layers: int) -> None:
    hf = cls(**_SMALL, use_sliding_window=use_sliding_window, sliding_window=8, max_window_layers=max_window_layers)
    for d in (hf.to_dict(), _raw(hf)):
        cfg = ModelConfig.from_hf(d)
        assert cfg.attention_types == tuple(hf.layer_types)
        assert [cfg.window(t) for t in cfg.attention_types] == [
            hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]


@pytest.mark.parametrize("cls,window", [(MistralConfig, 16), (Phi3Config, 16), (Phi3Config, None)])
def test_mistral_and_phi3_window_every_layer(cls, window: int | None) -> None:
    cfg = ModelConfig.from_hf(cls(**_SMALL, sliding_window=window).to_dict())
    assert cfg.attention_types == ("full_attention" if window is None else "sliding_attention",) * 6
    assert cfg.sliding_window == window


def test_gemma3_layer_pattern_and_rope_as_transformers_reads_them() -> None:
    # A Transformers 4 era config.json: the pattern instead of layer types, two RoPE bases, scaling.
    raw = dict(_SMALL, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], num_hidden_layers=8,
               sliding_window_pattern=3, sliding_window=4, rope_theta=1e6, rope_local_base_freq=1e4,
               rope_scaling={"rope_type": "linear", "factor": 8.0}, head_dim=32)
    hf = Gemma3TextConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
    assert hf.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    ours, theirs = ModelConfig.from_hf(raw), ModelConfig.from_hf(dict(hf.to_dict(), architectures=raw["architectures"]))
    for field in ("attention_types", "sliding_window", "rope_theta", "rope_scaling", "sliding_rope_theta"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.attention_types == tuple(hf.layer_types)
    assert (ours.rope_theta, ours.sliding_rope_theta, ours.rope["factor"]) == (1e6, 1e4, 8.0)
    # Sliding layers: plain RoPE at base 1e4; global layers: base 1e6 slowed down 8 times.
    assert inverse_frequencies(ours, "sliding_attention")[1] == pytest.approx(1e4 ** (-2 / 32))
    assert inverse_frequencies(ours, "full_attention")[1] == pytest.approx(1e6 ** (-2 / 32) / 8)
    with pytest.raises(ConfigError, match="mixes full_attention and sliding_attention"):
        inverse_frequencies(ours)


@pytest.mark.parametrize("hf,words", [
    (dict(_SMALL, model_type="gpt2"), ["unsupported model type 'gpt2'", "gemma3_text", "qwen3", "phi3", "llama"]),
    (dict(_SMALL, architectures=["Gemma3nForCausalLM"]), ["unsupported architecture", "Gemma3ForCausalLM"]),
    (dict(_SMALL, architectures=["Gemma3ForCausalLM"], use_bidirectional_attention=True), ["bidirectional"]),
    (dict(_SMALL, architectures=["Phi3ForCausalLM"], rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
     ["unsupported rope type 'longrope'"]),
    (dict(_SMALL, architectures=["Phi3ForCausalLM"],
          rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}),
     ["partial rotary"]),
], ids=["model-type", "architecture", "bidirectional", "longrope", "partial-rotary"])
def test_unsupported_configs_say_what_is_supported(hf: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf(hf)
    for word in words:
        assert word in str(info.value)


def test_layer_types_must_fit_the_model() -> None:
    hf = dict(_SMALL, architectures=["Gemma3ForCausalLM"], sliding_window=4)
    with pytest.raises(ConfigError, match="for each of the 6 layers"):
        ModelConfig.from_hf(dict(hf, layer_types=["full_attention"] * 5))
    with pytest.raises(ConfigError, match="for each of the 6 layers"):
        ModelConfig.from_hf(dict(hf, layer_types=["chunked_attention"] * 6))
    with pytest.raises(ConfigError, match="need a sliding_window"):
        ModelConfig.from_hf(dict(hf, sliding_window=None))


def test_llama3_rope_frequencies_are_transformers_in_all_three_bands() -> None:
    # Llama-3.1-8B's RoPE: head_dim 128, so 64 frequencies, of which some are kept, some divided by
    # the factor, and some interpolated between (a model whose wavelengths miss that band tests less).
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)
    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                     num_hidden_layers=2, vocab_size=1000, max_position_embeddings=131072, rope_parameters=rope)
    theirs = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")[0].numpy()
    ours = inverse_frequencies(ModelConfig.from_hf(dict(hf.to_dict(), architectures=["LlamaForCausalLM"])))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    plain = 500000.0 ** (-np.arange(0, 128, 2) / 128)
    kept, divided = np.isclose(ours, plain, rtol=1e-6), np.isclose(ours, plain / 8, rtol=1e-6)
    assert kept.sum() > 0 and divided.sum() > 0 and (~kept & ~divided).sum() > 0
