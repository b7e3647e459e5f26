"""Model configuration: one frozen dataclass for every supported family, built from HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from coreinfer_jax.errors import CoreInferError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "OPTForCausalLM": "opt",
}

_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(CoreInferError):
    """A model configuration this project cannot run."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of a decoder-only transformer.

    `family` is "llama" (RMSNorm, RoPE, gated FFN: Llama, Mistral, Qwen2) or "opt"
    (LayerNorm, learned positions, ReLU FFN).
    """

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    sliding_window: int | None = None
    # OPT only.
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    position_offset: int = 0
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (OPT-350m projects it to `hidden_size`)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def has_projections(self) -> bool:
        return self.embed_dim != self.hidden_size

    @property
    def rope(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        d = json.loads(text)
        d["rope_scaling"] = tuple(sorted(d.get("rope_scaling", {}).items()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_json(Path(path).read_text())

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict; raises ConfigError on anything unsupported."""
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else _architecture_from_model_type(hf.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        common = dict(
            architecture=arch,
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf["max_position_embeddings"],
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        if family == "opt":
            return cls(
                **common,
                intermediate_size=hf["ffn_dim"],
                num_kv_heads=hf["num_attention_heads"],
                head_dim=hf["hidden_size"] // hf["num_attention_heads"],
                norm_eps=1e-5,
                hidden_act=hf.get("activation_function", "relu"),
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
                qkv_bias=hf.get("enable_bias", True),
                o_bias=hf.get("enable_bias", True),
                mlp_bias=hf.get("enable_bias", True),
                word_embed_proj_dim=hf.get("word_embed_proj_dim") or hf["hidden_size"],
                do_layer_norm_before=hf.get("do_layer_norm_before", True),
                position_offset=2,
            )
        if not hf.get("layer_norm_elementwise_affine", True):
            raise ConfigError("layer norms without affine parameters are not supported")
        theta, scaling = _rope_from_hf(hf)
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("partial rotary embeddings are not supported")
        qwen = arch == "Qwen2ForCausalLM"
        attention_bias = hf.get("attention_bias", False)
        window = hf.get("sliding_window") if hf.get("use_sliding_window", not qwen) else None
        return cls(
            **common,
            intermediate_size=hf["intermediate_size"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=head_dim,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            hidden_act=hf.get("hidden_act", "silu"),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=True if qwen else attention_bias,
            o_bias=False if qwen else attention_bias,
            mlp_bias=hf.get("mlp_bias", False),
            rope_theta=float(theta),
            rope_scaling=scaling,
            sliding_window=window,
        )


def _architecture_from_model_type(model_type: str | None) -> str:
    by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "opt": "OPTForCausalLM"}
    if model_type not in by_type:
        raise ConfigError(
            f"unsupported model type {model_type!r}; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return by_type[model_type]


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...]]:
    # Transformers >= 5 writes `rope_parameters` (theta inside); older files write
    # `rope_theta` plus an optional `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if not params and hf.get("rope_scaling"):
        params = dict(hf["rope_scaling"])
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(f"unsupported rope type {rope_type!r}; supported: {', '.join(_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, ()
    params["rope_type"] = rope_type
    params.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    return theta, tuple(sorted(params.items()))
