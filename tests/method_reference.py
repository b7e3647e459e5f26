"""CoreInfer's stability-guided rule restated in plain NumPy from the method page, for tests."""

from __future__ import annotations

import numpy as np


def reference_select(acts: np.ndarray, keep: float, token_keep: float) -> tuple[np.ndarray, np.ndarray]:
    """The method page, step by step, for one prompt's real tokens `acts` `[T, F]`.

    Returns (kept neuron ids, per-neuron counts).
    """
    T, F = acts.shape
    P = int((acts > 0).sum())
    limit = int(token_keep * P / T)  # floor, Python floats like the reference
    counts = np.zeros(F, np.int64)
    for t in range(T):
        token_core = np.argsort(-acts[t], kind="stable")[:limit]
        counts[token_core] += 1
    n_keep = int(F * keep)
    kept = np.argsort(-counts, kind="stable")[:n_keep]
    return kept, counts
