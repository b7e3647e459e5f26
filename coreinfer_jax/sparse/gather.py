"""Gathering core neurons' weights: rows of the neuron-major FFN matrices, once per generation.

The gather is its own jitted program, not part of decode: inside the decode program XLA
computed the gathered matrices in a layout the decode dots read about 15% slower (SmolLM2, CPU).

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


def gather_core_weights(ffn: Params, idx: jnp.ndarray) -> Params:
    """Core-neuron FFN weights: rows `idx` (`[B, K]` per row, or `[K]` shared) of every
    neuron-major tensor.

    `w_*` `[F, D]` -> `[B, K, D]` (or `[K, D]`), `b_gate`/`b_up` `[F]` -> `[B, K]` (or `[K]`);
    `b_down` stays whole.
    """
    return {name: jnp.take(w, idx, axis=0) if name in NEURON_ROWS else w for name, w in ffn.items()}


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


@functools.partial(jax.jit, static_argnames=("counts", "shards", "shared"))
def gather_core_layers(ffns: list[Params], core: jnp.ndarray, *, counts: tuple[int, ...], shards: int = 1,
                       shared: bool = False) -> list[Params]:
    """`gather_core_weights` of each sparse layer's FFN with its first `counts[j]` indices of
    `core[:, j]` `[B, n_sparse, n_max]` (a static slice: a layer reads exactly its own count);
    `shared`: of row 0 only, `[K, D]`. Shard-local ids (`shards` > 1) are gathered on each
    device (`gather_rows`)."""
    with jax.named_scope("gather_core_neurons"):
        return [gather_rows(ffn, core[0, j, :n] if shared else core[:, j, :n], shards)
                for j, (ffn, n) in enumerate(zip(ffns, counts))]
