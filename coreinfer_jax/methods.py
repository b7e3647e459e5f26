"""Decoding methods: dense, or CoreInfer sparse, stability- or similarity-guided.

Method objects are frozen (hashable) dataclasses; they are static arguments of the jitted
pre-fill and decode, so one compile serves every prompt of a bucket. Arrays a method needs
on the device (similarity's calibration) are not part of it: `method_tables` hands them to
the jitted pre-fill as traced arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from coreinfer_jax.calibration import Calibration, CalibrationError
from coreinfer_jax.config import ModelConfig
from coreinfer_jax.params import Params
from coreinfer_jax.rules import check_rule
from coreinfer_jax.selection import n_keep_for

# The paper sparsifies layers strictly between 5 and 27 of 32 (6..26); other depths scale.
_PAPER_START, _PAPER_END, _PAPER_DEPTH = 5, 27, 32


def default_layer_range(num_layers: int) -> tuple[int, int]:
    """Half-open `[first, end)` of sparse layers, the paper's 6..26 of 32 scaled to depth."""
    start = round(_PAPER_START * num_layers / _PAPER_DEPTH)
    end = round(_PAPER_END * num_layers / _PAPER_DEPTH)
    return start + 1, end


@dataclasses.dataclass(frozen=True)
class Dense:
    name = "dense"

    def validate(self, cfg: ModelConfig) -> Dense:
        return self


@dataclasses.dataclass(frozen=True)
class Stability:
    """Core neurons selected in pre-fill from the prompt's own activations.

    `layers` is a half-open range `(first, end)` of sparse layers; None means the paper's
    default scaled to the model's depth. `rule` names the selection rule (`rules.RULES`;
    "paper" is CoreInfer's stability-guided rule). `layer_keep`, when given, is a per-layer
    budget: the neuron count of each sparse layer, totalling what `keep` keeps uniformly
    (the same FFN bytes per token), e.g. from `budget.Budget.layer_neurons`.
    """

    keep: float = 0.4
    token_keep: float = 0.2
    layers: tuple[int, int] | None = None
    rule: str = "paper"
    layer_keep: tuple[int, ...] | None = None
    name = "stability"

    def __post_init__(self) -> None:
        for field in ("keep", "token_keep"):
            value = getattr(self, field)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{field} must be in (0, 1], got {value}")
        check_rule(self.rule)
        if self.layer_keep is not None:
            # A list would make the method unhashable, and it is a static jit argument.
            object.__setattr__(self, "layer_keep", tuple(int(n) for n in self.layer_keep))

    def validate(self, cfg: ModelConfig) -> Stability:
        """This method with `layers` resolved for `cfg`; raises on a range outside the model or
        a per-layer budget of the wrong length, range or total."""
        method = dataclasses.replace(self, layers=_resolve_layers(self.layers, self.keep, cfg))
        if method.layer_keep is not None:
            check_layer_budget(method.layer_keep, len(method.sparse_layers()), cfg.intermediate_size, method.keep)
        return method

    def sparse_layers(self) -> range:
        assert self.layers is not None, "call validate(cfg) first"
        return range(*self.layers)

    def layer_neurons(self, width: int) -> tuple[int, ...]:
        """Neurons kept in each sparse layer, in `sparse_layers()` order."""
        return self.layer_keep or (n_keep_for(width, self.keep),) * len(self.sparse_layers())


def check_layer_budget(counts: tuple[int, ...], n_layers: int, width: int, keep: float) -> None:
    """Raise unless `counts` gives each of `n_layers` sparse layers 1..`width` neurons and
    totals `n_layers * int(width * keep)`, the uniform keep's neurons (and FFN bytes)."""
    if len(counts) != n_layers:
        raise ValueError(f"per-layer budget has {len(counts)} counts but there are {n_layers} sparse layers")
    if not all(1 <= n <= width for n in counts):
        raise ValueError(f"per-layer budget counts must be in 1..{width} (the FFN width), got {list(counts)}")
    want = n_layers * n_keep_for(width, keep)
    if sum(counts) != want:
        raise ValueError(f"per-layer budget totals {sum(counts)} neurons but keep={keep:g} keeps {want} "
                         f"({n_layers} layers x {n_keep_for(width, keep)})")


@dataclasses.dataclass(frozen=True)
class Similarity:
    """Similarity-guided core neurons: the prompt's signature at the calibration layer picks the
    nearest calibration cluster, whose neuron lists (the first `n_keep`) serve every sparse layer.

    `calibration` is a `Calibration` or its directory. It takes no part in equality and hashing:
    the compiled pre-fill depends only on the fields copied from it below (its arrays are
    traced arguments), so calibrations of the same shapes share one compile.
    """

    calibration: Calibration | str | Path = dataclasses.field(compare=False, repr=False)
    keep: float = 0.4
    layers: tuple[int, int] | None = None
    layer: int = dataclasses.field(init=False)
    signature_size: int = dataclasses.field(init=False)
    width: int = dataclasses.field(init=False)
    name = "similarity"

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        cal = self.calibration if isinstance(self.calibration, Calibration) else Calibration.load(self.calibration)
        object.__setattr__(self, "calibration", cal)
        object.__setattr__(self, "layer", cal.layer)
        object.__setattr__(self, "signature_size", cal.signature_size)
        object.__setattr__(self, "width", cal.width)

    @property
    def n_keep(self) -> int:
        return n_keep_for(self.width, self.keep)

    def validate(self, cfg: ModelConfig) -> Similarity:
        """This method with `layers` resolved for `cfg`; raises if the calibration was made for
        another model or holds fewer than `n_keep` neurons per list."""
        self.calibration.check_model(cfg)
        layers = _resolve_layers(self.layers, self.keep, cfg)
        if self.n_keep > self.calibration.list_length:
            raise CalibrationError(
                f"keep={self.keep} needs {self.n_keep} neurons per layer but the calibration stores "
                f"{self.calibration.list_length} (it was made with keep={self.calibration.keep}); "
                f"calibrate again with --keep {self.keep} or more")
        return dataclasses.replace(self, layers=layers)

    def sparse_layers(self) -> range:
        assert self.layers is not None, "call validate(cfg) first"
        return range(*self.layers)


def _resolve_layers(layers: tuple[int, int] | None, keep: float, cfg: ModelConfig) -> tuple[int, int]:
    first, end = layers or default_layer_range(cfg.num_layers)
    if not 0 <= first < end <= cfg.num_layers:
        raise ValueError(
            f"sparse layer range {first}:{end} is outside the model's {cfg.num_layers} layers "
            f"(need 0 <= START < END <= {cfg.num_layers})"
        )
    if n_keep_for(cfg.intermediate_size, keep) < 1:
        raise ValueError(f"keep={keep} keeps no neuron of {cfg.intermediate_size}")
    return first, end


Method = Dense | Stability | Similarity
SparseMethod = Stability | Similarity
METHODS = {"dense": Dense, "stability": Stability, "similarity": Similarity}


def variant(method: Method) -> str:
    """What distinguishes a stability method from CoreInfer's own rule in labels: "" for the
    paper rule with a uniform keep, else the rule, with "+budget" for a per-layer budget."""
    if not isinstance(method, Stability) or (method.rule == "paper" and method.layer_keep is None):
        return ""
    return method.rule + ("+budget" if method.layer_keep is not None else "")


def layer_neurons(method: SparseMethod, width: int) -> tuple[int, ...]:
    """Neurons each sparse layer of `method` keeps (similarity: `n_keep` in every layer)."""
    if isinstance(method, Stability):
        return method.layer_neurons(width)
    return (method.n_keep,) * len(method.sparse_layers())


def method_tables(method: Method) -> Params | None:
    """The arrays `method` needs in the jitted pre-fill, passed there as traced arguments:
    similarity's `centroids` `[k, F]` and `neurons` `[k, num_layers, list_length]`."""
    return method.calibration.device_tables if isinstance(method, Similarity) else None


def make_method(name: str, keep: float = 0.4, token_keep: float = 0.2, layers: tuple[int, int] | None = None,
                calibration: Calibration | str | Path | None = None, rule: str = "paper",
                layer_keep: tuple[int, ...] | None = None) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    if name != "stability" and (rule != "paper" or layer_keep is not None):
        raise ValueError(f"a selection rule and a per-layer budget apply to the stability method, not {name}")
    if name == "similarity":
        if calibration is None:
            raise ValueError("the similarity method needs a calibration (--calibration DIR), made by "
                             "`python -m coreinfer_jax calibrate`")
        return Similarity(calibration=calibration, keep=keep, layers=layers)
    if calibration is not None:
        raise ValueError(f"a calibration is only used by the similarity method, not {name}")
    if name == "dense":
        return Dense()
    return Stability(keep=keep, token_keep=token_keep, layers=layers, rule=rule, layer_keep=layer_keep)


def parse_layers(text: str) -> tuple[int, int]:
    """`"6:25"` -> `(6, 25)`."""
    try:
        first, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--layers must look like START:END (half-open), got {text!r}") from None
    return first, end


def layers_arg(text: str) -> tuple[int, int]:
    """`parse_layers` as an argparse type: its message, not argparse's generic one."""
    try:
        return parse_layers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
