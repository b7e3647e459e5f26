"""The key table: Hugging Face tensor names -> paths in our param tree, and the per-tensor transform.

Each table is a tuple of `Rule`s; `{i}` stands for a layer index on both sides. A rule's
transform is "as_is" or "transpose": HF `nn.Linear` weights are `[out, in]`, our attention
matrices are input-major `[in, out]` (transpose), our FFN matrices are neuron-major `[F, D]`
(gate/up/fc1 as is, down/fc2 transposed). A fused HF tensor (Phi-3's `qkv_proj` and
`gate_up_proj`) maps to several of our params, stacked along its first axis in the rule's
order; each piece then takes the rule's transform. See `coreinfer_jax.models.params`.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from convert.errors import ConversionError
from coreinfer_jax.models.config import ModelConfig

AS_IS = "as_is"
TRANSPOSE = "transpose"


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    ours: tuple[str, ...]
    transform: str = AS_IS


def rule(hf: str, *ours: str, transform: str = AS_IS) -> Rule:
    return Rule(hf, ours, transform)


def _attention(prefix: str, out_proj: str) -> list[Rule]:
    rules = []
    for hf, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), (out_proj, "o")):
        rules.append(rule(f"{prefix}.{hf}.weight", f"layers/{{i}}/attn/w_{ours}", transform=TRANSPOSE))
        rules.append(rule(f"{prefix}.{hf}.bias", f"layers/{{i}}/attn/b_{ours}"))
    return rules


def _norm(hf: str, ours: str, bias: bool = False) -> list[Rule]:
    rules = [rule(f"{hf}.weight", f"{ours}/scale")]
    if bias:
        rules.append(rule(f"{hf}.bias", f"{ours}/bias"))
    return rules


_LAYER = "model.layers.{i}"
_OPT_LAYER = "model.decoder.layers.{i}"

_TOP = (rule("model.embed_tokens.weight", "embed"), *_norm("model.norm", "final_norm"),
        rule("lm_head.weight", "lm_head"))
_QK_NORM = (rule(f"{_LAYER}.self_attn.q_norm.weight", "layers/{i}/attn/q_norm"),
            rule(f"{_LAYER}.self_attn.k_norm.weight", "layers/{i}/attn/k_norm"))
_GATED_FFN = (
    rule(f"{_LAYER}.mlp.gate_proj.weight", "layers/{i}/ffn/w_gate"),
    rule(f"{_LAYER}.mlp.up_proj.weight", "layers/{i}/ffn/w_up"),
    rule(f"{_LAYER}.mlp.down_proj.weight", "layers/{i}/ffn/w_down", transform=TRANSPOSE),
)

TABLES: dict[str, tuple[Rule, ...]] = {
    "llama": (
        *_TOP,
        *_norm(f"{_LAYER}.input_layernorm", "layers/{i}/attn_norm"),
        *_norm(f"{_LAYER}.post_attention_layernorm", "layers/{i}/ffn_norm"),
        *_attention(f"{_LAYER}.self_attn", "o_proj"),
        *_QK_NORM,
        *_GATED_FFN,
        rule(f"{_LAYER}.mlp.gate_proj.bias", "layers/{i}/ffn/b_gate"),
        rule(f"{_LAYER}.mlp.up_proj.bias", "layers/{i}/ffn/b_up"),
        rule(f"{_LAYER}.mlp.down_proj.bias", "layers/{i}/ffn/b_down"),
    ),
    # Phi-3: Llama's layout with q/k/v and gate/up each fused into one HF tensor.
    "phi3": (
        *_TOP,
        *_norm(f"{_LAYER}.input_layernorm", "layers/{i}/attn_norm"),
        *_norm(f"{_LAYER}.post_attention_layernorm", "layers/{i}/ffn_norm"),
        rule(f"{_LAYER}.self_attn.qkv_proj.weight", "layers/{i}/attn/w_q", "layers/{i}/attn/w_k",
             "layers/{i}/attn/w_v", transform=TRANSPOSE),
        rule(f"{_LAYER}.self_attn.o_proj.weight", "layers/{i}/attn/w_o", transform=TRANSPOSE),
        rule(f"{_LAYER}.mlp.gate_up_proj.weight", "layers/{i}/ffn/w_gate", "layers/{i}/ffn/w_up"),
        rule(f"{_LAYER}.mlp.down_proj.weight", "layers/{i}/ffn/w_down", transform=TRANSPOSE),
    ),
    # Gemma 3: its `post_attention_layernorm` is on the attention output (Llama's name for
    # the pre-FFN norm), which Gemma calls `pre_feedforward_layernorm`.
    "gemma": (
        *_TOP,
        *_norm(f"{_LAYER}.input_layernorm", "layers/{i}/attn_norm"),
        *_norm(f"{_LAYER}.post_attention_layernorm", "layers/{i}/post_attn_norm"),
        *_norm(f"{_LAYER}.pre_feedforward_layernorm", "layers/{i}/ffn_norm"),
        *_norm(f"{_LAYER}.post_feedforward_layernorm", "layers/{i}/post_ffn_norm"),
        *_attention(f"{_LAYER}.self_attn", "o_proj"),
        *_QK_NORM,
        *_GATED_FFN,
    ),
    "opt": (
        rule("model.decoder.embed_tokens.weight", "embed"),
        rule("model.decoder.embed_positions.weight", "pos_embed"),
        rule("model.decoder.project_in.weight", "project_in", transform=TRANSPOSE),
        rule("model.decoder.project_out.weight", "project_out", transform=TRANSPOSE),
        *_norm("model.decoder.final_layer_norm", "final_norm", bias=True),
        rule("lm_head.weight", "lm_head"),
        *_norm(f"{_OPT_LAYER}.self_attn_layer_norm", "layers/{i}/attn_norm", bias=True),
        *_norm(f"{_OPT_LAYER}.final_layer_norm", "layers/{i}/ffn_norm", bias=True),
        *_attention(f"{_OPT_LAYER}.self_attn", "out_proj"),
        rule(f"{_OPT_LAYER}.fc1.weight", "layers/{i}/ffn/w_up"),
        rule(f"{_OPT_LAYER}.fc1.bias", "layers/{i}/ffn/b_up"),
        rule(f"{_OPT_LAYER}.fc2.weight", "layers/{i}/ffn/w_down", transform=TRANSPOSE),
        rule(f"{_OPT_LAYER}.fc2.bias", "layers/{i}/ffn/b_down"),
    ),
}

# Non-persistent RoPE buffers that older Llama checkpoints still contain.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_COMPILED = {name: [(r, _pattern(r.hf), [_pattern(p) for p in r.ours]) for r in rules]
             for name, rules in TABLES.items()}


def table_name(cfg: ModelConfig) -> str:
    """The key table of `cfg`'s checkpoints: its family's, or Phi-3's own (fused tensors)."""
    return "phi3" if cfg.architecture == "Phi3ForCausalLM" else cfg.family


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one HF tensor goes: our param path(s) (several for a fused tensor) and the transform."""

    paths: tuple[str, ...]
    transform: str


def _canonical(family: str, name: str) -> str:
    # The original facebook/opt-* checkpoints were saved from `OPTModel`, without the "model." prefix.
    if family == "opt" and name.startswith("decoder."):
        return "model." + name
    return name


def lookup(cfg: ModelConfig, name: str) -> Target | None:
    """The target of HF tensor `name`, or None for a tensor that carries nothing we store.

    Raises ConversionError for a name no rule of the model's table matches.
    """
    if _IGNORED.fullmatch(name):
        return None
    canonical = _canonical(cfg.family, name)
    for r, hf, _ in _COMPILED[table_name(cfg)]:
        m = hf.fullmatch(canonical)
        if m:
            if r.ours == ("lm_head",) and cfg.tie_word_embeddings:
                return None  # tied: the output projection is the embedding, stored once
            return Target(tuple(p.format(**m.groupdict()) for p in r.ours), r.transform)
    raise ConversionError(f"unexpected tensor {name!r}: no {table_name(cfg)} parameter corresponds to it")


def hf_name(cfg: ModelConfig, path: str) -> str:
    """The canonical HF tensor name that holds our param `path` (the inverse of `lookup`)."""
    for r, _, ours in _COMPILED[table_name(cfg)]:
        for pattern in ours:
            m = pattern.fullmatch(path)
            if m:
                return r.hf.format(**m.groupdict())
    raise KeyError(f"no {table_name(cfg)} tensor maps to {path!r}")


def transform(name: str, array: np.ndarray, target: Target, expected: list[tuple[int, ...]]) -> list[np.ndarray]:
    """HF tensor `name` as our params `target.paths`, checking it against their `expected` shapes."""
    parts = [s[::-1] if target.transform == TRANSPOSE else s for s in expected]  # each piece in HF layout
    hf_expected = (sum(p[0] for p in parts), *parts[0][1:])
    if array.shape != hf_expected:
        shapes = ", ".join(f"{p} {list(s)}" for p, s in zip(target.paths, expected))
        raise ConversionError(f"tensor {name!r} has shape {list(array.shape)}, expected {list(hf_expected)} "
                              f"(for {shapes})")
    pieces = np.split(array, np.cumsum([p[0] for p in parts])[:-1], axis=0)
    return [p.T if target.transform == TRANSPOSE else p for p in pieces]


def hf_tensors(cfg: ModelConfig, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat {param path: array} as HF-named tensors: the key table run backwards (fused
    tensors concatenated again)."""
    out = {}
    for path in flat:
        name = hf_name(cfg, path)
        if name not in out:
            target = lookup(cfg, name)
            out[name] = np.concatenate([flat[p].T if target.transform == TRANSPOSE else flat[p]
                                        for p in target.paths], axis=0)
    return out
