"""The two compiled programs: pre-fill (with core-neuron selection) and the decode loop.

`prefill` runs the right-padded prompts `[B, T]` densely, fills a fresh KV cache, returns
the last real position's logits and, for sparse methods, the core-neuron indices
`int32 [B, n_sparse_layers, n_keep]`. `sparse_params` gathers those neurons' weights once
per generation, and `decode` runs a `lax.while_loop` of single-token steps on them with the
KV cache donated. All are jitted at module level with the config, method and sampling as
static arguments; prompt lengths are padded to buckets by the caller, so a new prompt
length reuses the compiled code.

The gather is its own program on purpose: inside the decode program XLA computed the
gathered matrices in a layout the decode dots read about 15% slower (SmolLM2, CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from coreinfer_jax.config import ModelConfig
from coreinfer_jax.methods import Dense, Method, Stability
from coreinfer_jax.model import Cache, forward, init_cache, logits
from coreinfer_jax.params import Params
from coreinfer_jax.sampling import Sampling, sample
from coreinfer_jax.selection import select_core_neurons

GATHERED_ROWS = ("w_gate", "w_up", "w_down", "b_gate", "b_up")


def _selector(method: Method, valid: jnp.ndarray):
    if isinstance(method, Dense):
        return None
    sparse = set(method.sparse_layers())

    def select(layer: int, activation: jnp.ndarray) -> jnp.ndarray | None:
        if layer not in sparse:
            return None
        return select_core_neurons(activation, valid, method.keep, method.token_keep)

    return select


@functools.partial(jax.jit, static_argnames=("cfg", "method", "cache_len"))
def prefill(params: Params, tokens: jnp.ndarray, lengths: jnp.ndarray, *, cfg: ModelConfig,
            method: Method, cache_len: int) -> tuple[jnp.ndarray, Cache, jnp.ndarray | None]:
    """Dense pre-fill of right-padded `tokens` `[B, T]` with real `lengths` `[B]`.

    Returns last-token logits `[B, V]`, the cache (`cache_len` slots) and core neurons
    `[B, n_sparse, n_keep]` (None for dense).
    """
    B, T = tokens.shape
    cache = init_cache(cfg, B, cache_len, params["embed"].dtype)
    valid = jnp.arange(T)[None, :] < lengths[:, None]  # [B, T]
    with jax.named_scope("prefill"):
        h, cache, selected = forward(params, cfg, tokens, jnp.zeros((B,), jnp.int32), cache,
                                     select=_selector(method, valid))
        last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
        out = logits(params, cfg, last)
    core = jnp.stack(selected, axis=1) if selected else None  # [B, n_sparse, n_keep]
    return out, cache, core


def gather_core_weights(ffn: Params, idx: jnp.ndarray) -> Params:
    """Per-row core-neuron FFN weights: rows `idx` `[B, K]` of every neuron-major matrix.

    `w_*` `[F, D]` -> `[B, K, D]`, `b_gate`/`b_up` `[F]` -> `[B, K]`; `b_down` stays whole.
    """
    return {name: jnp.take(w, idx, axis=0) if name in GATHERED_ROWS else w for name, w in ffn.items()}


@jax.jit
def _gather_layers(ffns: list[Params], core: jnp.ndarray) -> list[Params]:
    """`gather_core_weights` of each sparse layer's FFN with its indices `core[:, j]`."""
    with jax.named_scope("gather_core_neurons"):
        return [gather_core_weights(ffn, core[:, j]) for j, ffn in enumerate(ffns)]


def sparse_params(params: Params, core: jnp.ndarray, method: Stability) -> Params:
    """`params` with each sparse layer's FFN replaced by its core neurons `core[:, j]`.

    Only the FFNs of sparse layers enter the jitted gather: a jitted function returning the
    other weights would copy them (the whole model) on every generation.
    """
    sparse = method.sparse_layers()
    gathered = _gather_layers([params["layers"][i]["ffn"] for i in sparse], core)
    layers = list(params["layers"])
    for i, ffn in zip(sparse, gathered):
        layers[i] = dict(layers[i], ffn=ffn)
    return dict(params, layers=layers)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "max_steps", "return_logits"),
                   donate_argnames=("cache",))
def decode(weights: Params, first_logits: jnp.ndarray, cache: Cache, lengths: jnp.ndarray,
           max_new_tokens: jnp.ndarray, eos_ids: jnp.ndarray, key: jax.Array, *,
           cfg: ModelConfig, sampling: Sampling, max_steps: int,
           return_logits: bool = False) -> dict[str, jnp.ndarray]:
    """Generate up to `max_new_tokens` (<= `max_steps`) tokens per row after pre-fill.

    `weights` are the params, with sparse layers' FFN already gathered (`sparse_params`).

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
            h, cache, _ = forward(weights, cfg, s["token"][:, None], s["pos"], s["cache"])
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
