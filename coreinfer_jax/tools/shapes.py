"""Real model shapes without checkpoints: the published Hugging Face `config.json` of a few
models, written out here (nothing is downloaded), and random params of those shapes built on
the device, for speed, memory and compile-time measurements where weights do not matter.

    cfg, hf = model_config("llama-3-8b")            # ModelConfig, full HF config dict
    params = random_params(cfg, "bfloat16")         # 8B bf16 params, made on the default device
    cfg, _ = model_config("llama-3-8b", tiny=True)  # same family, RoPE and layout, tiny widths
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import Params, param_shapes


class ShapesError(CoreInferError):
    """An unknown model shape name, or a shape option that does not apply."""


# The models' own config.json values that decide shapes and numerics (ids and dtypes included,
# training-only fields left out). Transformers' config classes fill in the rest, as they do
# for the converter.
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(  # HuggingFaceTB/SmolLM2-135M
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, hidden_act="silu",
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, bos_token_id=0, eos_token_id=0),
    "llama-3.2-1b": dict(  # meta-llama/Llama-3.2-1B
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001),
    "llama-3-8b": dict(  # meta-llama/Meta-Llama-3-8B
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
        tie_word_embeddings=False, attention_bias=False, bos_token_id=128000, eos_token_id=128001),
    "qwen2.5-7b": dict(  # Qwen/Qwen2.5-7B
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
        use_sliding_window=False, sliding_window=131072, max_window_layers=28, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151643),
    "opt-6.7b": dict(  # facebook/opt-6.7b
        architectures=["OPTForCausalLM"], model_type="opt", vocab_size=50272, hidden_size=4096, ffn_dim=16384,
        num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=4096,
        do_layer_norm_before=True, activation_function="relu", enable_bias=True, bos_token_id=2, eos_token_id=2,
        pad_token_id=1),
}

# `--tiny`: every width shrunk (heads and the GQA ratio kept where they divide), family,
# RoPE, biases and layout unchanged, so the same code paths compile in seconds on a CPU.
_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, ffn_dim=128, word_embed_proj_dim=64,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16)
TINY_LAYERS = 2


def hf_config(name: str, tiny: bool = False, num_layers: int | None = None) -> dict[str, Any]:
    """The full HF config dict of `name` (Transformers' defaults filled in, as `AutoConfig`
    gives a checkpoint's), optionally `tiny` and/or with `num_layers` layers."""
    if name not in HF_CONFIGS:
        raise ShapesError(f"unknown model shape {name!r}; known: {', '.join(HF_CONFIGS)}")
    if num_layers is not None and num_layers < 1:
        raise ShapesError(f"a model needs at least one layer, got {num_layers}")
    from transformers import AutoConfig

    hf = dict(HF_CONFIGS[name])
    if tiny:
        hf.update({k: v for k, v in _TINY.items() if k in hf}, num_hidden_layers=TINY_LAYERS)
        # Special ids must stay inside the shrunk vocabulary.
        hf.update({k: hf[k] % _TINY["vocab_size"] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                   if k in hf})
    if num_layers is not None:
        hf["num_hidden_layers"] = num_layers
    config = AutoConfig.for_model(**hf)
    return dict(config.to_dict(), architectures=hf["architectures"])


def model_config(name: str, tiny: bool = False, num_layers: int | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """`(ModelConfig, HF config dict)` of `name`, built the way the converter builds them."""
    hf = hf_config(name, tiny, num_layers)
    return ModelConfig.from_hf(hf), hf


def _leaf_kind(path: str, cfg: ModelConfig) -> str:
    """How a param is initialised: "ones" (norm scales; Gemma's are offsets from 1: "zeros"),
    "zeros" (biases) or "normal" (matrices and embeddings)."""
    last = path.rsplit("/", 1)[-1]
    if last in ("scale", "q_norm", "k_norm"):
        return "zeros" if cfg.family == "gemma" else "ones"
    return "zeros" if last == "bias" or last.startswith("b_") else "normal"


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "kind", "std"))
def _init_leaf(key: jax.Array, *, shape: tuple[int, ...], dtype: str, kind: str, std: float) -> jnp.ndarray:
    # One jitted program per (shape, kind): generated on the device in its final dtype, so an
    # 8B bf16 model never passes through host memory, and all layers share one compile.
    if kind == "normal":
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return jnp.full(shape, 1.0 if kind == "ones" else 0.0, dtype)


def random_params(cfg: ModelConfig, dtype: str = "float32", seed: int = 0, std: float = 0.02,
                  memory_kind: str | None = None) -> Params:
    """Params of `cfg`'s shapes (`param_shapes`) on the default device: matrices and embeddings
    drawn from N(0, std^2) (Transformers' `initializer_range`), norm scales one, biases zero.

    With `memory_kind` (e.g. "pinned_host") each array is moved there as soon as it is made,
    so the device never holds more than one of them (memory-limited mode's starting point)."""
    device = jax.devices()[0]
    place = None if memory_kind is None else jax.sharding.make_single_device_sharding(device, memory_kind=memory_kind)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple) and all(isinstance(i, int) for i in s))
    key = jax.random.key(seed)
    out = []
    for i, (path, shape) in enumerate(leaves):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        leaf = _init_leaf(jax.random.fold_in(key, i), shape=shape, dtype=dtype, kind=_leaf_kind(name, cfg), std=std)
        out.append(leaf if place is None else jax.device_put(leaf, place))
    return jax.tree_util.tree_unflatten(treedef, out)


def random_prompt(cfg: ModelConfig, length: int, seed: int = 0) -> list[int]:
    """A stand-in prompt of `length` random token ids (no tokenizer), none of them a stop token."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, size=length)
    stops = np.array(sorted(cfg.eos_token_ids), dtype=ids.dtype)
    ids[np.isin(ids, stops)] = (ids[np.isin(ids, stops)] + 1) % cfg.vocab_size
    return [int(i) for i in ids]
