"""Decoding methods: dense, or CoreInfer stability-guided sparse.

Method objects are frozen (hashable) dataclasses; they are static arguments of the jitted
pre-fill and decode, so one compile serves every prompt of a bucket.
"""

from __future__ import annotations

import dataclasses

from coreinfer_jax.config import ModelConfig
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
    """Stability-guided core neurons, selected in pre-fill from the prompt's activations.

    `layers` is a half-open range `(first, end)` of sparse layers; None means the paper's
    default scaled to the model's depth.
    """

    keep: float = 0.4
    token_keep: float = 0.2
    layers: tuple[int, int] | None = None
    name = "stability"

    def __post_init__(self) -> None:
        for field in ("keep", "token_keep"):
            value = getattr(self, field)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{field} must be in (0, 1], got {value}")

    def validate(self, cfg: ModelConfig) -> Stability:
        """This method with `layers` resolved for `cfg`; raises on a range outside the model."""
        first, end = self.layers or default_layer_range(cfg.num_layers)
        if not 0 <= first < end <= cfg.num_layers:
            raise ValueError(
                f"sparse layer range {first}:{end} is outside the model's {cfg.num_layers} layers "
                f"(need 0 <= START < END <= {cfg.num_layers})"
            )
        if n_keep_for(cfg.intermediate_size, self.keep) < 1:
            raise ValueError(f"keep={self.keep} keeps no neuron of {cfg.intermediate_size}")
        return dataclasses.replace(self, layers=(first, end))

    def sparse_layers(self) -> range:
        assert self.layers is not None, "call validate(cfg) first"
        return range(*self.layers)


Method = Dense | Stability
METHODS = {"dense": Dense, "stability": Stability}


def make_method(name: str, keep: float = 0.4, token_keep: float = 0.2,
                layers: tuple[int, int] | None = None) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    if name == "dense":
        return Dense()
    return Stability(keep=keep, token_keep=token_keep, layers=layers)


def parse_layers(text: str) -> tuple[int, int]:
    """`"6:25"` -> `(6, 25)`."""
    try:
        first, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--layers must look like START:END (half-open), got {text!r}") from None
    return first, end
