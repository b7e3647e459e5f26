"""Gathering core neurons' weights: rows of the neuron-major FFN matrices, once per generation.

The gather is its own jitted program, not part of decode: inside the decode program XLA
computed the gathered matrices in a layout the decode dots read about 15% slower (SmolLM2, CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from coreinfer_jax.models.params import Params

# The FFN tensors with one row per neuron (`[F, D]` matrices, `[F]` biases); `b_down` is per output.
NEURON_ROWS = ("w_gate", "w_up", "w_down", "b_gate", "b_up")


def gather_core_weights(ffn: Params, idx: jnp.ndarray) -> Params:
    """Per-row core-neuron FFN weights: rows `idx` `[B, K]` of every neuron-major tensor.

    `w_*` `[F, D]` -> `[B, K, D]`, `b_gate`/`b_up` `[F]` -> `[B, K]`; `b_down` stays whole.
    """
    return {name: jnp.take(w, idx, axis=0) if name in NEURON_ROWS else w for name, w in ffn.items()}


@functools.partial(jax.jit, static_argnames=("counts",))
def gather_core_layers(ffns: list[Params], core: jnp.ndarray, *, counts: tuple[int, ...]) -> list[Params]:
    """`gather_core_weights` of each sparse layer's FFN with its first `counts[j]` indices of
    `core[:, j]` `[B, n_sparse, n_max]` (a static slice: a layer reads exactly its own count)."""
    with jax.named_scope("gather_core_neurons"):
        return [gather_core_weights(ffn, core[:, j, :n]) for j, (ffn, n) in enumerate(zip(ffns, counts))]
