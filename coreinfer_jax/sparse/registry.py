"""Methods by name: what the command line, the lm-eval adapter and sweeps build methods from."""

from __future__ import annotations

from pathlib import Path

from coreinfer_jax.errors import MethodError
from coreinfer_jax.sparse.calibration import Calibration
from coreinfer_jax.sparse.method import Dense, Method
from coreinfer_jax.sparse.similarity import Similarity
from coreinfer_jax.sparse.stability import Stability

METHODS: dict[str, type[Method]] = {"dense": Dense, "stability": Stability, "similarity": Similarity}


def make_method(name: str, keep: float = 0.4, token_keep: float = 0.2, layers: tuple[int, int] | None = None,
                calibration: Calibration | str | Path | None = None, rule: str = "paper",
                layer_keep: tuple[int, ...] | None = None) -> Method:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    if name != "stability" and (rule != "paper" or layer_keep is not None):
        raise MethodError(f"a selection rule and a per-layer budget apply to the stability method, not {name}")
    if name == "similarity":
        if calibration is None:
            raise MethodError("the similarity method needs a calibration (--calibration DIR), made by "
                              "`python -m coreinfer_jax calibrate`")
        return Similarity(calibration=calibration, keep=keep, layers=layers)
    if calibration is not None:
        raise MethodError(f"a calibration is only used by the similarity method, not {name}")
    if name == "dense":
        return Dense()
    return Stability(keep=keep, token_keep=token_keep, layers=layers, rule=rule, layer_keep=layer_keep)


def parse_layers(text: str) -> tuple[int, int]:
    """`"6:25"` -> `(6, 25)`."""
    try:
        first, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise MethodError(f"--layers must look like START:END (half-open), got {text!r}") from None
    return first, end
