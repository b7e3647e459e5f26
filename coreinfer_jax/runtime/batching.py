"""Packing requests for the compiled programs: prompt-length buckets, KV-cache lengths and
the segments decode runs on, stop-token arrays, token-id checks.

Shapes are part of every compiled program's signature, so everything here rounds them:
prompts pad to power-of-two buckets, caches to multiples of `CACHE_ROUND`, stop-token arrays
to powers of two, so that nearby requests share a compile.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from coreinfer_jax.errors import InputError

MIN_BUCKET = 16
CACHE_ROUND = 64
# The first KV-cache length decode runs on (when the prompt fits); it doubles from there.
# A power of two, like the prompt buckets.
MIN_WINDOW = 256
# Stop-token arrays are padded (with -1) to a power of two at least this long.
MIN_STOP_IDS = 8


def prompt_bucket(length: int, context: int) -> int:
    """Padded pre-fill length: the next power of two >= `length` (at least 16, at most `context`)."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, context)


def cache_length(bucket: int, max_new_tokens: int) -> int:
    """KV-cache slots, rounded up so nearby `max_new_tokens` values share a compile."""
    need = bucket + max_new_tokens
    return -(-need // CACHE_ROUND) * CACHE_ROUND


def cache_windows(bucket: int, longest: int, max_new_tokens: int) -> list[int]:
    """The KV-cache lengths decode runs on, one per segment, the last `cache_length`.

    Decode attention reads every slot of the cache it is given, so the cache starts short
    and doubles (`MIN_WINDOW`, 2x, 4x, ...) as positions fill it; a step reads at most about
    twice the live slots instead of the whole padded length. The first step, at position
    `longest`, needs a longer cache; a power of two longer than `longest` also holds the
    `bucket` slots pre-fill writes.
    """
    final = cache_length(bucket, max_new_tokens)
    windows = []
    slots = MIN_WINDOW
    while slots < final:
        if slots > longest:
            windows.append(slots)
        slots *= 2
    return windows + [final]


def stop_ids(ids: Sequence[int], vocab_size: int) -> jnp.ndarray:
    """Stop tokens as `int32 [n]`, padded with -1 (never a token) to a power of two >=
    `MIN_STOP_IDS`: the array's length is part of the decode loop's compiled signature."""
    ids = sorted(set(ids))
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise InputError(f"stop token {bad[0]} is outside the vocabulary (ids 0..{vocab_size - 1})")
    size = MIN_STOP_IDS
    while size < len(ids):
        size *= 2
    return jnp.asarray(ids + [-1] * (size - len(ids)), jnp.int32)


def check_ids(rows: Sequence[Sequence[int]], vocab_size: int, what: str) -> None:
    """Raise InputError unless `rows` holds rows of integer token ids, each in `0..vocab_size-1`
    (the embedding lookup would read NaN past the end and wrap below 0, silently)."""
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__len__"):
        raise InputError(f"{what}s must be rows of token ids, e.g. [[1, 2, 3]], got {rows!r:.60}")
    for row in rows:
        ids = None if isinstance(row, (str, bytes)) or not hasattr(row, "__len__") else np.asarray(row)
        if ids is None or ids.ndim != 1:
            raise InputError(f"each {what} must be a row of token ids, got {row!r:.60}; several rows, e.g. "
                             f"[[1, 2, 3]], make a batch")
        if ids.size and ids.dtype.kind not in "iu":
            raise InputError(f"{what} token ids must be integers, got {ids.dtype} values such as "
                             f"{ids.flat[0].item()!r}")
        if ids.size and not 0 <= ids.min() <= ids.max() < vocab_size:
            bad = next(int(t) for t in ids if not 0 <= t < vocab_size)
            raise InputError(f"{what} token id {bad} is outside the vocabulary (ids 0..{vocab_size - 1})")
