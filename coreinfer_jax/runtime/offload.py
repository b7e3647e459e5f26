"""Memory-limited mode (the paper's `--memory_limit`): FFN weights live in host memory.

Only the non-FFN weights (embeddings, attention, norms, LM head) stay on the accelerator.
Pre-fill streams each layer's full FFN to the device, runs that layer, selects its core
neurons (similarity-guided: assigns the prompt's cluster at its layer) and drops the copy
(the next layer's transfer is issued first, so it overlaps the current layer's compute and
at most two layers' FFN are resident at once). Then only the core neurons' rows are
gathered on the host and placed on the device, and the ordinary `engine.decode` loop runs
on them: decoding never touches host memory again.
`Generator(..., offload=True)` (CLI `--offload`) runs generation this way; only sparse
methods can, since a dense decode would stream every FFN weight for every token.

Host storage (`split_params(host="auto")`):
  * an accelerator exposing the `pinned_host` memory kind (GPU, TPU): FFN arrays are JAX
    arrays in pinned host memory, so transfers are DMA; the core rows are gathered by a
    jitted gather that XLA runs on the host (`compute_on`, compute type "device_host"), whose
    output is placed in device memory, so only the kept rows cross the bus.
  * the CPU backend: plain NumPy arrays, gathered with `np.take`. CPU devices also report a
    `pinned_host` kind, but there host and "device" are the same RAM, so pinning buys nothing;
    `host="pinned_host"` forces that path anyway (the tests use it to cover it on CPU).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import compute_on as _compute_on_module

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.sparse.compensation import with_bias
from coreinfer_jax.sparse.gather import NEURON_ROWS
from coreinfer_jax.sparse.method import Method
from coreinfer_jax.models.forward import Cache, block, cache_shape, embed, logits, norm
from coreinfer_jax.models.params import Params
from coreinfer_jax.models.rope import inverse_frequencies, rotary_tables

PINNED = "pinned_host"
HOST_KINDS = ("auto", "numpy", PINNED)


def host_kind(device: jax.Device, host: str = "auto") -> str:
    """Where `split_params` keeps the FFN: "numpy" or "pinned_host" (see the module docstring)."""
    if host not in HOST_KINDS:
        raise CoreInferError(f"host must be one of {', '.join(HOST_KINDS)}, got {host!r}")
    pinned_available = PINNED in {m.kind for m in device.addressable_memories()}
    if host == PINNED and not pinned_available:
        raise CoreInferError(f"{device} has no {PINNED} memory")
    if host == "auto":
        return PINNED if pinned_available and device.platform != "cpu" else "numpy"
    return host


def _device_memory(device: jax.Device) -> jax.sharding.Sharding:
    # Explicit memory kind: a plain `device_put(x, device)` of a pinned_host array is refused.
    return jax.sharding.make_single_device_sharding(device, memory_kind="device")


def split_params(params: Params, cfg: ModelConfig, host: str = "auto") -> tuple[Params, list[Params]]:
    """`(device_params, host_ffn)`: every weight but the FFN on the default device (its layers
    without "ffn"), and each layer's FFN dict in host memory (NumPy or pinned_host arrays)."""
    device = jax.devices()[0]
    kind = host_kind(device, host)
    layers = params["layers"]
    if len(layers) != cfg.num_layers:
        raise CoreInferError(f"params have {len(layers)} layers, the config {cfg.num_layers}")
    rest = dict(params, layers=[{k: v for k, v in layer.items() if k != "ffn"} for layer in layers])
    device_params = jax.device_put(rest, _device_memory(device))
    if kind == PINNED:
        pinned = jax.sharding.make_single_device_sharding(device, memory_kind=PINNED)
        host_ffn = jax.device_put([layer["ffn"] for layer in layers], pinned)
    else:
        host_ffn = [jax.tree.map(np.asarray, layer["ffn"]) for layer in layers]
    return device_params, host_ffn


def _is_pinned(ffn: Params) -> bool:
    return isinstance(ffn["w_up"], jax.Array) and ffn["w_up"].sharding.memory_kind == PINNED


def device_bytes(tree: Any) -> int:
    """Bytes of `tree`'s leaves resident in accelerator memory (host and NumPy arrays excluded)."""
    return sum(x.nbytes for x in jax.tree.leaves(tree)
               if isinstance(x, jax.Array) and x.sharding.memory_kind in (None, "device"))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _embed(params: Params, tokens: jnp.ndarray, lengths: jnp.ndarray, *, cfg: ModelConfig
           ) -> tuple[jnp.ndarray, jnp.ndarray, tuple[jnp.ndarray, jnp.ndarray] | None, jnp.ndarray]:
    """Embeddings `[B, T, D]`, positions `[B, T]`, RoPE tables and the real-token mask `[B, T]`."""
    B, T = tokens.shape
    # Same dtypes as `forward` with start 0, so every layer sees identical inputs.
    positions = jnp.zeros((B,), jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    with jax.named_scope("prefill/embed"):
        x = embed(params, tokens, positions, cfg)  # [B, T, D]
    rope = rotary_tables(jnp.asarray(inverse_frequencies(cfg)), positions) if cfg.family == "llama" else None
    valid = jnp.arange(T)[None, :] < lengths[:, None]  # [B, T]
    return x, positions, rope, valid


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "method"))
def _layer(p: Params, x: jnp.ndarray, positions: jnp.ndarray, rope: tuple[jnp.ndarray, jnp.ndarray] | None,
           valid: jnp.ndarray, tables: Params | None, *, cfg: ModelConfig, cache_len: int,
           method: Method | None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray], jnp.ndarray | None]:
    """One pre-fill layer with a fresh KV cache; with `method` (a selecting layer), what
    `method.select` takes from it (`tables`: the method's arrays), else None.

    The layer index never enters the computation, so every layer shares one compile per
    variant (selecting or not): at most two compiles per prompt bucket.
    """
    B = x.shape[0]
    shape = cache_shape(cfg, B, cache_len)
    kv = {"k": jnp.zeros(shape, x.dtype), "v": jnp.zeros(shape, x.dtype)}  # [B, Hkv, hd, S]
    with jax.named_scope("prefill/layer"):
        x, kv, score = block(p, x, positions, jnp.zeros((B,), jnp.int32), kv, rope, cfg,
                             prefix=False)  # score [B, T, F]
        chosen = None
        if method is not None:
            with jax.named_scope("select_core_neurons"):
                chosen = method.select(score, valid, tables, None, p["ffn"])  # e.g. [B, n_keep] or cluster [B]
    return x, kv, chosen


@functools.partial(jax.jit, static_argnames=("cfg",))
def _head(params: Params, x: jnp.ndarray, lengths: jnp.ndarray, *, cfg: ModelConfig) -> jnp.ndarray:
    """Logits `[B, V]` at each row's last real token of hidden states `x` `[B, T, D]`."""
    with jax.named_scope("prefill"):
        # The final norm is per token, so normalising only the last one gives the same values.
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
        if "final_norm" in params:
            last = norm(params["final_norm"], last, cfg)
        return logits(params, cfg, last)


def prefill_streamed(device_params: Params, host_ffn: list[Params], tokens: jnp.ndarray, lengths: jnp.ndarray,
                     tables: Params | None = None, *, cfg: ModelConfig, method: Method,
                     cache_len: int) -> tuple[jnp.ndarray, Cache, jnp.ndarray | None]:
    """`engine.prefill` with each layer's FFN streamed from host memory; same results."""
    device = _device_memory(jax.devices()[0])
    top = {k: v for k, v in device_params.items() if k != "layers"}
    selecting = method.selecting_layers()
    x, positions, rope, valid = _embed(top, tokens, lengths, cfg=cfg)
    cache, selected = [], []
    upcoming = jax.device_put(host_ffn[0], device)
    for i, layer in enumerate(device_params["layers"]):
        with jax.profiler.TraceAnnotation(f"offload_layer_{i}"):
            ffn = upcoming
            if i + 1 < cfg.num_layers:
                # Issued before layer i is dispatched, so the copy overlaps its compute.
                upcoming = jax.device_put(host_ffn[i + 1], device)
            picked = i in selecting
            x, kv, chosen = _layer(dict(layer, ffn=ffn), x, positions, rope, valid, tables if picked else None,
                                   cfg=cfg, cache_len=cache_len, method=method if picked else None)
            # Dropping the last reference frees the device copy as soon as layer i has run.
            del ffn
        cache.append(kv)
        if chosen is not None:
            selected.append(chosen)
    out = _head(top, x, lengths, cfg=cfg)
    return out, cache, method.core_neurons(selected, tables)  # core [B, n_sparse, n_keep]


def _host_compute() -> Callable[..., Any]:
    """JAX's function transform that runs a function on the host: `f(*, compute_type,
    out_memory_spaces)` wraps `f`.

    JAX 0.10 has it as `compute_on2` (its `compute_on` is a context manager taking only
    `compute_type`); JAX 0.11 renamed it `compute_on`, deleted `compute_on2`, and the context
    manager is gone (calling it the old way fails: "compute_on() missing 2 required keyword-only
    arguments"). Chosen by signature, not version number, so a later rename of neither breaks it.
    """
    transform = _compute_on_module.compute_on
    if "out_memory_spaces" in inspect.signature(transform).parameters:
        return transform  # JAX >= 0.11
    return _compute_on_module.compute_on2  # JAX 0.10


def _host_rows(ffn: Params, idx: jnp.ndarray) -> Params:
    # `promise_in_bounds`: the ids are neuron indices below F by construction, and the default
    # mode's clamping adds constants that XLA has refused to mix with host-memory operands.
    return {name: w.at[idx].get(mode="promise_in_bounds") if name in NEURON_ROWS else w
            for name, w in ffn.items()}  # w_* [B, K, D], b_gate/b_up [B, K]


@jax.jit
def _gather_on_host(ffn: Params, idx: jnp.ndarray) -> Params:
    """Rows `idx` `[B, K]` of pinned_host FFN arrays, gathered on the host, output in device
    memory: only the gathered rows cross the bus."""
    gather = _host_compute()(_host_rows, compute_type="device_host", out_memory_spaces=jax.memory.Space.Device)
    return gather(ffn, idx)


def place_core_weights(device_params: Params, host_ffn: list[Params], core: jnp.ndarray | dict[str, jnp.ndarray],
                       method: Method) -> Params:
    """The decode param tree: `device_params` plus, per layer, the FFN on the device: for sparse
    layers only the rows `core` `[B, n_sparse, n_keep]` names (gathered on the host, like
    `sparse.gather.gather_core_weights`; with compensation's bias when `core` has one), for the
    others the whole FFN.

    Rows are per sequence, so a sparse layer holds `B * n_keep` rows: the saving over the full
    FFN shrinks with the batch and is gone once `B * keep >= 1`.
    """
    device = jax.devices()[0]
    sparse = {layer: j for j, layer in enumerate(method.sparse_layers())}
    pinned = _is_pinned(host_ffn[0])
    bias = core["bias"] if isinstance(core, dict) else None  # compensation's, already on the device
    ids = method.neuron_ids(core)
    if pinned:
        ids = jax.device_put(ids, jax.sharding.make_single_device_sharding(device, memory_kind=PINNED))
    else:
        ids = np.asarray(ids)
    layers = []
    for i, (layer, ffn) in enumerate(zip(device_params["layers"], host_ffn)):
        if i not in sparse:
            placed = jax.device_put(ffn, _device_memory(device))
        elif pinned:
            placed = _gather_on_host(ffn, ids[:, sparse[i]])
        else:
            idx = ids[:, sparse[i]]  # [B, K]
            placed = jax.device_put({name: np.take(w, idx, axis=0) if name in NEURON_ROWS else w
                                     for name, w in ffn.items()}, _device_memory(device))
        if bias is not None and i in sparse:
            placed = with_bias(placed, bias[:, sparse[i]])
        layers.append(dict(layer, ffn=placed))
    return dict(device_params, layers=layers)
