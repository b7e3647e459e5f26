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
    "Qwen3ForCausalLM": "llama",
    "Phi3ForCausalLM": "llama",
    "Gemma3ForCausalLM": "gemma",
    "OPTForCausalLM": "opt",
}
# Configs without `architectures` (e.g. read from a GGUF file) name only their model type.
_ARCHITECTURE_OF_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                         "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                         "opt": "OPTForCausalLM"}

_ROPE_TYPES = ("default", "linear", "llama3")
FULL, SLIDING = "full_attention", "sliding_attention"  # Transformers' `layer_types` names


class ConfigError(CoreInferError):
    """A model configuration this project cannot run."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of a decoder-only transformer.

    `family` decides the layer layout: "llama" (RMSNorm, RoPE, gated FFN: Llama, Mistral,
    Qwen2, Qwen3, Phi-3), "gemma" (Gemma 3: the llama layout plus a norm after attention and
    after the FFN, norms scaled by `1 + weight`, embeddings scaled by sqrt(hidden)) or "opt"
    (LayerNorm, learned positions, ReLU FFN).

    `attention_types[i]` is "full_attention" or "sliding_attention" (only the last
    `sliding_window` positions are visible), as Transformers names them; sliding layers use
    RoPE base `sliding_rope_theta` when set (Gemma 3), else the same RoPE as the others.
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
    # Each layer's type where they differ; empty when all layers are alike (then they slide
    # when `sliding_window` is set), so that a config with more layers is a `replace` away.
    layer_types: tuple[str, ...] = ()
    sliding_rope_theta: float | None = None
    qk_norm: bool = False  # RMSNorm of each head's query and key before RoPE (Qwen3, Gemma 3)
    # Gemma: attention scores scaled by query_pre_attn_scalar**-0.5 instead of head_dim**-0.5,
    # and final logits soft-capped to `cap * tanh(x / cap)` where set.
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    # OPT only.
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    position_offset: int = 0
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.layer_types and (len(self.layer_types) != self.num_layers
                                 or not set(self.layer_types) <= {FULL, SLIDING}):
            raise ConfigError(f"layer_types must name {FULL!r} or {SLIDING!r} for each of the "
                              f"{self.num_layers} layers, got {list(self.layer_types)}")
        if SLIDING in self.layer_types and self.sliding_window is None:
            raise ConfigError("sliding_attention layers need a sliding_window")

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (OPT-350m projects it to `hidden_size`)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def has_projections(self) -> bool:
        return self.embed_dim != self.hidden_size

    @property
    def gated(self) -> bool:
        """Whether the FFN is `act(gate(x)) * up(x)` (else OPT's `act(fc1(x))`)."""
        return self.family != "opt"

    @property
    def rope(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @property
    def attention_types(self) -> tuple[str, ...]:
        """Every layer's attention type, "full_attention" or "sliding_attention"."""
        return self.layer_types or ((FULL if self.sliding_window is None else SLIDING),) * self.num_layers

    def window(self, layer_type: str) -> int | None:
        """How many past positions a layer of `layer_type` sees (None: all)."""
        return self.sliding_window if layer_type == SLIDING else None

    def only_layer_type(self) -> str:
        """The one type of every layer; a model mixing types needs each layer's own."""
        if self.layer_types:
            raise ConfigError(f"{self.architecture} mixes {FULL} and {SLIDING} layers: "
                              f"each layer must be run with its own type")
        return self.attention_types[0]

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        d = json.loads(text)
        d["rope_scaling"] = tuple(sorted(d.get("rope_scaling", {}).items()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["layer_types"] = tuple(d.get("layer_types", ()))
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_json(Path(path).read_text())

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config dict with the class defaults filled in (as
        `AutoConfig(...).to_dict()` gives it); raises ConfigError on anything unsupported."""
        arch = architecture(hf)
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
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        window, layer_types = _attention_windows(arch, hf)
        rope = _rope_from_hf(hf, layer_types)
        if len(layer_types) == hf["num_hidden_layers"] and set(layer_types) in ({FULL}, {SLIDING}):
            window, layer_types = (None if layer_types[0] == FULL else window), ()  # all alike
        qwen2 = arch == "Qwen2ForCausalLM"
        attention_bias = hf.get("attention_bias", False)
        return cls(
            **common,
            **rope,
            **(_gemma_from_hf(hf) if family == "gemma" else {}),
            intermediate_size=hf["intermediate_size"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=head_dim,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act", "silu"),
            tie_word_embeddings=hf.get("tie_word_embeddings", family == "gemma"),
            qkv_bias=True if qwen2 else attention_bias,
            o_bias=False if qwen2 else attention_bias,
            mlp_bias=hf.get("mlp_bias", False),
            sliding_window=window,
            layer_types=layer_types,
            qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
        )


def architecture(hf: dict[str, Any]) -> str:
    """The supported architecture a HF config dict describes; raises ConfigError naming the supported ones."""
    archs = hf.get("architectures") or []
    if not archs:
        if hf.get("model_type") not in _ARCHITECTURE_OF_TYPE:
            raise ConfigError(f"unsupported model type {hf.get('model_type')!r}; "
                              f"supported: {', '.join(_ARCHITECTURE_OF_TYPE)}")
        return _ARCHITECTURE_OF_TYPE[hf["model_type"]]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"unsupported architecture {archs[0]!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return archs[0]


def _attention_windows(arch: str, hf: dict[str, Any]) -> tuple[int | None, tuple[str, ...]]:
    """`sliding_window` and the per-layer types, as Transformers decides them per architecture."""
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        # The window is on only with `use_sliding_window`, and then only from layer
        # `max_window_layers` on (Transformers' default `layer_types`).
        window = window if hf.get("use_sliding_window", False) else None
        if window is None:
            return None, (FULL,) * n
        types = hf.get("layer_types") or [SLIDING if i >= hf.get("max_window_layers", 28) else FULL
                                          for i in range(n)]
        return window, tuple(types)
    if arch == "Gemma3ForCausalLM":
        if hf.get("use_bidirectional_attention"):
            raise ConfigError("Gemma 3 with bidirectional attention (an embedding model) is not a decoder")
        pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        types = hf.get("layer_types") or [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]
        return window, tuple(types)
    if arch in ("MistralForCausalLM", "Phi3ForCausalLM") and window is not None:
        return window, (SLIDING,) * n  # one window for every layer
    return None, (FULL,) * n


def _gemma_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    # `attn_logit_softcapping` is left out on purpose: Gemma 3 replaced it with q/k norms and
    # Transformers' Gemma 3 never applies it, even when a config sets it.
    return dict(query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
                final_logit_softcapping=hf.get("final_logit_softcapping"))


def _rope_from_hf(hf: dict[str, Any], layer_types: tuple[str, ...]) -> dict[str, Any]:
    """`rope_theta`, `rope_scaling` and (Gemma 3) `sliding_rope_theta` from either way HF writes them."""
    params = dict(hf.get("rope_parameters") or {})
    sliding_theta = None
    if FULL in params or SLIDING in params:
        # Per layer type (Gemma 3 in Transformers >= 5): the full layers' entry is the model's
        # RoPE; sliding layers must use plain RoPE, only their base may differ.
        sliding = dict(params.get(SLIDING) or {})
        params = dict(params.get(FULL) or {})
        if sliding.get("rope_type", "default") != "default":
            raise ConfigError(f"sliding-window layers with rope type {sliding['rope_type']!r} are not supported")
        if SLIDING in layer_types:
            sliding_theta = float(sliding.get("rope_theta", 10000.0))
    elif hf.get("rope_local_base_freq") is not None and SLIDING in layer_types:
        sliding_theta = float(hf["rope_local_base_freq"])  # Gemma 3 as Transformers 4 writes it
    # Transformers >= 5 writes `rope_parameters` (theta inside); older files write
    # `rope_theta` plus an optional `rope_scaling`.
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if not params and hf.get("rope_scaling"):
        params = dict(hf["rope_scaling"])
    if params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("partial rotary embeddings are not supported")
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(f"unsupported rope type {rope_type!r}; supported: {', '.join(_ROPE_TYPES)}")
    scaling: tuple[tuple[str, Any], ...] = ()
    if rope_type != "default":
        params["rope_type"] = rope_type
        params.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
        scaling = tuple(sorted(params.items()))
    return dict(rope_theta=float(theta), rope_scaling=scaling, sliding_rope_theta=sliding_theta)
