"""Per-layer neuron budgets, the data: measured sensitivities, and neurons allocated by them.

Measured by `calibrate.budget.measure` (`python -m coreinfer_jax budget`); `Budget.method(keep)`
is the `Stability` method with that keep's per-layer counts. A layer whose loss grows more
gets more neurons, in proportion to its sensitivity, with the same total as the uniform keep
(so the same FFN bytes per token). Each layer stays within [half, twice] the uniform count:
the sensitivity was measured at the uniform count and says little about a layer cut far below it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.paths import check_input
from coreinfer_jax.sparse.rules import check_rule
from coreinfer_jax.sparse.selection import n_keep_for
from coreinfer_jax.sparse.stability import Stability

MAKE = "python -m coreinfer_jax budget"  # the command that makes a budget file


class BudgetError(CoreInferError):
    """A budget file that cannot serve the requested method."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """Measured per-layer sensitivities (NLL increase per token) of `layers`, per keep."""

    rule: str
    layers: tuple[int, int]
    width: int
    token_keep: float
    sensitivity: dict[float, tuple[float, ...]]
    dense_nll_per_token: float
    windows: int

    def layer_neurons(self, keep: float) -> tuple[int, ...]:
        """Neurons per sparse layer at `keep`: proportional to the sensitivity measured at `keep`,
        totalling the uniform keep's `n_layers * int(F * keep)`."""
        if keep not in self.sensitivity:
            measured = ", ".join(f"{k:g}" for k in sorted(self.sensitivity))
            raise BudgetError(f"the budget was measured at keep {measured}, not {keep:g}; measure it with "
                              f"`python -m coreinfer_jax budget --data FILE --rule {self.rule} --layers "
                              f"{self.layers[0]}:{self.layers[1]} --keep {keep:g} --out FILE`")
        uniform = n_keep_for(self.width, keep)
        return allocate(self.sensitivity[keep], len(self.sensitivity[keep]) * uniform,
                        low=max(1, math.ceil(uniform / 2)), high=min(self.width, 2 * uniform))

    def method(self, keep: float) -> Stability:
        return Stability(keep=keep, token_keep=self.token_keep, layers=self.layers, rule=self.rule,
                         layer_keep=self.layer_neurons(keep))

    def to_json(self) -> dict:
        return {"rule": self.rule, "layers": list(self.layers), "width": self.width, "token_keep": self.token_keep,
                "windows": self.windows, "dense_nll_per_token": self.dense_nll_per_token,
                "sensitivity": {f"{k:g}": list(v) for k, v in self.sensitivity.items()},
                "layer_neurons": {f"{k:g}": list(self.layer_neurons(k)) for k in self.sensitivity}}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Budget:
        path = check_input(path, "file", "budget file", BudgetError, f"; make one with `{MAKE}`")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            budget = cls(rule=check_rule(d["rule"]), layers=tuple(d["layers"]), width=int(d["width"]),
                         token_keep=float(d["token_keep"]),
                         sensitivity={float(k): tuple(float(x) for x in v) for k, v in d["sensitivity"].items()},
                         dense_nll_per_token=float(d["dense_nll_per_token"]), windows=int(d["windows"]))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise BudgetError(f"{path} is not a budget file made by `{MAKE}`: {e}") from None
        n = budget.layers[1] - budget.layers[0]
        if any(len(v) != n for v in budget.sensitivity.values()):
            raise BudgetError(f"{path}: every sensitivity list must have {n} entries (layers {budget.layers})")
        return budget


def allocate(weights: Sequence[float], total: int, low: int, high: int) -> tuple[int, ...]:
    """Integer counts in `[low, high]` summing to `total`, proportional to `weights` where the
    bounds allow: `clip(s * w, low, high)` with the scale `s` found by bisection (the sum is
    monotone in `s`), then rounded by largest remainder."""
    w = np.maximum(np.asarray(weights, np.float64), 0.0) + 1e-12  # [n]
    if not len(w) * low <= total <= len(w) * high:
        raise CoreInferError(f"cannot give {len(w)} layers {low}..{high} neurons each and {total} in all")
    lo, hi = 0.0, high / w.min()
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.clip(mid * w, low, high).sum() < total:
            lo = mid
        else:
            hi = mid
    real = np.clip(hi * w, low, high)  # [n], sums to total up to bisection precision
    counts = np.floor(real).astype(np.int64)
    room = np.flatnonzero(counts < high)
    short = total - int(counts.sum())
    # Largest remainders first; stable order breaks ties by layer index.
    for i in room[np.argsort(-(real - counts)[room], kind="stable")][:short]:
        counts[i] += 1
    return tuple(int(c) for c in counts)
