"""An interrupted command leaves nothing behind and says so in one line: SIGTERM and SIGINT
sent to real `python -m convert` / `python -m coreinfer_jax` processes mid-write, and a later
conversion removing the partial folders an earlier, killed one left.

To land the signal mid-write every time, a `sitecustomize` on the child's PYTHONPATH holds
the write open at its last step (the checkpoint or artifact complete in its hidden
`.NAME.*.partial` folder, not yet renamed into place; the budget JSON written to its
temporary file) and touches a marker file; the test then sends the signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_main
from convert.__main__ import main as convert_main

HOLD = '''
import os, signal, time
from pathlib import Path

# Ctrl-C in a terminal reaches a process that handles SIGINT. This child inherits the
# disposition of the pytest worker that starts it, which in a full xdist run was "ignore"
# (seen 2026-12-05: SIG_IGN in the worker, so the child slept through the signal).
signal.signal(signal.SIGINT, signal.default_int_handler)

from coreinfer_jax.models import checkpoint
from coreinfer_jax.sparse import artifact, budget

MARKER = Path(os.environ["HOLD_MARKER"])


def holding(write, before):
    def held(*args, **kwargs):
        if before:
            MARKER.touch()
            time.sleep(120)
        result = write(*args, **kwargs)
        if not before:
            MARKER.touch()
            time.sleep(120)
        return result
    return held


checkpoint.move_into_place = holding(checkpoint.move_into_place, before=True)
artifact.move_into_place = holding(artifact.move_into_place, before=True)
budget.Budget.save = holding(budget.Budget.save, before=False)
'''


def interrupt_midwrite(tmp_path: Path, command: list[str], signum: int) -> subprocess.CompletedProcess:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD)
    marker = tmp_path / "writing"
    env = dict(os.environ, HOLD_MARKER=str(marker), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", *command], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the command never reached its write"
            time.sleep(0.05)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def assert_clean_exit(done: subprocess.CompletedProcess, signum: int) -> None:
    name = signal.Signals(signum).name
    assert done.returncode == 128 + signum, done.stderr
    assert done.stderr.endswith(f"error: interrupted ({name}); any partial output was removed\n"), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_conversion_leaves_nothing(tiny_hf_dir, tmp_path: Path, signum: int) -> None:
    out = tmp_path / "models" / "ckpt"
    done = interrupt_midwrite(tmp_path, ["convert", str(tiny_hf_dir("llama")), "--out", str(out)], signum)
    assert_clean_exit(done, signum)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no hidden .ckpt.*.partial folder either


def test_a_conversion_removes_its_own_stale_partials(tiny_hf_dir, tmp_path: Path) -> None:
    # What a conversion killed outright (SIGKILL: no handler runs) leaves next to its --out.
    stale = tmp_path / ".ckpt.x1y2.partial"
    (stale / "params").mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    unrelated = tmp_path / ".other.x1y2.partial"
    unrelated.mkdir()
    done = run_main(convert_main, tiny_hf_dir("llama"), "--out", tmp_path / "ckpt")
    assert done.returncode == 0, done.stderr
    assert not stale.exists() and unrelated.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.x1y2.partial", "ckpt"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["calibrate", "predictor", "budget"])
def test_interrupted_fitting_leaves_nothing(tiny_checkpoint, tmp_path: Path, command: str) -> None:
    ckpt = tiny_checkpoint("llama")
    data = tmp_path / "data.txt"
    data.write_text("\n".join(["The quick brown fox jumps over the lazy dog.", "Water boils at one hundred degrees.",
                               "The cat sat on the mat.", "Birds build nests in the spring."] * 150))
    out = tmp_path / "out" / ("budget.json" if command == "budget" else "artifact")
    out.parent.mkdir()
    options = {"calibrate": ["--limit", "8"], "predictor": ["--skip-tokens", "0", "--rank", "4", "--window", "64"],
               "budget": ["--first-window", "0", "--windows", "1", "--context-tokens", "32", "--scored-tokens", "16"]}
    done = interrupt_midwrite(tmp_path, ["coreinfer_jax", command, "--checkpoint", str(ckpt), "--data", str(data),
                                         "--out", str(out), *options[command]], signal.SIGTERM)
    assert_clean_exit(done, signal.SIGTERM)
    assert list(out.parent.iterdir()) == []
