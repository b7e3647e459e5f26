"""The `n` highest scores of each row without sorting it: a radix selection, the form of
`rules.top_neurons_and_mask` that a decode step on a GPU runs.

`lax.top_k` sorts. XLA's GPU sort of one `[1, 14336]` row (the hybrid's per-token choice at
Llama-3-8B widths, every sparse layer at every step) is six kernels, four of them one block
of 1024 threads each: 56 us on an H200 (the single-row sorts of the 2026-12-04 trace), about
1.7 ms of every token over 30 sparse layers, more than the layer's FFN reads.

Choosing needs no order, only the threshold and the ties:
1. each score as an unsigned integer key in the same order (IEEE total order: the sign bit
   flipped for positive numbers, every bit for negative ones);
2. the `n`-th largest key, 8 bits at a time from the top: count the keys at or above each of
   the 256 values of the next byte among those that match the bytes found so far (one
   comparison-and-sum kernel), keep the largest byte value that still counts `n`;
3. every key above it is chosen, and the first keys equal to it (lowest ids, as `top_k`
   takes ties) up to `n`;
4. the chosen ids written in increasing order at their ranks (a running count, then one
   scatter).
All integer arithmetic: exact on every backend, two passes for 16-bit scores, four for
32-bit ones. The ids come out in increasing order, not by score: a sum over them adds in
another order than over `top_k`'s, so results agree to rounding, not bit for bit.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

DIGIT_BITS = 8


def ordered_keys(scores: jnp.ndarray) -> tuple[jnp.ndarray, int]:
    """`scores` `[R, F]` (16- or 32-bit floats) as `uint32` keys that order as the scores do
    (IEEE total order), and the scores' width in bits."""
    bits = jnp.finfo(scores.dtype).bits
    raw = lax.bitcast_convert_type(scores, {16: jnp.uint16, 32: jnp.uint32}[bits]).astype(jnp.uint32)
    sign, every = jnp.uint32(1 << (bits - 1)), jnp.uint32((1 << bits) - 1)
    return jnp.where(raw & sign, every ^ raw, raw | sign), bits  # [R, F]


def radix_top(scores: jnp.ndarray, n: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Each row's `n` (1..F) highest `scores` `[R, F]`, ties to the lower id: their ids
    `int32 [R, n]` in increasing order, and `bool [R, F]`, True at them."""
    R, F = scores.shape
    key, bits = ordered_keys(scores)  # [R, F]
    threshold = jnp.zeros((R,), jnp.uint32)  # the bytes of the n-th largest key found so far
    above = jnp.zeros((R,), jnp.int32)  # keys known to be above it
    levels = jnp.arange(1 << DIGIT_BITS, dtype=jnp.uint32)
    for shift in range(bits - DIGIT_BITS, -1, -DIGIT_BITS):
        digit = (key >> shift) & levels[-1]  # [R, F]
        at_or_above = digit[:, None, :] >= levels[None, :, None]  # [R, 256, F]
        if shift + DIGIT_BITS < bits:  # only keys whose higher bytes are the threshold's
            same = (key >> (shift + DIGIT_BITS)) == (threshold >> (shift + DIGIT_BITS))[:, None]  # [R, F]
            at_or_above &= same[:, None, :]
        counts = jnp.sum(at_or_above, axis=-1, dtype=jnp.int32)  # [R, 256]: non-increasing
        # The largest byte value under which `n - above` keys still lie (level 0 always counts
        # them all, so it is the number of higher levels that do).
        byte = jnp.sum(counts[:, 1:] >= (n - above)[:, None], axis=-1, dtype=jnp.int32)  # [R]
        counts = jnp.pad(counts, ((0, 0), (0, 1)))  # [R, 257]: none above the top level
        above = above + jnp.take_along_axis(counts, (byte + 1)[:, None], axis=1)[:, 0]
        threshold = threshold | (byte.astype(jnp.uint32) << shift)
    over, tie = key > threshold[:, None], key == threshold[:, None]  # [R, F] each
    before = jnp.cumsum(jnp.stack([over, tie], axis=1).astype(jnp.int32), axis=-1)  # [R, 2, F], inclusive
    over_before, tie_before = before[:, 0] - over, before[:, 1] - tie  # [R, F] each, exclusive
    ties = (n - above)[:, None]  # [R, 1]: how many keys equal to the threshold are chosen
    mask = over | (tie & (tie_before < ties))  # [R, F]
    rank = jnp.where(mask, over_before + jnp.minimum(tie_before, ties), n)  # [R, F]; n: not written
    ids = jnp.zeros((R, n), jnp.int32).at[jnp.arange(R)[:, None], rank].set(
        jnp.broadcast_to(jnp.arange(F, dtype=jnp.int32), (R, F)), mode="drop", unique_indices=True)  # [R, n]
    return ids, mask
