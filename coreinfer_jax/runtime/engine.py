"""The compiled programs: pre-fill (with the method's selection), the decode loop, and
teacher-forced scoring.

`prefill` runs the right-padded prompts `[B, T]` densely, fills a fresh KV cache, returns
the last real position's logits and what the method keeps (`core_neurons`, e.g.
`int32 [B, n_sparse_layers, n_keep]`; None for dense). The method's `decode_weights` then
builds the decode-time weights once per generation (its own small jitted gather), and
`decode` runs a `lax.while_loop` of single-token steps on them with the KV cache donated,
until the cache is full; `grow_cache` and `resume` continue it on a longer cache (decode
attention reads every slot it is given, so the cache only grows as positions reach it).
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
from coreinfer_jax.models.forward import FFN, Cache, ffn, forward, fuse_qkv, init_cache, logits
from coreinfer_jax.models.params import Params
from coreinfer_jax.runtime.sampling import Sampling, sample
from coreinfer_jax.sparse.method import Method


@functools.partial(jax.jit, static_argnames=("cfg", "method", "cache_len"))
def prefill(params: Params, tokens: jnp.ndarray, lengths: jnp.ndarray, tables: Params | None = None,
            counted: jnp.ndarray | None = None, *, cfg: ModelConfig, method: Method,
            cache_len: int) -> tuple[jnp.ndarray, Cache, jnp.ndarray | None]:
    """Dense pre-fill of right-padded `tokens` `[B, T]` with real `lengths` `[B]`.

    `tables` are the method's arrays (`method.tables()`). `counted` `bool [B]` (default: every
    row) marks the prompts; the other rows only fill a mesh's data axis, and a batch-shared
    selection, which pools its rows, does not count them. Returns last-token logits `[B, V]`,
    the cache (`cache_len` slots) and the method's core neurons (None for dense).
    """
    B, T = tokens.shape
    cache = init_cache(cfg, B, cache_len, params["embed"].dtype)
    valid = jnp.arange(T)[None, :] < lengths[:, None]  # [B, T]
    # Only a set the batch shares leaves the filling rows out of its choice. Their own statistics
    # (a per-row set, compensation's means) stay their prompt's, as one device would compute them.
    voting = None if counted is None or method.per_row_weights else valid & counted[:, None]  # [B, T]
    reading = method.selecting_layers()

    def select(layer: int, activation: jnp.ndarray) -> jnp.ndarray | None:
        if layer not in reading:
            return None
        return method.select(activation, valid, tables, layer, params["layers"][layer]["ffn"], voting)

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
           max_new_tokens: jnp.ndarray, eos_ids: jnp.ndarray, key: jax.Array,
           stop_table: jnp.ndarray | None = None, *, cfg: ModelConfig, sampling: Sampling, max_steps: int,
           return_logits: bool = False, ffn_fn: FFN = ffn) -> dict[str, jnp.ndarray]:
    """Generate up to `max_new_tokens` (<= `max_steps`; int32, one for all rows or `[B]`)
    tokens per row after pre-fill, until the rows' positions fill `cache` (its length is the
    attention window: see `resume`). A row allowed 0 or 1 keeps only pre-fill's token.

    `weights` are the method's decode weights (`method.decode_weights`) and `ffn_fn` its
    `decode_ffn`. `eos_ids` may be padded with -1 (no token is -1), so that a different
    number of stop tokens can share a compile. `key` is unused for greedy sampling.
    `stop_table` (`runtime.stop_strings`, `[S, V]`) also ends a row when its text contains
    a stop string: each row carries its automaton state, and stops at MATCHED (`S - 1`).

    Returns the loop state: `tokens` `[B, max_steps]` (-1 past a row's end), with
    `return_logits` the `logits` `[B, max_steps, V]` each token was chosen from, and the rest
    of `STATE`; the final `cache` (returned so the donated input buffers are updated in
    place); `steps` (forward passes run so far) and `more` (whether a row still wants tokens
    after the cache filled up: `resume` continues on a longer one).
    """
    B = lengths.shape[0]
    state = {}
    if not sampling.greedy:
        key, sub = jax.random.split(key)
        state["key"] = key
    first = sample(first_logits, None if sampling.greedy else sub, sampling)  # [B]
    state.update(i=jnp.int32(1), token=first, pos=lengths.astype(jnp.int32),
                 done=jnp.isin(first, eos_ids) | (max_new_tokens <= 1),
                 tokens=jnp.full((B, max_steps), -1, jnp.int32).at[:, 0].set(first))
    if stop_table is not None:
        state["stop_state"] = stop_table[0, first].astype(jnp.int32)  # [B]
        state["done"] |= state["stop_state"] == stop_table.shape[0] - 1
    if return_logits:
        state["logits"] = jnp.zeros((B, max_steps, first_logits.shape[-1]), jnp.float32).at[:, 0].set(first_logits)
    return _loop(weights, state, cache, max_new_tokens, eos_ids, stop_table, cfg, sampling, ffn_fn)


# What `decode` and `resume` carry from one step (and one call) to the next.
STATE = ("i", "token", "pos", "done", "tokens", "key", "logits", "stop_state")


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "ffn_fn"), donate_argnames=("state", "cache"),
                   compiler_options=_LOOP_COMPILER_OPTIONS)
def resume(weights: Params, state: dict[str, jnp.ndarray], cache: Cache, max_new_tokens: jnp.ndarray,
           eos_ids: jnp.ndarray, stop_table: jnp.ndarray | None = None, *, cfg: ModelConfig, sampling: Sampling,
           ffn_fn: FFN = ffn) -> dict[str, jnp.ndarray]:
    """Continue `decode` from its returned `state` (the `STATE` entries) with a longer `cache`.

    A decode step's attention reads every slot of the cache it is given, so the caller runs
    the loop in segments on a cache that grows (`grow_cache`) as positions fill it: each
    step reads at most about twice the live slots, and one compile per cache length serves
    every generation that reaches it.
    """
    return _loop(weights, state, cache, max_new_tokens, eos_ids, stop_table, cfg, sampling, ffn_fn)


@functools.partial(jax.jit, static_argnames=("slots",))
def grow_cache(cache: Cache, *, slots: int) -> Cache:
    """`cache` with empty slots appended up to `slots` per layer (`[B, Hkv, hd, slots]`)."""
    return [{name: jnp.pad(c, [(0, 0)] * 3 + [(0, slots - c.shape[-1])]) for name, c in layer.items()}
            for layer in cache]


def _loop(weights: Params, state: dict[str, jnp.ndarray], cache: Cache, max_new_tokens: jnp.ndarray,
          eos_ids: jnp.ndarray, stop_table: jnp.ndarray | None, cfg: ModelConfig, sampling: Sampling,
          ffn_fn: FFN) -> dict[str, jnp.ndarray]:
    slots = cache[0]["k"].shape[-1]

    def wanted(s):
        return jnp.any((s["i"] < max_new_tokens) & ~s["done"])

    def running(s):
        # A step at position `pos` writes slot `pos`: stop when that is past the cache.
        return wanted(s) & (jnp.max(s["pos"]) < slots)

    def step(s):
        with jax.named_scope("decode_step"):
            h, cache, _ = forward(weights, cfg, s["token"][:, None], s["pos"], s["cache"], ffn_fn=ffn_fn)
            step_logits = logits(weights, cfg, h[:, 0])  # [B, V]
        new = dict(s, i=s["i"] + 1, pos=s["pos"] + 1, cache=cache)
        if sampling.greedy:  # no key to split: the loop draws no random bits
            token = sample(step_logits, None, sampling)
        else:
            new["key"], sub = jax.random.split(s["key"])
            token = sample(step_logits, sub, sampling)
        new.update(token=token, tokens=s["tokens"].at[:, s["i"]].set(jnp.where(s["done"], -1, token)),
                   done=s["done"] | jnp.isin(token, eos_ids) | (s["i"] + 1 >= max_new_tokens))
        if stop_table is not None:
            new["stop_state"] = stop_table[s["stop_state"], token].astype(jnp.int32)  # [B]
            new["done"] |= new["stop_state"] == stop_table.shape[0] - 1
        if "logits" in s:
            new["logits"] = s["logits"].at[:, s["i"]].set(step_logits)
        return new

    # Built here, before the loop, once per call: XLA does not hoist a concatenation out of a
    # while loop, and a jitted function returning it would keep a second copy alive.
    weights = fuse_qkv(weights)
    final = lax.while_loop(running, step, dict(state, cache=cache))
    return dict(final, steps=final["i"] - 1, more=wanted(final))


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
