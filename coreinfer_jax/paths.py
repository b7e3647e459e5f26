"""Paths the commands read and write: each checked before the work, and files written atomically.

An input that is missing, or a directory where a file goes (or the reverse), is named with
what it was to be. Every output path follows one convention: missing parent directories are
created, and a path that cannot be written (its nearest existing ancestor is a file or
read-only, or it is a file where a directory goes, or the reverse) is refused before the work
whose results it was to hold. The argparse types refuse it when the command line is read. An
output directory that exists is replaced only with `--force`, and only when it holds what
such an output holds (its marker files) or nothing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable, Literal

from coreinfer_jax.errors import CoreInferError

Kind = Literal["file", "dir"]


def check_input(path: str | Path, kind: Kind, what: str, error: type[CoreInferError] = CoreInferError,
                hint: str = "") -> Path:
    """`path` as a `Path` when it is an existing `kind`; `error` naming `what` (e.g. "prompt
    file") and the problem otherwise, with `hint` (how to make one) where it does not exist."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} does not exist{hint}")
    if kind == "file" and not path.is_file():
        raise error(f"{what} {path} is a directory, not a file")
    if kind == "dir" and not path.is_dir():
        raise error(f"{what} {path} is a file, not a directory")
    return path


def check_output(path: str | Path, kind: Kind) -> Path:
    """`path` as a `Path` when a `kind` can be written there once its missing parents are
    created (this creates nothing); a `CoreInferError` naming the obstacle otherwise."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise CoreInferError(f"{path} is a directory; a file is written there")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise CoreInferError(f"{path} is a file; a directory is written there")
    # The writers put a temporary sibling next to `path`, so it is the parent that must be writable.
    ancestor = next(p for p in path.absolute().parents if p.exists())
    if not ancestor.is_dir():
        raise CoreInferError(f"cannot write {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CoreInferError(f"cannot write {path}: {ancestor} is not writable")
    return path


def check_replaceable(path: Path, overwrite: bool, what: str, marks: tuple[str, ...],
                      error: type[CoreInferError] = CoreInferError) -> None:
    """An existing directory `path` is replaced (deleted, once its successor is complete) only
    with `overwrite` (`--force`), and only when it holds an earlier `what` (each of `marks`) or
    nothing: `--force` never deletes a directory of other files, such as a parent of models
    named as `--out`."""
    if not path.exists():
        return
    if not overwrite:
        raise error(f"{path} already exists; remove it or choose another --out (or --force)")
    if path.is_dir() and any(path.iterdir()) and not all((path / m).exists() for m in marks):
        raise error(f"{path} holds files but no {what} (no {', '.join(marks)}); --force replaces only a {what} "
                    "or an empty directory: choose another --out")


def _argument_type(kind: Kind) -> Callable[[str], Path]:
    def parse(text: str) -> Path:
        try:
            return check_output(text, kind)
        except CoreInferError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


output_file = _argument_type("file")
output_dir = _argument_type("dir")


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a hidden file next to `path`, then renamed over it: an interrupted or
    failed write leaves `path` as it was (absent, or the previous version), never half written."""
    check_output(path, "file").parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
