"""Fitted artifacts on disk (calibrations, predictors): a JSON manifest plus plain npz arrays.

    DIR/manifest.json   format, version, the model it was made for, settings, content digest
    DIR/arrays.npz      the arrays, read with `allow_pickle=False`

Written to a temporary sibling and renamed into place, so an interrupted write never leaves
a directory that loads. Reading checks the format, version, array dtypes and shapes and the
digest, and turns every damage into one error line of the caller's error type.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.checkpoint import move_into_place
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.paths import check_input, check_output, check_replaceable

MANIFEST, ARRAYS = "manifest.json", "arrays.npz"
ARTIFACT_MARKS = (MANIFEST, ARRAYS)  # what `--force` may replace
# What an artifact must agree on with the model that uses it.
IDENTITY_FIELDS = ("architecture", "family", "num_layers", "hidden_size", "intermediate_size", "vocab_size")


def model_identity(cfg: ModelConfig, name: str | None = None) -> dict[str, Any]:
    """The fields an artifact is checked against, plus an informative model name."""
    return {**{f: getattr(cfg, f) for f in IDENTITY_FIELDS}, "name": name}


def describe_model(model: dict[str, Any]) -> str:
    name = f"{model['name']}, " if model.get("name") else ""
    return (f"{name}{model['architecture']}, {model['num_layers']} layers, hidden {model['hidden_size']}, "
            f"FFN {model['intermediate_size']}, vocab {model['vocab_size']}")


def check_model(model: dict[str, Any], cfg: ModelConfig, what: str, error: type[CoreInferError]) -> None:
    """Raise `error` unless `model` (an artifact's identity) is shaped like `cfg`."""
    if {f: model.get(f) for f in IDENTITY_FIELDS} != {f: getattr(cfg, f) for f in IDENTITY_FIELDS}:
        raise error(f"this {what} was made for another model ({describe_model(model)}), "
                    f"not for {describe_model(model_identity(cfg))}")


def digest(fields: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write(out: str | Path, fields: dict[str, Any], arrays: dict[str, np.ndarray], error: type[CoreInferError],
          overwrite: bool = False) -> Path:
    """Write `fields` (plus their digest with `arrays`) and `arrays` atomically; an existing `out`
    is replaced only with `overwrite`, and only once the new one is complete."""
    out = Path(out).absolute()
    check_replaceable(out, overwrite, fields["format"].removeprefix("coreinfer-jax-"), ARTIFACT_MARKS, error)
    check_output(out, "dir").parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    tmp.chmod(0o755)
    try:
        np.savez(tmp / ARRAYS, **arrays)
        (tmp / MANIFEST).write_text(json.dumps({**fields, "digest": digest(fields, arrays)}, indent=2,
                                               sort_keys=True))
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read(path: str | Path, fmt: str, version: int, expected: Any, error: type[CoreInferError], what: str,
         make: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`(manifest, arrays)` of the artifact at `path`, checked.

    `expected(manifest)` gives `{name: (dtype, shape)}` of the arrays the manifest promises;
    `what` names the artifact in messages and `make` the command that makes one.
    """
    path = check_input(path, "dir", f"{what} directory", error, f"; make one with `{make}`")
    if not (path / MANIFEST).is_file() or not (path / ARRAYS).is_file():
        raise error(f"{path} is not a {what}: {MANIFEST} or {ARRAYS} is missing")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("format") != fmt:
            raise error(f"{path} is not a {what}: {MANIFEST} has format {manifest.get('format')!r}")
        if manifest.get("format_version") != version:
            raise error(f"{path} has {what} format version {manifest.get('format_version')}; "
                        f"this version of coreinfer-jax reads {version}")
        shapes = expected(manifest)
        with np.load(path / ARRAYS, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in shapes}
        for name, (dtype, shape) in shapes.items():
            if arrays[name].dtype != dtype or arrays[name].shape != tuple(shape):
                raise ValueError(f"{name} is {arrays[name].dtype} {arrays[name].shape}, the manifest says "
                                 f"{np.dtype(dtype)} {tuple(shape)}")
    except CoreInferError:
        raise
    except (OSError, EOFError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as e:
        raise error(f"{what} {path} is corrupted or truncated ({type(e).__name__}: {' '.join(str(e).split())})"
                    ) from None
    fields = {k: v for k, v in manifest.items() if k != "digest"}
    if digest(fields, arrays) != manifest.get("digest"):
        raise error(f"{what} {path} is corrupted: its arrays do not match the digest in {MANIFEST}")
    return manifest, arrays
