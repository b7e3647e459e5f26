"""Gathering core neurons' weights: rows of the neuron-major FFN matrices, once per generation.

The gather is its own jitted program, not part of decode: inside the decode program XLA
computed the gathered matrices in a layout the decode dots read about 15% slower (SmolLM2, CPU).

On one device the gather also writes the layout a GPU's matrix products read without copying
(`fused_layout`): gate and up rows as one `w_gate_up` `[.., 2K, D]`, K rounded up to a
multiple of `ROW_TILE` with zero rows. On an H200 (2026-12-04) XLA otherwise concatenated the
gate and up rows (so one product serves both) and padded the down rows to its tile at every
decode step, inside the loop: 141 MB per layer-step at Llama-3-8B shapes, more than the
method saved (`tools.gpu_compile` finds those copies without a GPU).

Under tensor parallelism (a mesh whose tensor axis splits the neurons over N devices, see
`models.sharding`) with shard-local core neurons (block s of the ids lies in device s's rows),
each device gathers from its own rows (`shard_map`): no FFN weight crosses devices, and the
gathered `[B, K, D]` is split on K like the full `[F, D]` on F.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from coreinfer_jax.models.params import Params
from coreinfer_jax.models.sharding import DATA, TENSOR, mesh_tensor_size

# The FFN tensors with one row per neuron (`[F, D]` matrices, `[F]` biases); `b_down` is per output.
NEURON_ROWS = ("w_gate", "w_up", "w_down", "b_gate", "b_up")
# GPU matrix products read the contracted neuron axis in tiles of 64-128 rows; XLA pads any
# other count inside the decode loop (5734 -> 5760 at 8B shapes, keep 0.4). FFNs narrower
# than `TILED_WIDTH` (test-sized models) are gathered unpadded: a tile would be most of them.
ROW_TILE = 128
TILED_WIDTH = 8 * ROW_TILE


def padded_rows(n: int, width: int) -> int:
    """Rows a gather of `n` of `width` neurons writes (and decode reads): `n` rounded up to
    `ROW_TILE`, at most `width`; `n` itself when `width < TILED_WIDTH`."""
    return n if width < TILED_WIDTH else min(-(-n // ROW_TILE) * ROW_TILE, width)


def gather_core_weights(ffn: Params, idx: jnp.ndarray) -> Params:
    """Core-neuron FFN weights: rows `idx` (`[B, K]` per row, or `[K]` shared) of every
    neuron-major tensor.

    `w_*` `[F, D]` -> `[B, K, D]` (or `[K, D]`), `b_gate`/`b_up` `[F]` -> `[B, K]` (or `[K]`);
    `b_down` stays whole.
    """
    return {name: jnp.take(w, idx, axis=0) if name in NEURON_ROWS else w for name, w in ffn.items()}


def fused_layout(ffn: Params, idx: jnp.ndarray) -> Params:
    """`gather_core_weights` in the layout decode's products read as they are: `idx` padded to
    `padded_rows(K, F)` with rows of zeros (gate, up, down and biases: a padding neuron's
    activation is act(0) * 0 = 0, or ReLU(0) = 0, and its down row adds 0), and gated
    models' gate and up rows as one `w_gate_up` `[.., 2 K', D]` (gate rows first; likewise
    `b_gate_up`)."""
    F, K = ffn["w_up"].shape[0], idx.shape[-1]
    idx = jnp.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, padded_rows(K, F) - K)], constant_values=F)  # [.., K']
    out = {name: jnp.take(w, idx, axis=0, mode="fill", fill_value=0) if name in NEURON_ROWS else w
           for name, w in ffn.items()}
    if "w_gate" in out:
        out["w_gate_up"] = jnp.concatenate([out.pop("w_gate"), out.pop("w_up")], axis=-2)  # [.., 2 K', D]
    if "b_gate" in out:
        out["b_gate_up"] = jnp.concatenate([out.pop("b_gate"), out.pop("b_up")], axis=-1)  # [.., 2 K']
    return out


def shard_local_gather(ffn: Params, idx: jnp.ndarray) -> Params:
    """`gather_core_weights` on each tensor-parallel device from its own rows: `idx` (global
    ids, block s in device s's rows) is split on its last axis like the rows on the first."""
    neuron_spec = {name: P(TENSOR) if name in NEURON_ROWS else P() for name in ffn}
    batch = (DATA,) if idx.ndim == 2 else ()
    out_spec = {name: P(*batch, TENSOR) if name in NEURON_ROWS else P() for name in ffn}

    def local(ffn: Params, idx: jnp.ndarray) -> Params:
        return gather_core_weights(ffn, idx - lax.axis_index(TENSOR) * ffn["w_up"].shape[0])

    return jax.shard_map(local, in_specs=(neuron_spec, P(*batch, TENSOR)), out_specs=out_spec)(ffn, idx)


def gather_rows(ffn: Params, idx: jnp.ndarray, shards: int) -> Params:
    """`gather_core_weights`, on each device from its own rows when `idx` is shard-local over
    `shards` blocks and the current mesh's tensor axis has that many devices."""
    local = shards > 1 and mesh_tensor_size() == shards
    return (shard_local_gather if local else gather_core_weights)(ffn, idx)


def gathered_rows(n: int, width: int, shards: int) -> int:
    """Rows decode reads of a sparse layer keeping `n` of `width` neurons over `shards` blocks:
    padded on one device (`fused_layout`), exactly `n` when shard-local."""
    return padded_rows(n, width) if shards == 1 else n


@functools.partial(jax.jit, static_argnames=("counts", "shards", "shared"))
def gather_core_layers(ffns: list[Params], core: jnp.ndarray, *, counts: tuple[int, ...], shards: int = 1,
                       shared: bool = False) -> list[Params]:
    """Each sparse layer's FFN with its first `counts[j]` indices of `core[:, j]`
    `[B, n_sparse, n_max]` (a static slice: a layer reads exactly its own count), in
    `fused_layout`; `shared`: of row 0 only, `[K', D]`. Shard-local ids (`shards` > 1) are
    gathered on each device as they are (`gather_rows`)."""
    gather = fused_layout if shards == 1 else functools.partial(gather_rows, shards=shards)
    with jax.named_scope("gather_core_neurons"):
        return [gather(ffn, core[0, j, :n] if shared else core[:, j, :n]) for j, (ffn, n) in enumerate(zip(ffns, counts))]
