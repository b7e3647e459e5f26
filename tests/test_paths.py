"""Paths the commands read and write: an input of the wrong kind is named; output paths follow
one convention (missing parents are created, a path that cannot be written is refused in one
line when the command line is read, before any work); files are written atomically; `--force`
replaces only an earlier output of the same kind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from conftest import run_main
from convert.__main__ import main as convert_main
from convert.core import convert_checkpoint
from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.checkpoint import move_into_place
from coreinfer_jax.paths import check_input, check_output, check_replaceable, write_atomically, write_text_atomically
from coreinfer_jax.sparse import artifact
from coreinfer_jax.tools.cli import main


def test_check_output_names_each_obstacle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_file, a_dir = tmp_path / "a-file", tmp_path / "a-dir"
    a_file.write_text("x")
    a_dir.mkdir()
    with pytest.raises(CoreInferError, match=f"^{a_dir} is a directory; a file is written there$"):
        check_output(a_dir, "file")
    with pytest.raises(CoreInferError, match=f"^{a_file} is a file; a directory is written there$"):
        check_output(a_file, "dir")
    for kind in ("file", "dir"):  # the nearest existing ancestor, two levels up, is a file
        with pytest.raises(CoreInferError, match=f"^cannot write {a_file}/b/c: {a_file} is a file, not a directory$"):
            check_output(a_file / "b" / "c", kind)
    # Permissions: as root every directory is writable, so the answer is stood in for.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != a_dir)
    with pytest.raises(CoreInferError, match=f"^cannot write {a_dir}/new/out.json: {a_dir} is not writable$"):
        check_output(a_dir / "new" / "out.json", "file")
    monkeypatch.undo()
    # What can be written: a new path under missing directories, an existing file, an existing directory.
    assert check_output(a_dir / "new" / "deeper" / "out.json", "file") == a_dir / "new" / "deeper" / "out.json"
    assert check_output(a_file, "file") == a_file and check_output(a_dir, "dir") == a_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir", "a-file"]  # a check creates nothing


def test_an_interrupted_write_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "sweep.json"
    path.write_text("previous")

    def interrupted(tmp: Path) -> None:
        tmp.write_text("half of the ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, interrupted)
    assert path.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["sweep.json"]
    write_text_atomically(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["sweep.json"]


def test_a_directory_replaces_the_old_one_only_when_it_is_in_place(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out, new = tmp_path / "ckpt", tmp_path / ".ckpt.partial"
    out.mkdir()
    (out / "old").write_text("old")
    new.mkdir()
    (new / "new").write_text("new")
    rename = os.rename

    def refused(src: str | Path, dst: str | Path) -> None:  # the new directory cannot be renamed into place
        if Path(src) == new:
            raise OSError("rename refused")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", refused)
    with pytest.raises(OSError, match="rename refused"):
        move_into_place(new, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.partial", "ckpt"]
    assert [p.name for p in out.iterdir()] == ["old"]  # the old one is back
    monkeypatch.undo()
    move_into_place(new, out)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"] and [p.name for p in out.iterdir()] == ["new"]


def test_a_file_is_written_into_missing_directories(tmp_path: Path) -> None:
    write_text_atomically(tmp_path / "a" / "b" / "records.jsonl", "{}\n")
    assert (tmp_path / "a" / "b" / "records.jsonl").read_text() == "{}\n"
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["records.jsonl"]


def test_an_artifact_under_a_file_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CoreInferError, match="a-file is a file, not a directory"):
        artifact.write(tmp_path / "a-file" / "calibration", {"format": "coreinfer-jax-calibration"}, {}, CoreInferError)


# Every command's output argument, under a path whose parent is a file. The checkpoint and the
# data do not exist: the output is refused when the command line is read, before either is opened.
COMMANDS: list[tuple[Callable[[list[str]], int], str, list[str]]] = [
    (convert_main, "--out", ["smollm2-135m"]),
    (main, "--out", ["calibrate", "--data", "none.csv"]),
    (main, "--out", ["predictor", "--data", "none.txt"]),
    (main, "--out", ["budget", "--data", "none.txt"]),
    (main, "--out", ["sweep", "--tasks", "wikitext"]),
    (main, "--records", ["eval", "--task", "wikitext"]),
    (main, "--out", ["data", "fetch"]),
    (main, "--profile", ["generate", "--prompt", "hi"]),
    (main, "--profile", ["bench"]),
    (main, "--out", ["bench", "--suite", "device"]),
]


@pytest.mark.parametrize("command,flag,args", COMMANDS, ids=[" ".join(c[2][:2]) + " " + c[1] for c in COMMANDS])
def test_every_output_under_a_file_is_refused_when_the_command_line_is_read(
        tmp_path: Path, command: Callable[[list[str]], int], flag: str, args: list[str]) -> None:
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / "out"
    model = ["--checkpoint", str(tmp_path / "no-model")] if command is main and args[0] != "data" else []
    r = run_main(command, *args, *model, flag, out)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines()[-1].endswith(f": error: argument {flag}: cannot write {out}: "
                                              f"{tmp_path / 'a-file'} is a file, not a directory")


def test_a_file_where_a_directory_goes_and_the_reverse_are_refused(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("{}")
    r = run_main(main, "sweep", "--tasks", "wikitext", "--out", tmp_path / "results.json")
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1].endswith(f"argument --out: {tmp_path / 'results.json'} is a file; "
                                              "a directory is written there")
    r = run_main(main, "eval", "--task", "wikitext", "--records", tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1].endswith(f"argument --records: {tmp_path} is a directory; a file is written there")


def test_convert_refuses_an_output_under_a_file_before_converting(tiny_hf_dir, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import convert.core

    def no_conversion(*args, **kwargs):
        raise AssertionError("tensors were converted")

    monkeypatch.setattr(convert.core, "convert_tensors", no_conversion)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CoreInferError, match="a-file is a file, not a directory"):
        convert_checkpoint(tiny_hf_dir("llama"), tmp_path / "a-file" / "model")


def test_force_replaces_only_an_earlier_output_or_an_empty_directory(tmp_path: Path) -> None:
    marks = ("manifest.json", "arrays.npz")
    check_replaceable(tmp_path / "new", False, "calibration", marks)  # nothing there: nothing to replace
    (tmp_path / "empty").mkdir()
    with pytest.raises(CoreInferError, match=r"empty already exists; remove it or choose another --out \(or --force\)"):
        check_replaceable(tmp_path / "empty", False, "calibration", marks)
    check_replaceable(tmp_path / "empty", True, "calibration", marks)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name in (*marks, "notes.txt"):
        (earlier / name).write_text("x")
    check_replaceable(earlier, True, "calibration", marks)
    (earlier / "arrays.npz").unlink()  # one mark missing: not a calibration
    with pytest.raises(CoreInferError, match="earlier holds files but no calibration "
                                             r"\(no manifest.json, arrays.npz\); --force replaces only"):
        check_replaceable(earlier, True, "calibration", marks)


def test_force_never_deletes_a_directory_of_other_files(tiny_hf_dir, tmp_path: Path) -> None:
    """`--out` naming a folder of models (a user's mistake) with `--force`: refused before the
    conversion, and the folder is left as it was; a calibration's writer refuses it too."""
    models = tmp_path / "models"
    (models / "other-model").mkdir(parents=True)
    (models / "other-model" / "weights.safetensors").write_text("precious")
    r = run_main(convert_main, tiny_hf_dir("llama"), "--out", models, "--force")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"{models} holds files but no checkpoint (no metadata.json, params)" in r.stderr
    with pytest.raises(CoreInferError, match="holds files but no calibration"):
        artifact.write(models, {"format": "coreinfer-jax-calibration"}, {}, CoreInferError, overwrite=True)
    assert [p.relative_to(models).as_posix() for p in sorted(models.rglob("*"))] == [
        "other-model", "other-model/weights.safetensors"]
    # An earlier checkpoint is what --force replaces.
    assert run_main(convert_main, tiny_hf_dir("llama"), "--out", tmp_path / "ckpt").returncode == 0
    assert run_main(convert_main, tiny_hf_dir("llama"), "--out", tmp_path / "ckpt", "--force").returncode == 0


def test_check_input_names_what_is_missing_or_of_the_wrong_kind(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CoreInferError, match=f"^prompt file {tmp_path}/nope does not exist$"):
        check_input(tmp_path / "nope", "file", "prompt file")
    with pytest.raises(CoreInferError, match=f"^budget file {tmp_path} is a directory, not a file$"):
        check_input(tmp_path, "file", "budget file", hint="; make one")
    with pytest.raises(CoreInferError, match=f"^checkpoint directory {tmp_path}/a-file is a file, not a directory$"):
        check_input(tmp_path / "a-file", "dir", "checkpoint directory")
    assert check_input(tmp_path / "a-file", "file", "x") == tmp_path / "a-file"


@pytest.mark.parametrize("args,line", [
    (["generate", "--prompt-file", "{dir}", "--checkpoint", "{ckpt}"], "prompt file {dir} is a directory, not a file"),
    (["generate", "--prompt", "hi", "--checkpoint", "{file}"],
     "checkpoint directory {file} is a file, not a directory"),
    (["generate", "--prompt", "hi", "--checkpoint", "{ckpt}", "--method", "stability", "--budget", "{dir}"],
     "budget file {dir} is a directory, not a file"),
    (["eval", "--task", "wikitext", "--data", "{dir}", "--checkpoint", "{ckpt}"],
     "evaluation data file {dir} is a directory, not a file"),
    (["calibrate", "--data", "{dir}", "--out", "{dir}/cal", "--checkpoint", "{ckpt}"],
     "calibration data {dir} is a directory, not a file"),
    (["predictor", "--data", "{dir}", "--out", "{dir}/pred", "--checkpoint", "{ckpt}"],
     "calibration data {dir} is a directory, not a file"),
])
def test_an_input_of_the_wrong_kind_is_named_in_one_line(tiny_checkpoint, tmp_path: Path, args: list[str],
                                                         line: str) -> None:
    (tmp_path / "a-file").write_text("x")
    names = {"dir": tmp_path, "file": tmp_path / "a-file", "ckpt": tiny_checkpoint("llama")}
    r = run_main(main, *[a.format(**names) for a in args])
    assert (r.returncode, r.stderr) == (2, f"error: {line.format(**names)}\n")
