"""A similarity-guided calibration, the data: per-cluster core-neuron lists, saved as plain arrays.

Made by `calibrate.similarity.calibrate` (`python -m coreinfer_jax calibrate`); read by the
`Similarity` method. On disk, DIR/manifest.json (format, model identity, layer, k, keep, data
sha256, inertias, content digest) and DIR/arrays.npz (centroids, neurons, labels, bit-packed
signatures), read with `allow_pickle=False`; written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.checkpoint import move_into_place
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import Params
from coreinfer_jax.sparse.selection import SIMILARITY_TOKEN_FRACTION

FORMAT = "coreinfer-jax-calibration"
FORMAT_VERSION = 1
MANIFEST, ARRAYS = "manifest.json", "arrays.npz"
# The reference clusters at layer 25 of 32 with 3000-neuron signatures of OPT-6.7B (F = 16384).
_REF_LAYER, _REF_DEPTH = 25, 32
_REF_SIGNATURE, _REF_WIDTH = 3000, 16384
# What a calibration must agree on with the model that uses it.
IDENTITY_FIELDS = ("architecture", "family", "num_layers", "hidden_size", "intermediate_size", "vocab_size")


class CalibrationError(CoreInferError):
    """A calibration that is missing, corrupted, or made for another model."""


def default_calibration_layer(num_layers: int) -> int:
    """The reference's signature layer 25 of 32, scaled to the model's depth."""
    return min(num_layers - 1, round(_REF_LAYER * num_layers / _REF_DEPTH))


def signature_size(width: int) -> int:
    """Neurons in a signature: the reference's 3000 of 16384, scaled to the FFN width."""
    return max(1, round(_REF_SIGNATURE * width / _REF_WIDTH))


def model_identity(cfg: ModelConfig, name: str | None = None) -> dict[str, Any]:
    """The fields a calibration is checked against, plus an informative model name."""
    return {**{f: getattr(cfg, f) for f in IDENTITY_FIELDS}, "name": name}


def _describe(model: dict[str, Any]) -> str:
    name = f"{model['name']}, " if model.get("name") else ""
    return (f"{name}{model['architecture']}, {model['num_layers']} layers, hidden {model['hidden_size']}, "
            f"FFN {model['intermediate_size']}, vocab {model['vocab_size']}")


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
        return _digest(self._manifest_fields(), self._stored_arrays())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Calibration) and self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def check_model(self, cfg: ModelConfig) -> None:
        """Raise CalibrationError unless this calibration was made for a model shaped like `cfg`."""
        mine = {f: self.model.get(f) for f in IDENTITY_FIELDS}
        if mine != {f: getattr(cfg, f) for f in IDENTITY_FIELDS}:
            raise CalibrationError(f"this calibration was made for another model ({_describe(self.model)}), "
                                   f"not for {_describe(model_identity(cfg))}")

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write atomically (a temporary sibling renamed into place); an existing `out` is
        replaced only with `overwrite`, and only once the new one is complete."""
        out = Path(out).absolute()
        if out.exists() and not overwrite:
            raise CalibrationError(f"{out} already exists; remove it or choose another --out (or --force)")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        tmp.chmod(0o755)
        try:
            np.savez(tmp / ARRAYS, **self._stored_arrays())
            manifest = {**self._manifest_fields(), "digest": self.digest}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    @classmethod
    def load(cls, path: str | Path, cfg: ModelConfig | None = None) -> Calibration:
        """Read a calibration directory; with `cfg`, also check it was made for that model."""
        path = Path(path)
        if not path.is_dir():
            raise CalibrationError(f"calibration directory {path} does not exist; "
                                   "make one with `python -m coreinfer_jax calibrate`")
        if not (path / MANIFEST).is_file() or not (path / ARRAYS).is_file():
            raise CalibrationError(f"{path} is not a calibration: {MANIFEST} or {ARRAYS} is missing")
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            if manifest.get("format") != FORMAT:
                raise CalibrationError(f"{path} is not a calibration: {MANIFEST} has format "
                                       f"{manifest.get('format')!r}")
            if manifest.get("format_version") != FORMAT_VERSION:
                raise CalibrationError(f"{path} has calibration format version {manifest.get('format_version')}; "
                                       f"this version of coreinfer-jax reads {FORMAT_VERSION}")
            with np.load(path / ARRAYS, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in ("centroids", "neurons", "labels", "signatures")}
            cal = cls._from_stored(manifest, arrays)
        except CalibrationError:
            raise
        except (OSError, EOFError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as e:
            raise CalibrationError(f"calibration {path} is corrupted or truncated ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())})") from None
        if cal.digest != manifest.get("digest"):
            raise CalibrationError(f"calibration {path} is corrupted: its arrays do not match the digest "
                                   f"in {MANIFEST}")
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
        expected = {
            "centroids": (np.float32, (manifest["clusters"], width)),
            "neurons": (np.int32, (manifest["clusters"], manifest["model"]["num_layers"], manifest["list_length"])),
            "labels": (np.int32, (manifest["sentences"],)),
            "signatures": (np.uint8, (manifest["sentences"], -(-width // 8))),
        }
        for name, (dtype, shape) in expected.items():
            if arrays[name].dtype != dtype or arrays[name].shape != shape:
                raise ValueError(f"{name} is {arrays[name].dtype} {arrays[name].shape}, the manifest says "
                                 f"{np.dtype(dtype)} {shape}")
        return cls(
            model=manifest["model"], layer=manifest["layer"], keep=manifest["keep"],
            signature_size=manifest["signature_size"], data_sha256=manifest["data_sha256"], seed=manifest["seed"],
            inertias={int(k): v for k, v in sorted(manifest["inertias"].items(), key=lambda kv: int(kv[0]))},
            centroids=arrays["centroids"], neurons=arrays["neurons"], labels=arrays["labels"],
            signatures=np.unpackbits(arrays["signatures"], axis=-1, count=width).astype(bool),
        )


def _digest(fields: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()
