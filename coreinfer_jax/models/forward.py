"""Decoder-only transformer forward over a KV cache, as pure functions of the param tree.

One function, `forward`, serves pre-fill (a right-padded `[B, T]` chunk written at slot 0),
single-token decode (`T = 1` at each row's own position) and teacher-forced chunks: every
row attends to its cached slots `s < start[b]` and causally within the chunk, and the
chunk's keys/values are written at `start[b] + t` (`models.attend`). Padding after a row's
real tokens is written too, and overwritten by the decode step that reaches that slot
before any real query can see it.

A layer's FFN params are either the full `[F, D]` matrices or, in sparse decode, the
per-sequence gathered core neurons `[B, K, D]`; `ffn` handles both. In a decode step
lowered for a GPU, the RMS norms before the attention and FFN products are applied after
them (`norm_for_products`, `rescaled`): the same sums, two small kernels fewer per layer.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.attend import attend
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import Params
from coreinfer_jax.models.products import by_platform
from coreinfer_jax.models.rope import apply_rotary, rope_tables
from coreinfer_jax.models.sharding import constrain_cache, mesh_tensor_size

Cache = list[dict[str, jnp.ndarray]]
# Called as select(layer_index, activation [B, T, F]) in pre-fill; its results are collected.
Selector = Callable[[int, jnp.ndarray], jnp.ndarray]
# ffn_fn(layer_ffn_params, x [B, T, D], cfg, row_scale=None) -> (output [B, T, D], activation
# CoreInfer ranks by); `row_scale` [B, T, 1] comes with an unfinished norm (`norm_for_products`).
FFN = Callable[..., tuple[jnp.ndarray, jnp.ndarray]]

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation_fn(cfg: ModelConfig) -> Callable[[jnp.ndarray], jnp.ndarray]:
    if cfg.hidden_act not in _ACTIVATIONS:
        raise CoreInferError(f"unsupported activation {cfg.hidden_act!r}; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[cfg.hidden_act]


def cache_shape(cfg: ModelConfig, batch: int, length: int) -> tuple[int, int, int, int]:
    """One layer's K (or V) cache, `[B, Hkv, hd, S]`: slots minor, the layout XLA's CPU dots
    read fastest for both attention contractions (`[B, Hkv, S, hd]` made decode attention
    about 50% slower on SmolLM2's shapes)."""
    return batch, cfg.num_kv_heads, cfg.head_dim, length


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any) -> Cache:
    shape = cache_shape(cfg, batch, length)
    return [{"k": constrain_cache(jnp.zeros(shape, dtype)), "v": constrain_cache(jnp.zeros(shape, dtype))}
            for _ in range(cfg.num_layers)]


def norm(p: dict[str, jnp.ndarray], x: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
    """RMSNorm (Llama, Gemma) or LayerNorm (OPT), computed in float32 like Transformers."""
    h = x.astype(jnp.float32)
    if cfg.family == "opt":
        h = h - h.mean(-1, keepdims=True)
        h = h * lax.rsqrt((h * h).mean(-1, keepdims=True) + cfg.norm_eps)
        return (h * p["scale"] + p["bias"]).astype(x.dtype)
    h = h * lax.rsqrt((h * h).mean(-1, keepdims=True) + cfg.norm_eps)
    if cfg.family == "gemma":
        # Gemma scales by 1 + weight and rounds after the product (Llama: before it).
        return (h * (1.0 + p["scale"].astype(jnp.float32))).astype(x.dtype)
    return p["scale"] * h.astype(x.dtype)


def norm_for_products(p: dict[str, jnp.ndarray], x: jnp.ndarray,
                      cfg: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """An RMS norm whose result only feeds products, as `(y, r)` with `r` `[B, T, 1]` float32
    for `rescaled` to apply after them: `norm(p, x, cfg)` (and `r` unused) in a program
    lowered for a CPU, `y = scale * x` and `r = rsqrt(mean(x^2) + eps)` for a GPU.

    `(s x) W r = (s r x) W`. Scaling after the product lets XLA's GPU compiler make the norm
    one kernel (`s x` and the sum of squares side by side) instead of a reduction followed by
    a multiply that waits for it: two small kernels fewer per layer-step (sm_90 deviceless
    compile, `tools.gpu_compile`). The rounding differs from Transformers' by one bf16 step
    (`s x` rounded before the product instead of `r x`), so the CPU keeps the norm as it is."""
    def factored(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        h = x.astype(jnp.float32)
        r = lax.rsqrt((h * h).mean(-1, keepdims=True) + cfg.norm_eps)  # [B, T, 1]
        if cfg.family == "gemma":
            return (h * (1.0 + p["scale"].astype(jnp.float32))).astype(x.dtype), r
        return p["scale"] * x, r

    return by_platform(lambda x: (norm(p, x, cfg), jnp.ones(x.shape[:-1] + (1,), jnp.float32)), factored, x)


def rescaled(eq: str, y: jnp.ndarray, w: jnp.ndarray, r: jnp.ndarray | None) -> jnp.ndarray:
    """`einsum(eq, y, w)` of a `norm_for_products` result `y` with its `r` applied (in float32,
    then rounded once, as the product of the finished norm is); `r=None`: `y` is finished."""
    if r is None:
        return jnp.einsum(eq, y, w)
    return by_platform(lambda y, w, r: jnp.einsum(eq, y, w),
                       lambda y, w, r: (jnp.einsum(eq, y, w, preferred_element_type=jnp.float32) * r).astype(y.dtype),
                       y, w, r)


def finished(y: jnp.ndarray, r: jnp.ndarray | None) -> jnp.ndarray:
    """The norm `norm_for_products` left unfinished, for consumers that are not `rescaled`
    products: on a GPU a multiply after the norm's reduction, its second kernel again."""
    if r is None:
        return y
    return by_platform(lambda y, r: y, lambda y, r: (y.astype(jnp.float32) * r).astype(y.dtype), y, r)


def attention(p: Params, x: jnp.ndarray, positions: jnp.ndarray, start: jnp.ndarray,
              kv: dict[str, jnp.ndarray], rope: tuple[jnp.ndarray, jnp.ndarray] | None,
              cfg: ModelConfig, prefix: bool = True, layer_type: str | None = None,
              row_scale: jnp.ndarray | None = None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """`layer_type` ("full_attention" / "sliding_attention") may be omitted when every layer
    has the same; `row_scale`: `x` is a `norm_for_products` result and this its `r`."""
    window = cfg.window(layer_type or cfg.only_layer_type())
    B, T, _ = x.shape
    H, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if "w_qkv" in p:  # decode's one product for all three (`fuse_qkv`)
        qkv = rescaled("btd,de->bte", x, p["w_qkv"], row_scale)  # [B, T, (H + 2 Hkv) hd]
        if cfg.qkv_bias:
            qkv = qkv + p["b_qkv"]
        q, k, v = jnp.split(qkv, [H * hd, (H + Hkv) * hd], axis=-1)
    else:
        q = rescaled("btd,de->bte", x, p["w_q"], row_scale)  # [B, T, H*hd]
        k = rescaled("btd,de->bte", x, p["w_k"], row_scale)  # [B, T, Hkv*hd]
        v = rescaled("btd,de->bte", x, p["w_v"], row_scale)
        if cfg.qkv_bias:
            q, k, v = q + p["b_q"], k + p["b_k"], v + p["b_v"]
    q = q.reshape(B, T, H, hd)
    k = k.reshape(B, T, Hkv, hd)
    v = v.reshape(B, T, Hkv, hd)
    if cfg.qk_norm:
        q, k = norm({"scale": p["q_norm"]}, q, cfg), norm({"scale": p["k_norm"]}, k, cfg)  # per head
    if rope is not None:
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 3, 1)  # [B, Hkv, hd, T]
    q = q.reshape(B, T, Hkv, H // Hkv, hd).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, hd]
    q = q * jnp.asarray((cfg.query_pre_attn_scalar or hd) ** -0.5, x.dtype)
    out, kv = attend(q, k, v, kv, start, positions, window, prefix)
    out = out.reshape(B, T, H * hd)  # [B, T, H*hd]
    out = out @ p["w_o"]
    if cfg.o_bias:
        out = out + p["b_o"]
    return out, kv


def fuse_qkv(params: Params) -> Params:
    """`params` with each layer's `w_q`, `w_k`, `w_v` (and biases) as one `w_qkv`
    `[D, (H + 2 Hkv) hd]`, for a decode loop to read with one product.

    A token's K and V products (`[1, D] x [D, Hkv hd]`, 4M multiply-adds at 8B shapes) are
    under the size XLA's GPU compiler sends to a matrix-product kernel: it rewrites them as
    a multiply and a reduction and writes the product `[D, Hkv hd]` out at every step (16 MB
    per layer-step at 8B shapes, `tools.gpu_compile`; two 10.8 us reductions and an 8.7 us
    multiply per layer in the H200 profile). One product with Q is over that size. Under a
    mesh that splits heads the three stay apart (their concatenation would cross devices)."""
    if mesh_tensor_size() > 1:
        return params
    layers = []
    for layer in params["layers"]:
        a = layer["attn"]
        fused = {k: v for k, v in a.items() if k not in ("w_q", "w_k", "w_v", "b_q", "b_k", "b_v")}
        fused["w_qkv"] = jnp.concatenate([a["w_q"], a["w_k"], a["w_v"]], axis=1)  # [D, (H + 2 Hkv) hd]
        if "b_q" in a:
            fused["b_qkv"] = jnp.concatenate([a["b_q"], a["b_k"], a["b_v"]])
        layers.append(dict(layer, attn=fused))
    return dict(params, layers=layers)


def ffn(p: Params, x: jnp.ndarray, cfg: ModelConfig,
        row_scale: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """FFN output and the activation CoreInfer ranks neurons by.

    The activation is the input of the down projection for gated models and the `fc1`
    output before ReLU for OPT. Weights are `[F, D]` (shared) or `[B, K, D]` (per-row core
    neurons); the contraction is the same either way. Gathered gated FFNs hold `w_gate_up`
    `[.., 2K, D]` in place of `w_gate` and `w_up`. `row_scale`: `x` is a
    `norm_for_products` result and this its `r`.
    """
    per_row = p["w_down"].ndim == 3
    up_eq, down_eq = ("btd,bfd->btf", "btf,bfd->btd") if per_row else ("btd,fd->btf", "btf,fd->btd")
    act = activation_fn(cfg)

    def project(name: str) -> jnp.ndarray:
        out = rescaled(up_eq, x, p[f"w_{name}"], row_scale)  # [B, T, rows]
        bias = p.get(f"b_{name}")
        return out if bias is None else out + (bias[:, None] if per_row else bias)

    if cfg.family == "opt":
        up = project("up")  # [B, T, F or K]
        score, hidden = up, act(up)
    else:
        # Gathered core neurons come as one gate|up matrix (`sparse.gather.fused_layout`).
        gate, up = jnp.split(project("gate_up"), 2, axis=-1) if "w_gate_up" in p else (project("gate"), project("up"))
        hidden = act(gate) * up  # [B, T, F or K]
        score = hidden
    out = jnp.einsum(down_eq, hidden, p["w_down"])  # [B, T, D]
    if "b_down" in p:
        out = out + p["b_down"]
    return out, score


def block(p: Params, x: jnp.ndarray, positions: jnp.ndarray, start: jnp.ndarray,
          kv: dict[str, jnp.ndarray], rope: tuple[jnp.ndarray, jnp.ndarray] | None,
          cfg: ModelConfig, prefix: bool = True, ffn_fn: FFN = ffn, layer_type: str | None = None,
          ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray], jnp.ndarray]:
    pre = cfg.family != "opt" or cfg.do_layer_norm_before
    # A decode step's norms before products are finished after them (`norm_for_products`).
    step = prefix and x.shape[1] == 1 and cfg.family != "opt"

    def normed(q: dict[str, jnp.ndarray], x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        return norm_for_products(q, x, cfg) if step else (norm(q, x, cfg), None)

    with jax.named_scope("attention"):
        y, r = normed(p["attn_norm"], x) if pre else (x, None)
        h, kv = attention(p["attn"], y, positions, start, kv, rope, cfg, prefix, layer_type, r)
        if cfg.family == "gemma":
            h = norm(p["post_attn_norm"], h, cfg)
        x = x + h
        if not pre:
            x = norm(p["attn_norm"], x, cfg)
    with jax.named_scope("ffn"):
        y, r = normed(p["ffn_norm"], x) if pre else (x, None)
        h, score = ffn_fn(p["ffn"], y, cfg, r)
        if cfg.family == "gemma":
            h = norm(p["post_ffn_norm"], h, cfg)
        x = x + h
        if not pre:
            x = norm(p["ffn_norm"], x, cfg)
    return x, kv, score


def embed(params: Params, tokens: jnp.ndarray, positions: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
    x = jnp.take(params["embed"], tokens, axis=0)  # [B, T, E]
    if cfg.has_projections:
        x = x @ params["project_in"]  # [B, T, D]
    if cfg.family == "gemma":
        x = x * jnp.asarray(cfg.hidden_size**0.5, x.dtype)  # rounded to the weights' dtype, as Gemma does
    if cfg.family == "opt":
        # Padding positions past the table only occur in bucket padding; clip them.
        x = x + jnp.take(params["pos_embed"], positions + cfg.position_offset, axis=0, mode="clip")
    return x


def forward(params: Params, cfg: ModelConfig, tokens: jnp.ndarray, start: jnp.ndarray, cache: Cache,
            select: Selector | None = None, prefix: bool = True,
            ffn_fn: FFN = ffn) -> tuple[jnp.ndarray, Cache, list[jnp.ndarray]]:
    """Run `tokens` `[B, T]` at positions `start[b] + t`; return hidden states `[B, T, D]`
    (after the final norm), the updated cache, and `select(layer, activation)` for each layer
    where it returns non-None. `prefix=False` says the cache holds nothing before `start`
    (a pre-fill into a fresh cache), so attention skips reading it. `ffn_fn` computes each
    layer's FFN from its params (a decoding method's `decode_ffn`)."""
    T = tokens.shape[1]
    positions = start[:, None] + jnp.arange(T, dtype=start.dtype)[None, :]  # [B, T]
    with jax.named_scope("embed"):
        x = embed(params, tokens, positions, cfg)
    rope = rope_tables(cfg, positions)  # per layer type
    new_cache, selected = [], []
    for i, (p, kv) in enumerate(zip(params["layers"], cache)):
        kind = cfg.attention_types[i]
        with jax.named_scope(f"layer_{i}"):
            x, kv, score = block(p, x, positions, start, kv, rope and rope[kind], cfg, prefix, ffn_fn, kind)
            if select is not None:
                with jax.named_scope("select_core_neurons"):
                    chosen = select(i, score)
                if chosen is not None:
                    selected.append(chosen)
        new_cache.append(kv)
    if "final_norm" in params:
        x = norm(params["final_norm"], x, cfg)
    return x, new_cache, selected


def logits(params: Params, cfg: ModelConfig, h: jnp.ndarray) -> jnp.ndarray:
    """Vocabulary logits `[..., V]` in float32 from final hidden states `[..., D]`."""
    with jax.named_scope("lm_head"):
        if cfg.has_projections:
            h = h @ params["project_out"]  # [..., E]
        head = params.get("lm_head", params["embed"])  # [V, E]
        out = jnp.einsum("...e,ve->...v", h, head).astype(jnp.float32)
        cap = cfg.final_logit_softcapping
        return out if cap is None else cap * jnp.tanh(out / cap)  # Gemma's soft-capping
