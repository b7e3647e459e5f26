"""A low-rank activation predictor, the data: per layer, factors whose product approximates
the FFN's up (and gate) projection, so a decode step can rank all F neurons by reading
`r * (D + F)` numbers per projection instead of `F * D`.

For a projection `W` `[F, D]` (neuron-major, `h = x W^T`): `x A B ~ x W^T` with `A` `[D, r]`,
`B` `[r, F]`, fitted by `calibrate.predictor` as an activation-whitened truncated SVD (exact
where the FFN's inputs lie). Gated FFNs (`act(x Wg^T) * (x Wu^T)`) score a neuron
`|act(x Ag Bg) * (x Au Bu)|`; ReLU FFNs (OPT's `fc1`) by the predicted pre-activation.

On disk like a calibration (`artifact`: manifest + npz, atomic, checked on load):
`a_up [L, D, r]`, `b_up [L, r, F]` and, gated, `a_gate`, `b_gate`, for the `L` layers
`first .. end - 1` it was fitted for.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import Params
from coreinfer_jax.sparse import artifact

FORMAT = "coreinfer-jax-predictor"
FORMAT_VERSION = 1
MAKE = "python -m coreinfer_jax predictor --checkpoint CHECKPOINT --data FILE --out DIR"


class PredictorError(CoreInferError):
    """A predictor that is missing, corrupted, made for another model or too small for a method."""


def projections(family: str) -> tuple[str, ...]:
    """The projections a predictor approximates: gate and up (gated FFN), or up alone (`fc1`)."""
    return ("up",) if family == "opt" else ("gate", "up")


@dataclasses.dataclass(frozen=True, eq=False)
class Predictor:
    """Factors for layers `layers[0] .. layers[1] - 1` (see the module docstring).

    Equality and hashing are by content (`digest`).
    """

    model: dict[str, Any]
    rank: int
    layers: tuple[int, int]
    data_sha256: str
    tokens: int  # calibration tokens the covariance was measured on
    eps: float  # ridge added to the covariance, relative to its mean diagonal
    refine_steps: int  # optax steps that refined the SVD factors (0: plain whitened SVD)
    factors: dict[str, np.ndarray] = dataclasses.field(repr=False)  # a_up, b_up[, a_gate, b_gate]

    @functools.cached_property
    def digest(self) -> str:
        return artifact.digest(self._manifest_fields(), self.factors)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Predictor) and self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def covers(self, first: int, end: int) -> bool:
        return self.layers[0] <= first and end <= self.layers[1]

    def layer_factors(self, first: int, end: int) -> list[Params]:
        """Per layer `first .. end - 1`, its factors as device arrays (`a_up` `[D, r]`, ...)."""
        offset = first - self.layers[0]
        device = self.device_factors
        return [{name: f[offset + j] for name, f in device.items()} for j in range(end - first)]

    @functools.cached_property
    def device_factors(self) -> Params:
        return {name: jnp.asarray(f) for name, f in self.factors.items()}

    def bytes_per_layer(self) -> int:
        """Bytes one decode step reads per layer: `r * (D + F)` float32 numbers per projection."""
        return sum(int(f[0].nbytes) for f in self.factors.values())

    def check_model(self, cfg: ModelConfig) -> None:
        artifact.check_model(self.model, cfg, "predictor", PredictorError)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        return artifact.write(out, self._manifest_fields(), self.factors, PredictorError, overwrite)

    @classmethod
    def load(cls, path: str | Path, cfg: ModelConfig | None = None) -> Predictor:
        manifest, arrays = artifact.read(path, FORMAT, FORMAT_VERSION, _expected_arrays, PredictorError,
                                         "predictor", MAKE)
        predictor = cls(model=manifest["model"], rank=manifest["rank"], layers=tuple(manifest["layers"]),
                        data_sha256=manifest["data_sha256"], tokens=manifest["tokens"], eps=manifest["eps"],
                        refine_steps=manifest["refine_steps"], factors=arrays)
        if cfg is not None:
            predictor.check_model(cfg)
        return predictor

    def _manifest_fields(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": self.model, "rank": self.rank,
                "layers": list(self.layers), "data_sha256": self.data_sha256, "tokens": self.tokens,
                "eps": self.eps, "refine_steps": self.refine_steps}


def _expected_arrays(manifest: dict[str, Any]) -> dict[str, tuple[Any, tuple[int, ...]]]:
    model, r = manifest["model"], manifest["rank"]
    n = manifest["layers"][1] - manifest["layers"][0]
    D, F = model["hidden_size"], model["intermediate_size"]
    shapes = {}
    for proj in projections(model["family"]):
        shapes[f"a_{proj}"] = (np.float32, (n, D, r))
        shapes[f"b_{proj}"] = (np.float32, (n, r, F))
    return shapes


def predicted_scores(factors: Params, ffn: Params, x: jnp.ndarray, act: Any) -> jnp.ndarray:
    """Each neuron's predicted importance `[..., F]` for FFN inputs `x` `[..., D]` (larger: keep),
    from the layer's `factors` and the full `ffn`'s biases (read whole: `[F]` each)."""
    with jax.named_scope("predict_neurons"):
        up = (x @ factors["a_up"]) @ factors["b_up"]  # [..., F]
        if "b_up" in ffn:
            up = up + ffn["b_up"]
        if "a_gate" not in factors:
            return up
        gate = (x @ factors["a_gate"]) @ factors["b_gate"]  # [..., F]
        if "b_gate" in ffn:
            gate = gate + ffn["b_gate"]
        return jnp.abs(act(gate) * up)
