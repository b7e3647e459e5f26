"""The key table: Hugging Face tensor names -> paths in our param tree, and the per-tensor transform.

Each family has one table of `Rule`s; `{i}` stands for a layer index on both sides. A rule's
transform is "as_is" or "transpose": HF `nn.Linear` weights are `[out, in]`, our attention
matrices are input-major `[in, out]` (transpose), our FFN matrices are neuron-major `[F, D]`
(gate/up/fc1 as is, down/fc2 transposed). See `coreinfer_jax.models.params` for the layout.
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
    ours: str
    transform: str = AS_IS


def _attention(prefix: str, out_proj: str) -> list[Rule]:
    rules = []
    for hf, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), (out_proj, "o")):
        rules.append(Rule(f"{prefix}.{hf}.weight", f"layers/{{i}}/attn/w_{ours}", TRANSPOSE))
        rules.append(Rule(f"{prefix}.{hf}.bias", f"layers/{{i}}/attn/b_{ours}"))
    return rules


def _norm(hf: str, ours: str, bias: bool) -> list[Rule]:
    rules = [Rule(f"{hf}.weight", f"{ours}/scale")]
    if bias:
        rules.append(Rule(f"{hf}.bias", f"{ours}/bias"))
    return rules


_LLAMA_LAYER = "model.layers.{i}"
_OPT_LAYER = "model.decoder.layers.{i}"

TABLES: dict[str, tuple[Rule, ...]] = {
    "llama": (
        Rule("model.embed_tokens.weight", "embed"),
        *_norm("model.norm", "final_norm", bias=False),
        Rule("lm_head.weight", "lm_head"),
        *_norm(f"{_LLAMA_LAYER}.input_layernorm", "layers/{i}/attn_norm", bias=False),
        *_norm(f"{_LLAMA_LAYER}.post_attention_layernorm", "layers/{i}/ffn_norm", bias=False),
        *_attention(f"{_LLAMA_LAYER}.self_attn", "o_proj"),
        Rule(f"{_LLAMA_LAYER}.mlp.gate_proj.weight", "layers/{i}/ffn/w_gate"),
        Rule(f"{_LLAMA_LAYER}.mlp.up_proj.weight", "layers/{i}/ffn/w_up"),
        Rule(f"{_LLAMA_LAYER}.mlp.down_proj.weight", "layers/{i}/ffn/w_down", TRANSPOSE),
        Rule(f"{_LLAMA_LAYER}.mlp.gate_proj.bias", "layers/{i}/ffn/b_gate"),
        Rule(f"{_LLAMA_LAYER}.mlp.up_proj.bias", "layers/{i}/ffn/b_up"),
        Rule(f"{_LLAMA_LAYER}.mlp.down_proj.bias", "layers/{i}/ffn/b_down"),
    ),
    "opt": (
        Rule("model.decoder.embed_tokens.weight", "embed"),
        Rule("model.decoder.embed_positions.weight", "pos_embed"),
        Rule("model.decoder.project_in.weight", "project_in", TRANSPOSE),
        Rule("model.decoder.project_out.weight", "project_out", TRANSPOSE),
        *_norm("model.decoder.final_layer_norm", "final_norm", bias=True),
        Rule("lm_head.weight", "lm_head"),
        *_norm(f"{_OPT_LAYER}.self_attn_layer_norm", "layers/{i}/attn_norm", bias=True),
        *_norm(f"{_OPT_LAYER}.final_layer_norm", "layers/{i}/ffn_norm", bias=True),
        *_attention(f"{_OPT_LAYER}.self_attn", "out_proj"),
        Rule(f"{_OPT_LAYER}.fc1.weight", "layers/{i}/ffn/w_up"),
        Rule(f"{_OPT_LAYER}.fc1.bias", "layers/{i}/ffn/b_up"),
        Rule(f"{_OPT_LAYER}.fc2.weight", "layers/{i}/ffn/w_down", TRANSPOSE),
        Rule(f"{_OPT_LAYER}.fc2.bias", "layers/{i}/ffn/b_down"),
    ),
}

# Non-persistent RoPE buffers that older Llama checkpoints still contain.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_COMPILED = {family: [(rule, _pattern(rule.hf), _pattern(rule.ours)) for rule in rules]
             for family, rules in TABLES.items()}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one HF tensor goes: our param path and the transform that gets it there."""

    path: str
    transform: str


def _canonical(family: str, name: str) -> str:
    # The original facebook/opt-* checkpoints were saved from `OPTModel`, without the "model." prefix.
    if family == "opt" and name.startswith("decoder."):
        return "model." + name
    return name


def lookup(cfg: ModelConfig, name: str) -> Target | None:
    """The target of HF tensor `name`, or None for a tensor that carries nothing we store.

    Raises ConversionError for a name no rule of the family matches.
    """
    if _IGNORED.fullmatch(name):
        return None
    canonical = _canonical(cfg.family, name)
    for rule, hf, _ in _COMPILED[cfg.family]:
        m = hf.fullmatch(canonical)
        if m:
            if rule.ours == "lm_head" and cfg.tie_word_embeddings:
                return None  # tied: the output projection is the embedding, stored once
            return Target(rule.ours.format(**m.groupdict()), rule.transform)
    raise ConversionError(f"unexpected tensor {name!r}: no {cfg.family} parameter corresponds to it")


def hf_target(family: str, path: str) -> Target:
    """The canonical HF tensor name for our param `path`, and the transform between them."""
    for rule, _, ours in _COMPILED[family]:
        m = ours.fullmatch(path)
        if m:
            return Target(rule.hf.format(**m.groupdict()), rule.transform)
    raise KeyError(f"no {family} tensor maps to {path!r}")


def hf_name(family: str, path: str) -> str:
    """The canonical HF tensor name for our param `path` (the inverse of `lookup`)."""
    return hf_target(family, path).path


def transform(name: str, array: np.ndarray, target: Target, expected: tuple[int, ...]) -> np.ndarray:
    """Apply `target.transform` to HF tensor `name`, checking that the result has the `expected` shape."""
    hf_expected = expected[::-1] if target.transform == TRANSPOSE else expected
    if array.shape != hf_expected:
        raise ConversionError(
            f"tensor {name!r} has shape {list(array.shape)}, expected {list(hf_expected)} "
            f"(for {target.path} of shape {list(expected)})"
        )
    return array.T if target.transform == TRANSPOSE else array
