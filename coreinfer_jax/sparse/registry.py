"""Methods by name: what the command line, the lm-eval adapter and sweeps build methods from."""

from __future__ import annotations

from pathlib import Path

from coreinfer_jax.errors import MethodError
from coreinfer_jax.sparse.calibration import Calibration
from coreinfer_jax.sparse.hybrid import Hybrid
from coreinfer_jax.sparse.method import Dense, Method
from coreinfer_jax.sparse.predictor import Predictor
from coreinfer_jax.sparse.similarity import Similarity
from coreinfer_jax.sparse.stability import Stability

METHODS: dict[str, type[Method]] = {"dense": Dense, "stability": Stability, "similarity": Similarity,
                                    "hybrid": Hybrid}


def make_method(name: str, keep: float | None = None, token_keep: float = 0.2, layers: tuple[int, int] | None = None,
                calibration: Calibration | str | Path | None = None, rule: str | None = None,
                layer_keep: tuple[int, ...] | None = None, dynamic: float | None = None,
                predictor: Predictor | str | Path | None = None) -> Method:
    """A method from settings by name; settings left None take the method's defaults (stability:
    keep 0.4, the paper's rule; hybrid: the model family's recommended configuration)."""
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    if name != "hybrid" and (dynamic is not None or predictor is not None):
        raise MethodError(f"dynamic neurons and a predictor apply to the hybrid method, not {name}")
    if name not in ("stability", "hybrid") and rule is not None:
        raise MethodError(f"a selection rule applies to the stability and hybrid methods, not {name}")
    if name != "stability" and layer_keep is not None:
        raise MethodError(f"a per-layer budget applies to the stability method, not {name}")
    if name != "similarity" and calibration is not None:
        raise MethodError(f"a calibration is only used by the similarity method, not {name}")
    if name == "dense":
        if keep is not None or layers is not None:
            raise MethodError("keep and layers apply to the sparse methods, not dense")
        return Dense()
    if name == "hybrid":
        return Hybrid(keep=keep, dynamic=dynamic, rule=rule, token_keep=token_keep, layers=layers, predictor=predictor)
    keep = 0.4 if keep is None else keep
    if name == "similarity":
        if calibration is None:
            raise MethodError("the similarity method needs a calibration (--calibration DIR), made by "
                              "`python -m coreinfer_jax calibrate`")
        return Similarity(calibration=calibration, keep=keep, layers=layers)
    return Stability(keep=keep, token_keep=token_keep, layers=layers, rule=rule or "paper", layer_keep=layer_keep)


def parse_layers(text: str) -> tuple[int, int]:
    """`"6:25"` -> `(6, 25)`."""
    try:
        first, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise MethodError(f"--layers must look like START:END (half-open), got {text!r}") from None
    return first, end
