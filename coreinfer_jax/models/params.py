"""The parameter pytree: plain nested dicts whose names come from the maths.

Attention matrices are stored input-major (`x @ w_q`). FFN matrices are stored
neuron-major, `[F, D]`, for all three of `w_gate`, `w_up` and `w_down`, so that the core
neurons of a layer are one `jnp.take(w, idx, axis=0)` per matrix. Norm scales are stored
as the checkpoint has them (Gemma's are offsets from 1).

    {
      "embed": [V, E],                   # token embedding
      "pos_embed": [P + offset, D],      # OPT only: learned positions
      "project_in": [E, D], "project_out": [D, E],   # OPT when E != D
      "layers": [                        # one dict per layer
        {"attn_norm": {"scale": [D], "bias": [D]?},
         "attn": {"w_q": [D, H*hd], "w_k": [D, Hkv*hd], "w_v": [D, Hkv*hd], "w_o": [H*hd, D],
                  "b_q"?, "b_k"?, "b_v"?, "b_o"?,
                  "q_norm"?: [hd], "k_norm"?: [hd]},      # qk_norm (Qwen3, Gemma 3)
         "post_attn_norm"?: {...},       # Gemma: on the attention output, before the residual
         "ffn_norm": {...},
         "post_ffn_norm"?: {...},        # Gemma: on the FFN output, before the residual
         "ffn": {"w_gate": [F, D] (gated only), "w_up": [F, D], "w_down": [F, D],
                 "b_gate"?, "b_up"?: [F], "b_down"?: [D]}},
      ],
      "final_norm": {"scale": [D], "bias": [D]?},
      "lm_head": [V, E],                 # absent when tied to "embed"
    }
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from coreinfer_jax.models.config import ModelConfig

Params = dict[str, Any]


def _norm_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d = {"scale": (cfg.hidden_size,)}
    if cfg.family == "opt":
        d["bias"] = (cfg.hidden_size,)
    return d


def _layer_shapes(cfg: ModelConfig) -> dict[str, Any]:
    D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    attn: dict[str, tuple[int, ...]] = {"w_q": (D, q), "w_k": (D, kv), "w_v": (D, kv), "w_o": (q, D)}
    if cfg.qkv_bias:
        attn.update(b_q=(q,), b_k=(kv,), b_v=(kv,))
    if cfg.o_bias:
        attn["b_o"] = (D,)
    if cfg.qk_norm:
        attn.update(q_norm=(hd,), k_norm=(hd,))
    ffn: dict[str, tuple[int, ...]] = {"w_up": (F, D), "w_down": (F, D)}
    if cfg.gated:
        ffn["w_gate"] = (F, D)
    if cfg.mlp_bias:
        ffn.update(b_up=(F,), b_down=(D,))
        if cfg.gated:
            ffn["b_gate"] = (F,)
    layer = {"attn_norm": _norm_shapes(cfg), "attn": attn, "ffn_norm": _norm_shapes(cfg), "ffn": ffn}
    if cfg.family == "gemma":
        layer.update(post_attn_norm=_norm_shapes(cfg), post_ffn_norm=_norm_shapes(cfg))
    return layer


def param_shapes(cfg: ModelConfig) -> Params:
    """The full tree of parameter shapes (tuples) for a config; the single source of truth."""
    tree: Params = {
        "embed": (cfg.vocab_size, cfg.embed_dim),
        "layers": [_layer_shapes(cfg) for _ in range(cfg.num_layers)],
        "final_norm": _norm_shapes(cfg),
    }
    if cfg.family == "opt":
        tree["pos_embed"] = (cfg.max_position_embeddings + cfg.position_offset, cfg.hidden_size)
        if not cfg.do_layer_norm_before:
            del tree["final_norm"]
    if cfg.has_projections:
        tree["project_in"] = (cfg.embed_dim, cfg.hidden_size)
        tree["project_out"] = (cfg.hidden_size, cfg.embed_dim)
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = (cfg.vocab_size, cfg.embed_dim)
    return tree


def is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def abstract_params(cfg: ModelConfig, dtype: Any, sharding: jax.sharding.Sharding | None = None) -> Params:
    """`param_shapes` as `jax.ShapeDtypeStruct`s, e.g. as an Orbax restore target."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype), sharding=sharding), param_shapes(cfg),
                        is_leaf=is_shape)


def flat_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """`param_shapes` flattened to "layers/3/ffn/w_up"-style paths."""
    leaves = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=is_shape)[0]
    return {path_str(p): s for p, s in leaves}


def path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def unflatten(cfg: ModelConfig, flat: dict[str, Any]) -> Params:
    """Inverse of `flat_shapes`: put arrays keyed by path into the param tree."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=is_shape)
    return jax.tree_util.tree_unflatten(treedef, [flat[path_str(p)] for p, _ in leaves])


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
