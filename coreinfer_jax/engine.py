"""The two compiled programs: pre-fill (with core-neuron selection) and the decode loop.

`prefill` runs the right-padded prompts `[B, T]` densely, fills a fresh KV cache, returns
the last real position's logits and, for sparse methods, the core-neuron indices
`int32 [B, n_sparse_layers, n_keep]`: stability-guided selects them in every sparse layer by
its rule (`rules.RULES`; with a per-layer budget each layer its own count, padded with -1 to
the widest), similarity-guided assigns the prompt to a calibration cluster at one layer and
takes that cluster's lists. `sparse_params` gathers those neurons' weights once per generation, and
`decode` runs a `lax.while_loop` of single-token steps on them with the KV cache donated.
All are jitted at module level with the config, method and sampling as static arguments;
prompt lengths are padded to buckets by the caller, so a new prompt length reuses the
compiled code.

The gather is its own program on purpose: inside the decode program XLA computed the
gathered matrices in a layout the decode dots read about 15% slower (SmolLM2, CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from coreinfer_jax.config import ModelConfig
from coreinfer_jax.methods import Method, Similarity, SparseMethod, Stability, layer_neurons
from coreinfer_jax.model import Cache, forward, init_cache, logits
from coreinfer_jax.params import Params
from coreinfer_jax.rules import RULES
from coreinfer_jax.sampling import Sampling, sample
from coreinfer_jax.selection import assign_clusters, n_keep_for, sentence_signature

GATHERED_ROWS = ("w_gate", "w_up", "w_down", "b_gate", "b_up")


def selecting_layers(method: Method) -> frozenset[int]:
    """The layers whose pre-fill activations `method` reads."""
    if isinstance(method, Stability):
        return frozenset(method.sparse_layers())
    if isinstance(method, Similarity):
        return frozenset({method.layer})
    return frozenset()


def select_in_layer(method: SparseMethod, activation: jnp.ndarray, valid: jnp.ndarray,
                    tables: Params | None, n_keep: int | None = None) -> jnp.ndarray:
    """What `method` takes from a selecting layer's activations `[B, T, F]` over `valid` `[B, T]`:
    stability, that layer's `n_keep` core neurons `[B, n_keep]` by `method.rule` (None: the
    uniform `int(F * keep)`); similarity, each prompt's cluster `[B]`."""
    if isinstance(method, Stability):
        if n_keep is None:
            # The streamed (offload) pre-fill compiles one layer program for all layers and
            # does not know which layer it runs, so it cannot serve per-layer counts.
            if method.layer_keep is not None:
                raise ValueError("a per-layer budget (layer_keep) is not supported in offload mode")
            n_keep = n_keep_for(activation.shape[-1], method.keep)
        return RULES[method.rule](activation, valid, n_keep, method.token_keep)
    signature = sentence_signature(activation, valid, method.signature_size)  # [B, F]
    return assign_clusters(signature, tables["centroids"])


def core_neurons(method: Method, selected: list[jnp.ndarray], tables: Params | None) -> jnp.ndarray | None:
    """Core neurons `int32 [B, n_sparse, n_max]` from what the selecting layers returned.

    With a per-layer budget, layer j's `layer_neurons[j]` ids come first and the rest of its
    row is -1; `sparse_params` slices each layer to its count statically.
    """
    if isinstance(method, Stability):
        n_max = max(s.shape[1] for s in selected)
        return jnp.stack([jnp.pad(s, ((0, 0), (0, n_max - s.shape[1])), constant_values=-1)
                          for s in selected], axis=1)  # [B, n_sparse, n_max]
    if isinstance(method, Similarity):
        return cluster_core_neurons(tables["neurons"], selected[0], method=method)
    return None


@functools.partial(jax.jit, static_argnames=("method",))
def cluster_core_neurons(neurons: jnp.ndarray, cluster: jnp.ndarray, *, method: Similarity) -> jnp.ndarray:
    """The first `n_keep` neurons of each sparse layer's list `[B, n_sparse, n_keep]` of each
    row's `cluster` `[B]`, from the calibration's `neurons` `[k, num_layers, list_length]`."""
    first, end = method.layers
    with jax.named_scope("cluster_core_neurons"):
        return jnp.take(neurons[:, first:end, : method.n_keep], cluster, axis=0)


def _selector(method: Method, valid: jnp.ndarray, tables: Params | None, width: int):
    layers = selecting_layers(method)
    if not layers:
        return None
    counts = dict(zip(method.sparse_layers(), layer_neurons(method, width))) if isinstance(method, Stability) else {}

    def select(layer: int, activation: jnp.ndarray) -> jnp.ndarray | None:
        return select_in_layer(method, activation, valid, tables, counts.get(layer)) if layer in layers else None

    return select


@functools.partial(jax.jit, static_argnames=("cfg", "method", "cache_len"))
def prefill(params: Params, tokens: jnp.ndarray, lengths: jnp.ndarray, tables: Params | None = None, *,
            cfg: ModelConfig, method: Method, cache_len: int) -> tuple[jnp.ndarray, Cache, jnp.ndarray | None]:
    """Dense pre-fill of right-padded `tokens` `[B, T]` with real `lengths` `[B]`.

    `tables` are the method's arrays (`methods.method_tables`; None unless similarity).
    Returns last-token logits `[B, V]`, the cache (`cache_len` slots) and core neurons
    `[B, n_sparse, n_keep]` (None for dense).
    """
    B, T = tokens.shape
    cache = init_cache(cfg, B, cache_len, params["embed"].dtype)
    valid = jnp.arange(T)[None, :] < lengths[:, None]  # [B, T]
    with jax.named_scope("prefill"):
        h, cache, selected = forward(params, cfg, tokens, jnp.zeros((B,), jnp.int32), cache,
                                     select=_selector(method, valid, tables, cfg.intermediate_size), prefix=False)
        last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
        out = logits(params, cfg, last)
    return out, cache, core_neurons(method, selected, tables)  # core [B, n_sparse, n_max]


def gather_core_weights(ffn: Params, idx: jnp.ndarray) -> Params:
    """Per-row core-neuron FFN weights: rows `idx` `[B, K]` of every neuron-major matrix.

    `w_*` `[F, D]` -> `[B, K, D]`, `b_gate`/`b_up` `[F]` -> `[B, K]`; `b_down` stays whole.
    """
    return {name: jnp.take(w, idx, axis=0) if name in GATHERED_ROWS else w for name, w in ffn.items()}


@functools.partial(jax.jit, static_argnames=("counts",))
def _gather_layers(ffns: list[Params], core: jnp.ndarray, counts: tuple[int, ...]) -> list[Params]:
    """`gather_core_weights` of each sparse layer's FFN with its first `counts[j]` indices
    `core[:, j]` (a static slice: a layer reads exactly its own count of neurons)."""
    with jax.named_scope("gather_core_neurons"):
        return [gather_core_weights(ffn, core[:, j, :n]) for j, (ffn, n) in enumerate(zip(ffns, counts))]


def sparse_params(params: Params, core: jnp.ndarray, method: SparseMethod) -> Params:
    """`params` with each sparse layer's FFN replaced by its core neurons `core[:, j]`.

    Only the FFNs of sparse layers enter the jitted gather: a jitted function returning the
    other weights would copy them (the whole model) on every generation.
    """
    sparse = method.sparse_layers()
    width = params["layers"][sparse[0]]["ffn"]["w_up"].shape[0]
    gathered = _gather_layers([params["layers"][i]["ffn"] for i in sparse], core, layer_neurons(method, width))
    layers = list(params["layers"])
    for i, ffn in zip(sparse, gathered):
        layers[i] = dict(layers[i], ffn=ffn)
    return dict(params, layers=layers)


# XLA's CPU copy insertion, without region analysis, copies loop-carried KV cache buffers
# at each step of the while loop even though each is updated in place. With it, and with
# `model.attention` writing the cache after its last read, there are none; either alone left
# 120 of SmolLM2's 240 copies per token (all of them: ~3-4% of decode speed in an A/B).
# GPU copy insertion ignores the option.
_LOOP_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "max_steps", "return_logits"),
                   donate_argnames=("cache",), compiler_options=_LOOP_COMPILER_OPTIONS)
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


@functools.partial(jax.jit, static_argnames=("cfg",))
def score_continuation(weights: Params, first_logits: jnp.ndarray, cache: Cache, lengths: jnp.ndarray,
                       targets: jnp.ndarray, *, cfg: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Teacher-forced decode of `targets` `[B, C]` after pre-fill, as one chunk.

    Target 0 is scored by the pre-fill's `first_logits`; targets `0..C-2` run through the
    model at positions `lengths + t` and score targets `1..C-1`. Returns each target's
    log-probability and whether it was the argmax, both `[B, C]`.
    """
    with jax.named_scope("score_continuation"):
        h, _, _ = forward(weights, cfg, targets[:, :-1], lengths, cache)
        chunk_logits = logits(weights, cfg, h)  # [B, C-1, V]
    all_logits = jnp.concatenate([first_logits[:, None], chunk_logits], axis=1)  # [B, C, V]
    logprobs = jax.nn.log_softmax(all_logits, axis=-1)
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]  # [B, C]
    return picked, jnp.argmax(all_logits, axis=-1) == targets
