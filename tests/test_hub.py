"""Hub ids (`python -m convert ORG/NAME [--revision R]`): offline, from a Hugging Face cache the test lays out.

Nothing here reaches the network: the command runs with HF_HUB_OFFLINE=1 and HF_HOME /
HF_HUB_CACHE in a temporary directory; the hub's refusals (gated, missing) are raised by a
stand-in for `snapshot_download`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable
from unittest import mock

import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from convert import ConversionError
from convert.sources import open_source
from coreinfer_jax.models.checkpoint import load_checkpoint, load_metadata
from test_convert import _assert_same_params, assert_clean_error, run_convert_process

REPO = "tiny-org/tiny-model"
MAIN, TAGGED = "a" * 40, "b" * 40


def lay_out_cache(cache: Path, repo: str, snapshots: dict[str, Path], refs: dict[str, str]) -> None:
    """The hub cache's layout: models--ORG--NAME/snapshots/COMMIT/<files> and refs/REF holding a commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    for commit, files in snapshots.items():
        shutil.copytree(files, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (root / "refs" / ref).write_text(commit)


@pytest.fixture
def offline_env(tmp_path: Path, tiny_hf_dir: Callable[[str], Path]) -> dict[str, str]:
    cache = tmp_path / "hub"
    lay_out_cache(cache, REPO, {MAIN: tiny_hf_dir("llama"), TAGGED: tiny_hf_dir("opt")}, {"main": MAIN, "v1": TAGGED})
    return {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(cache)}


def test_hub_id_converts_from_the_offline_cache(tmp_path: Path, offline_env: dict[str, str],
                                                tiny_checkpoint: Callable[[str], Path]) -> None:
    proc = run_convert_process(REPO, "--out", tmp_path / "main", env=offline_env)
    assert proc.returncode == 0, proc.stderr
    assert load_metadata(tmp_path / "main")["source"] == f"{REPO}@{MAIN}"
    _assert_same_params(load_checkpoint(tmp_path / "main")[1], load_checkpoint(tiny_checkpoint("llama"))[1])

    proc = run_convert_process(REPO, "--revision", "v1", "--out", tmp_path / "tagged", env=offline_env)
    assert proc.returncode == 0, proc.stderr
    assert load_metadata(tmp_path / "tagged")["source"] == f"{REPO}@{TAGGED}"
    _assert_same_params(load_checkpoint(tmp_path / "tagged")[1], load_checkpoint(tiny_checkpoint("opt"))[1])


def test_hub_id_missing_from_the_offline_cache_is_one_line(tmp_path: Path, offline_env: dict[str, str]) -> None:
    out = tmp_path / "out"
    assert_clean_error(run_convert_process("tiny-org/absent", "--out", out, env=offline_env), out,
                       "tiny-org/absent", "not in the Hugging Face cache", "HF_HUB_OFFLINE")


def _refusing(error: Exception) -> Callable[..., str]:
    def snapshot_download(*args, **kwargs) -> str:
        raise error
    return snapshot_download


def _response(status: int) -> mock.Mock:
    """What the hub errors read of an HTTP response (its type is the hub client's own)."""
    return mock.Mock(status_code=status, headers={})


@pytest.mark.parametrize("error,words", [
    (GatedRepoError("403", response=_response(403)), ["is gated", f"https://huggingface.co/{REPO}", "log in"]),
    (RepositoryNotFoundError("404", response=_response(404)), ["does not exist", "private", "hf auth login"]),
    (RevisionNotFoundError("404", response=_response(404)), ["has no revision 'nope'"]),
], ids=["gated", "missing", "no-revision"])
def test_hub_refusals_say_what_to_do(error: Exception, words: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _refusing(error))
    with pytest.raises(ConversionError) as info:
        open_source(REPO, revision="nope")
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("has_safetensors", [True, False])
def test_hub_downloads_safetensors_first(has_safetensors: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         tiny_hf_dir: Callable[[str], Path]) -> None:
    snapshot = tmp_path / "snapshot"
    shutil.copytree(tiny_hf_dir("llama"), snapshot)
    if not has_safetensors:  # a repository with torch weights only
        import torch
        from safetensors.torch import load_file
        torch.save(load_file(snapshot / "model.safetensors"), snapshot / "pytorch_model.bin")
        (snapshot / "model.safetensors").unlink()
    asked: list[list[str]] = []

    def snapshot_download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> str:
        asked.append(allow_patterns)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    src = open_source(REPO)
    assert "model*.safetensors" in asked[0] and not any(p.endswith(".bin") for p in asked[0])
    assert "config.json" in asked[0] and "tokenizer*" in asked[0]
    assert len(asked) == (1 if has_safetensors else 2)
    if not has_safetensors:
        assert "pytorch_model*.bin" in asked[1]
    assert src.format == ("hf-safetensors" if has_safetensors else "hf-bin")


def test_revision_applies_to_hub_ids_only(tiny_hf_dir: Callable[[str], Path]) -> None:
    with pytest.raises(ConversionError, match="--revision applies to hub ids"):
        open_source(tiny_hf_dir("llama"), revision="main")
