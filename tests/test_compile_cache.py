"""The persistent compile cache the commands use (`runtime.compile_cache`): a second run reads
its programs back and generates the same tokens; `off`, a directory JAX was given and `bench`
leave JAX's settings alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import jax
import pytest
from jax.experimental.compilation_cache.compilation_cache import reset_cache

from conftest import run_main
from coreinfer_jax import use_compile_cache
from coreinfer_jax.tools import cli

SETTINGS = ("jax_compilation_cache_dir", "jax_compilation_cache_max_size", "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture(autouse=True)
def jax_settings() -> Iterator[None]:
    """Each test starts from a process that has compiled nothing and leaves JAX's cache settings
    as it found them (the suite's other tests compile without a persistent cache)."""
    before = {name: jax.config.values[name] for name in SETTINGS}
    jax.clear_caches()
    reset_cache()
    yield
    for name, value in before.items():
        jax.config.update(name, value)
    reset_cache()
    jax.clear_caches()


def generate(ckpt: Path, *extra: str):
    return run_main(cli.main, "generate", "--checkpoint", ckpt, "--prompt", "The cat sat on the",
                    "--max-new-tokens", "6", *extra)


def test_a_second_run_reads_its_programs_from_the_cache(tiny_checkpoint, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "xla_cache"
    monkeypatch.setenv("COREINFER_COMPILE_CACHE", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # a tiny model compiles in well under 1 s
    ckpt = tiny_checkpoint("llama")
    first = generate(ckpt, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["compiled_from_cache"] == 0
    written = sorted(p.name for p in cache.glob("*-cache"))
    assert any(n.startswith("jit_prefill-") for n in written) and any(n.startswith("jit_decode-") for n in written)
    assert jax.config.values["jax_compilation_cache_max_size"] > 0  # bounded: old programs are dropped

    jax.clear_caches()  # as a new process would: nothing compiled in memory
    second = generate(ckpt, "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["compiled_from_cache"] == len(written)  # each program the first wrote
    assert json.loads(second.stdout)["tokens"] == json.loads(first.stdout)["tokens"]
    assert sorted(p.name for p in cache.glob("*-cache")) == written

    jax.clear_caches()
    text = generate(ckpt)
    assert text.returncode == 0, text.stderr
    assert "programs from the compile cache), pre-fill" in text.stderr


def test_off_leaves_jax_without_a_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COREINFER_COMPILE_CACHE", "OFF")
    assert use_compile_cache() is None
    assert jax.config.values["jax_compilation_cache_dir"] is None


def test_the_bound_is_set_only_where_jax_has_none(tmp_path: Path) -> None:
    jax.config.update("jax_compilation_cache_max_size", -1)  # JAX's default: unbounded
    use_compile_cache(tmp_path / "bounded")
    assert jax.config.values["jax_compilation_cache_max_size"] == 2 << 30
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_compilation_cache_max_size", 12345)  # the user's own bound stays
    assert use_compile_cache(tmp_path / "theirs") == tmp_path / "theirs"
    assert jax.config.values["jax_compilation_cache_max_size"] == 12345


def test_a_directory_that_cannot_be_written_is_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("COREINFER_COMPILE_CACHE", str(tmp_path / "a_file" / "xla_cache"))
    with pytest.warns(UserWarning, match=r"no compile cache: cannot write to .*a_file/xla_cache; set "
                                         r"COREINFER_COMPILE_CACHE to a writable directory, or to off"):
        assert use_compile_cache() is None
    assert jax.config.values["jax_compilation_cache_dir"] is None


def test_the_default_lives_beside_the_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COREINFER_COMPILE_CACHE")
    monkeypatch.setattr("coreinfer_jax.runtime.compile_cache.DEFAULT_CHECKPOINT", tmp_path / "home" / "smollm2-135m")
    assert use_compile_cache() == tmp_path / "home" / "xla_cache"
    assert jax.config.values["jax_compilation_cache_dir"] == str(tmp_path / "home" / "xla_cache")


def test_a_directory_jax_was_given_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COREINFER_COMPILE_CACHE", str(tmp_path / "ours"))
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
    jax.config.update("jax_compilation_cache_max_size", 12345)
    assert use_compile_cache() == tmp_path / "theirs"
    assert jax.config.values["jax_compilation_cache_dir"] == str(tmp_path / "theirs")
    assert jax.config.values["jax_compilation_cache_max_size"] == 12345


def test_bench_never_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench reports compile times (`--compile-depths`, the device suite): a cache would fake them."""
    monkeypatch.setenv("COREINFER_COMPILE_CACHE", str(tmp_path / "xla_cache"))
    ran = []
    monkeypatch.setattr(cli, "bench_command", lambda args: ran.append(args.command) or 0)
    assert run_main(cli.main, "bench", "--no-torch").returncode == 0
    assert ran == ["bench"] and jax.config.values["jax_compilation_cache_dir"] is None
