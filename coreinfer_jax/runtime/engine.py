"""The compiled programs: pre-fill (with the method's selection), the decode loop, and
teacher-forced scoring.

`prefill` runs the right-padded prompts `[B, T]` densely, fills a fresh KV cache, returns
the last real position's logits and what the method keeps (`core_neurons`, e.g.
`int32 [B, n_sparse_layers, n_keep]`; None for dense). The method's `decode_weights` then
builds the decode-time weights once per generation (its own small jitted gather), and
`decode` runs a `lax.while_loop` of single-token steps on them with the KV cache donated.
All are jitted at module level with the config, method and sampling as static arguments;
prompt lengths are padded to buckets by the caller, so a new prompt length reuses the
compiled code. Nothing here knows a method's type: it asks the protocol in `sparse.method`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.forward import FFN, Cache, ffn, forward, init_cache, logits
from coreinfer_jax.models.params import Params
from coreinfer_jax.runtime.sampling import Sampling, sample
from coreinfer_jax.sparse.method import Method


@functools.partial(jax.jit, static_argnames=("cfg", "method", "cache_len"))
def prefill(params: Params, tokens: jnp.ndarray, lengths: jnp.ndarray, tables: Params | None = None, *,
            cfg: ModelConfig, method: Method, cache_len: int) -> tuple[jnp.ndarray, Cache, jnp.ndarray | None]:
    """Dense pre-fill of right-padded `tokens` `[B, T]` with real `lengths` `[B]`.

    `tables` are the method's arrays (`method.tables()`). Returns last-token logits `[B, V]`,
    the cache (`cache_len` slots) and the method's core neurons (None for dense).
    """
    B, T = tokens.shape
    cache = init_cache(cfg, B, cache_len, params["embed"].dtype)
    valid = jnp.arange(T)[None, :] < lengths[:, None]  # [B, T]
    reading = method.selecting_layers()

    def select(layer: int, activation: jnp.ndarray) -> jnp.ndarray | None:
        return method.select(activation, valid, tables, layer) if layer in reading else None

    with jax.named_scope("prefill"):
        h, cache, selected = forward(params, cfg, tokens, jnp.zeros((B,), jnp.int32), cache,
                                     select=select if reading else None, prefix=False)
        last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
        out = logits(params, cfg, last)
    return out, cache, method.core_neurons(selected, tables)


# XLA's CPU copy insertion, without region analysis, copies loop-carried KV cache buffers
# at each step of the while loop even though each is updated in place. With it, and with
# `model.attention` writing the cache after its last read, there are none; either alone left
# 120 of SmolLM2's 240 copies per token (all of them: ~3-4% of decode speed in an A/B).
# GPU copy insertion ignores the option.
_LOOP_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "max_steps", "return_logits", "ffn_fn"),
                   donate_argnames=("cache",), compiler_options=_LOOP_COMPILER_OPTIONS)
def decode(weights: Params, first_logits: jnp.ndarray, cache: Cache, lengths: jnp.ndarray,
           max_new_tokens: jnp.ndarray, eos_ids: jnp.ndarray, key: jax.Array, *,
           cfg: ModelConfig, sampling: Sampling, max_steps: int,
           return_logits: bool = False, ffn_fn: FFN = ffn) -> dict[str, jnp.ndarray]:
    """Generate up to `max_new_tokens` (<= `max_steps`) tokens per row after pre-fill.

    `weights` are the method's decode weights (`method.decode_weights`) and `ffn_fn` its
    `decode_ffn`.

    Returns `tokens` `[B, max_steps]` (-1 past a row's end), `steps` (forward passes run),
    the final `cache` (returned so the donated input buffers are updated in place), and with
    `return_logits` the logits `[B, max_steps, V]` each token was chosen from.
    """
    B = lengths.shape[0]
    key, sub = jax.random.split(key)
    first = sample(first_logits, sub, sampling)  # [B]
    out = jnp.full((B, max_steps), -1, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos_ids) | (max_new_tokens <= 1)
    state = {"i": jnp.int32(1), "token": first, "pos": lengths.astype(jnp.int32), "done": done,
             "out": out, "cache": cache, "key": key}
    if return_logits:
        state["logits"] = jnp.zeros((B, max_steps, first_logits.shape[-1]), jnp.float32).at[:, 0].set(first_logits)

    def running(s):
        return (s["i"] < max_new_tokens) & ~jnp.all(s["done"])

    def step(s):
        with jax.named_scope("decode_step"):
            h, cache, _ = forward(weights, cfg, s["token"][:, None], s["pos"], s["cache"], ffn_fn=ffn_fn)
            step_logits = logits(weights, cfg, h[:, 0])  # [B, V]
        key, sub = jax.random.split(s["key"])
        token = sample(step_logits, sub, sampling)
        new = dict(s, i=s["i"] + 1, token=token, pos=s["pos"] + 1, cache=cache, key=key,
                   out=s["out"].at[:, s["i"]].set(jnp.where(s["done"], -1, token)),
                   done=s["done"] | jnp.isin(token, eos_ids) | (s["i"] + 1 >= max_new_tokens))
        if return_logits:
            new["logits"] = s["logits"].at[:, s["i"]].set(step_logits)
        return new

    final = lax.while_loop(running, step, state)
    result = {"tokens": final["out"], "steps": final["i"] - 1, "cache": final["cache"]}
    if return_logits:
        result["logits"] = final["logits"]
    return result


@functools.partial(jax.jit, static_argnames=("cfg", "ffn_fn"))
def score_continuation(weights: Params, first_logits: jnp.ndarray, cache: Cache, lengths: jnp.ndarray,
                       targets: jnp.ndarray, *, cfg: ModelConfig, ffn_fn: FFN = ffn) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Teacher-forced decode of `targets` `[B, C]` after pre-fill, as one chunk.

    Target 0 is scored by the pre-fill's `first_logits`; targets `0..C-2` run through the
    model at positions `lengths + t` and score targets `1..C-1`. Returns each target's
    log-probability and whether it was the argmax, both `[B, C]`.
    """
    with jax.named_scope("score_continuation"):
        h, _, _ = forward(weights, cfg, targets[:, :-1], lengths, cache, ffn_fn=ffn_fn)
        chunk_logits = logits(weights, cfg, h)  # [B, C-1, V]
    all_logits = jnp.concatenate([first_logits[:, None], chunk_logits], axis=1)  # [B, C, V]
    logprobs = jax.nn.log_softmax(all_logits, axis=-1)
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]  # [B, C]
    return picked, jnp.argmax(all_logits, axis=-1) == targets
