"""A converted checkpoint on disk: Orbax params, the model config, the tokenizer and metadata.

    DIR/params/        Orbax PyTree checkpoint of the param tree
    DIR/config.json    `ModelConfig` (this project's, not Hugging Face's)
    DIR/metadata.json  source, architecture, dtype, parameter count
    DIR/hf_config.json the source's Hugging Face config (to rebuild it in Transformers)
    DIR/tokenizer/     `AutoTokenizer.save_pretrained` (a subdirectory, so that Transformers
                       never mistakes our config.json for one of its own)

Written into a temporary sibling directory and renamed into place at the end, so an
interrupted write never leaves a directory that loads (nor, when overwriting, destroys the
old one before the new one is complete).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import Params, abstract_params, count_params
from coreinfer_jax.models.sharding import param_shardings
from coreinfer_jax.paths import check_input, check_output, check_replaceable

# What only this project's checkpoints hold (a Hugging Face directory has a config.json too).
CHECKPOINT_MARKS = ("metadata.json", "params")
# The dtypes a checkpoint is stored in and computed in.
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_CHECKPOINT = Path(os.environ.get("COREINFER_HOME", Path.home() / ".cache" / "coreinfer_jax")) / "smollm2-135m"


class CheckpointError(CoreInferError):
    """A checkpoint directory that is missing, incomplete or inconsistent."""


def write_checkpoint(out: str | Path, cfg: ModelConfig, params: Params, tokenizer: Any, hf_config: dict[str, Any],
                     metadata: dict[str, Any], dtype: str, overwrite: bool = False) -> Path:
    """Write atomically: everything goes to a temp dir next to `out`, renamed when complete.

    With `overwrite`, an existing `out` is replaced only once the new checkpoint is complete.
    """
    out = Path(out).absolute()
    check_replaceable(out, overwrite, "checkpoint", CHECKPOINT_MARKS, CheckpointError)
    check_output(out, "dir").parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is an ordinary shared directory
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
            ckptr.wait_until_finished()
        (tmp / "config.json").write_text(cfg.to_json())
        (tmp / "hf_config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True, default=str))
        tokenizer.save_pretrained(tmp / "tokenizer")
        meta = dict(metadata, dtype=dtype, parameter_count=count_params(params), architecture=cfg.architecture)
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the directory `tmp` to `out`; an existing `out` (a directory: callers refuse a file
    with `paths.check_output`) is renamed away first and deleted only after."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old)


def load_metadata(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "metadata.json").read_text())


def load_params(path: str | Path, cfg: ModelConfig, dtype: str | None = None, on_device: bool = True,
                mesh: Mesh | None = None) -> Params:
    """The param tree as arrays on the default device, split over `mesh` (each device reads
    only its own shard from disk), or as host NumPy arrays (`on_device=False`).

    On-device restores need the sharding: without one Orbax returns host NumPy arrays, which
    every jitted call would copy to the device again.
    """
    if dtype is not None and dtype not in DTYPES:  # a cast to int8, say, would silently wreck the weights
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(path).absolute()
    stored = load_metadata(path)["dtype"]
    if mesh is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_params(cfg, stored), param_shardings(cfg, mesh))
    else:
        sharding = jax.sharding.make_single_device_sharding(jax.devices()[0]) if on_device else None
        target = abstract_params(cfg, stored, sharding)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / "params", target)
    if dtype is not None and dtype != stored:
        params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
    return params


def check_checkpoint_dir(path: str | Path) -> Path:
    path = check_input(path, "dir", "checkpoint directory", CheckpointError,
                       "; create it with `python -m convert` (the bundled default) or "
                       "`python -m convert SOURCE --out DIR`")
    for name in ("config.json", "metadata.json", "params", "tokenizer"):
        if not (path / name).exists():
            raise CheckpointError(f"{path} is not a converted checkpoint: {name} is missing")
    return path


def load_checkpoint(path: str | Path, dtype: str | None = None, on_device: bool = True,
                    mesh: Mesh | None = None) -> tuple[ModelConfig, Params, Any]:
    """Load (config, params, tokenizer) from a directory written by `python -m convert`."""
    from transformers import AutoTokenizer

    path = check_checkpoint_dir(path)
    cfg = ModelConfig.load(path / "config.json")
    params = load_params(path, cfg, dtype, on_device, mesh)
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    return cfg, params, tokenizer
