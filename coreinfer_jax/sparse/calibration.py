"""A similarity-guided calibration, the data: per-cluster core-neuron lists, saved as plain arrays.

Made by `calibrate.similarity.calibrate` (`python -m coreinfer_jax calibrate`); read by the
`Similarity` method. On disk, DIR/manifest.json (format, model identity, layer, k, keep, data
sha256, inertias, content digest) and DIR/arrays.npz (centroids, neurons, labels, bit-packed
signatures), read with `allow_pickle=False`; written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import Params
from coreinfer_jax.sparse import artifact
from coreinfer_jax.sparse.selection import SIMILARITY_TOKEN_FRACTION

FORMAT = "coreinfer-jax-calibration"
FORMAT_VERSION = 1
# The reference clusters at layer 25 of 32 with 3000-neuron signatures of OPT-6.7B (F = 16384).
_REF_LAYER, _REF_DEPTH = 25, 32
_REF_SIGNATURE, _REF_WIDTH = 3000, 16384


class CalibrationError(CoreInferError):
    """A calibration that is missing, corrupted, or made for another model."""


def default_calibration_layer(num_layers: int) -> int:
    """The reference's signature layer 25 of 32, scaled to the model's depth."""
    return min(num_layers - 1, round(_REF_LAYER * num_layers / _REF_DEPTH))


def signature_size(width: int) -> int:
    """Neurons in a signature: the reference's 3000 of 16384, scaled to the FFN width."""
    return max(1, round(_REF_SIGNATURE * width / _REF_WIDTH))


@dataclasses.dataclass(frozen=True, eq=False)
class Calibration:
    """A similarity-guided calibration (see the module docstring).

    Equality and hashing are by content (`digest`).
    """

    model: dict[str, Any]
    layer: int  # signature layer
    keep: float  # lists hold int(F * keep) neurons: the largest keep this calibration serves
    signature_size: int
    data_sha256: str
    seed: int
    inertias: dict[int, float]  # k-means inertia per k fitted (k = 1..10 with "auto")
    centroids: np.ndarray = dataclasses.field(repr=False)  # float32 [k, F]
    neurons: np.ndarray = dataclasses.field(repr=False)  # int32 [k, num_layers, int(F * keep)]
    labels: np.ndarray = dataclasses.field(repr=False)  # int32 [N]: each calibration sentence's cluster
    signatures: np.ndarray = dataclasses.field(repr=False)  # bool [N, F]

    @property
    def clusters(self) -> int:
        return self.centroids.shape[0]

    @property
    def width(self) -> int:
        return self.centroids.shape[1]

    @property
    def num_layers(self) -> int:
        return self.neurons.shape[1]

    @property
    def list_length(self) -> int:
        return self.neurons.shape[2]

    @functools.cached_property
    def device_tables(self) -> Params:
        """The arrays the jitted pre-fill takes as traced arguments, placed once."""
        return {"centroids": jnp.asarray(self.centroids), "neurons": jnp.asarray(self.neurons)}

    @functools.cached_property
    def digest(self) -> str:
        return artifact.digest(self._manifest_fields(), self._stored_arrays())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Calibration) and self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def check_model(self, cfg: ModelConfig) -> None:
        """Raise CalibrationError unless this calibration was made for a model shaped like `cfg`."""
        artifact.check_model(self.model, cfg, "calibration", CalibrationError)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write atomically; an existing `out` is replaced only with `overwrite`."""
        return artifact.write(out, self._manifest_fields(), self._stored_arrays(), CalibrationError, overwrite)

    @classmethod
    def load(cls, path: str | Path, cfg: ModelConfig | None = None) -> Calibration:
        """Read a calibration directory; with `cfg`, also check it was made for that model."""
        manifest, arrays = artifact.read(path, FORMAT, FORMAT_VERSION, _expected_arrays, CalibrationError,
                                         "calibration", "python -m coreinfer_jax calibrate")
        cal = cls._from_stored(manifest, arrays)
        if cfg is not None:
            cal.check_model(cfg)
        return cal

    def _manifest_fields(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model": self.model, "layer": self.layer,
            "clusters": self.clusters, "keep": self.keep, "signature_size": self.signature_size,
            "token_fraction": SIMILARITY_TOKEN_FRACTION, "list_length": self.list_length,
            "sentences": len(self.labels), "data_sha256": self.data_sha256, "seed": self.seed,
            "inertias": {str(k): v for k, v in sorted(self.inertias.items())},
            "cluster_sizes": np.bincount(self.labels, minlength=self.clusters).tolist(),
        }

    def _stored_arrays(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids, "neurons": self.neurons, "labels": self.labels,
                "signatures": np.packbits(self.signatures, axis=-1)}  # uint8 [N, ceil(F / 8)]

    @classmethod
    def _from_stored(cls, manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> Calibration:
        width = manifest["model"]["intermediate_size"]
        return cls(
            model=manifest["model"], layer=manifest["layer"], keep=manifest["keep"],
            signature_size=manifest["signature_size"], data_sha256=manifest["data_sha256"], seed=manifest["seed"],
            inertias={int(k): v for k, v in sorted(manifest["inertias"].items(), key=lambda kv: int(kv[0]))},
            centroids=arrays["centroids"], neurons=arrays["neurons"], labels=arrays["labels"],
            signatures=np.unpackbits(arrays["signatures"], axis=-1, count=width).astype(bool),
        )


def _expected_arrays(manifest: dict[str, Any]) -> dict[str, tuple[Any, tuple[int, ...]]]:
    width = manifest["model"]["intermediate_size"]
    return {
        "centroids": (np.float32, (manifest["clusters"], width)),
        "neurons": (np.int32, (manifest["clusters"], manifest["model"]["num_layers"], manifest["list_length"])),
        "labels": (np.int32, (manifest["sentences"],)),
        "signatures": (np.uint8, (manifest["sentences"], -(-width // 8))),
    }
