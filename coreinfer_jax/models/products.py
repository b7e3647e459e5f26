"""One token's products with rows that are gathered or unpacked on the fly, in the form each
backend's compiler fuses into one pass over the weights.

On a CPU, XLA fuses a 4-bit unpacking into a matrix-vector product (`x @ W.T`) and reads
the nibbles once, while a multiply-and-reduce form ran 5-7x slower (docs/hybrid.md#speed).
On a GPU it is the other way round (sm_90 deviceless compile, `tools.gpu_compile`): a
product kernel takes no unpacking or gather as its operand, so XLA writes the unpacked or
gathered matrix out at every decode step (235 MB per layer-step for the sketch at 8B
shapes), while a multiply-and-reduce with the unpacking or the gather (in "clip" mode) as
its producer compiles to one reduction kernel that reads the weights where they lie.

`by_platform` picks the form when the program is lowered (`lax.platform_dependent`), so
one trace serves both and the CPU keeps its measured form. Both forms accumulate in float32.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from jax import lax

# Tests set this to "gpu" to run the GPU forms on a CPU (and compare them with the CPU's).
FORCE: str | None = None


def by_platform(cpu: Callable, gpu: Callable, *args):
    """`cpu(*args)` in programs lowered for a CPU, `gpu(*args)` for any other backend."""
    if FORCE is not None:
        return (gpu if FORCE == "gpu" else cpu)(*args)
    return lax.platform_dependent(*args, cpu=cpu, default=gpu)


def times_rows(x: jnp.ndarray, rows: jnp.ndarray, row_scale: jnp.ndarray | None = None) -> jnp.ndarray:
    """`x` `[B, T, D]` times `rows` `[R, D]` (each row's dot product with x): `[B, T, R]`, in
    x's dtype. Chunks of several tokens (`T > 1`) reuse each row: a product on every backend.
    `row_scale` `[B, 1, 1]`: one token's `x` is an unfinished norm (`forward.norm_for_products`),
    finished after the reduction on a GPU (on a CPU that `x` is finished already)."""
    if x.shape[-2] > 1:
        assert row_scale is None, "a norm is left unfinished in one-token decode steps only"
        return x @ rows.T
    return by_platform(lambda x, w, r: x @ w.T,
                       lambda x, w, r: _finish(jnp.sum(x[..., None, :] * w, axis=-1, dtype=jnp.float32), r, x.dtype),
                       x, rows, row_scale)


def times_gathered(x: jnp.ndarray, w: jnp.ndarray, idx: jnp.ndarray, row_scale: jnp.ndarray | None = None
                   ) -> jnp.ndarray:
    """One token per row: `x` `[B, D]` times rows `idx` `[B, n]` of `w` `[F, D]`: `[B, n]`
    (`row_scale` `[B, 1]`: as in `times_rows`)."""
    return by_platform(lambda x, w, i, r: jnp.einsum("bd,bnd->bn", x, jnp.take(w, i, axis=0)),
                       lambda x, w, i, r: _finish(jnp.sum(x[:, None, :] * jnp.take(w, i, axis=0, mode="clip"), axis=-1,
                                                          dtype=jnp.float32), r, x.dtype),
                       x, w, idx, row_scale)


def gathered_times(h: jnp.ndarray, w: jnp.ndarray, idx: jnp.ndarray) -> jnp.ndarray:
    """One token per row: `h` `[B, n]` weighting rows `idx` `[B, n]` of `w` `[F, D]`, summed: `[B, D]`."""
    return by_platform(lambda h, w, i: jnp.einsum("bn,bnd->bd", h, jnp.take(w, i, axis=0)),
                       lambda h, w, i: jnp.sum(h[:, :, None].astype(jnp.float32) * jnp.take(w, i, axis=0, mode="clip"),
                                               axis=1).astype(h.dtype),
                       h, w, idx)


def _finish(total: jnp.ndarray, row_scale: jnp.ndarray | None, dtype: jnp.dtype) -> jnp.ndarray:
    """A float32 reduction times its rows' norm factor (when there is one), rounded once."""
    return (total if row_scale is None else total * row_scale).astype(dtype)
