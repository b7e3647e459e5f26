"""`bench --suite device --tiny`: the prepared accelerator run, on tiny shapes on the CPU, so that
it cannot rot: every row present, measured rows with real numbers, GPU rows skipped (never
faked), every part under a time bound that turns an overrun into a row saying why."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import tarfile
from pathlib import Path

import jax
import pytest

from coreinfer_jax.tools import device_suite
from coreinfer_jax.tools.device_suite import FULL, GRACE_S, MEASURED, NO_GPU_TRACE, TINY, Job, run_job, run_suite
from coreinfer_jax.tools.shapes import model_config, random_params

SHAPES = ("llama-3-8b", "smollm2-135m")
JAX_ROWS = ("jax-dense", "jax-stability-keep0.4", "jax-stability-keep0.4-shared",
            "jax-hybrid-0.24+0.24-int4+rest-normalized_magnitude")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def device_run(tmp_path_factory) -> Path:
    """`.device/run --tiny`: the GPU run's one command, every step at tiny shapes on the CPU."""
    out = tmp_path_factory.mktemp("device_run")
    env = dict(os.environ, OUT=str(out), DEVICE_RUN_S="600")
    done = subprocess.run(["bash", str(ROOT / ".device" / "run"), "--tiny"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def suite(device_run: Path) -> tuple[dict, str, str]:
    return (json.loads((device_run / "device_suite.json").read_text()), (device_run / "device_suite.md").read_text(),
            str(device_run))


def test_the_device_run_runs_every_step_and_keeps_what_it_made(device_run: Path) -> None:
    lines = (device_run / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["env", "suite", "product_bench", "command_buffer"]
    assert all(": exit 0 in " in line for line in lines), lines
    assert "JAX" in (device_run / "env.txt").read_text()
    assert {p.name for p in device_run.iterdir()} == {
        "summary.txt", "env.txt", "suite.txt", "device_suite.json", "device_suite.md", "traces.tar",
        "product_bench.txt", "command_buffer.txt"}
    assert "=== bench-llama-3-8b-0.log" in (device_run / "suite.txt").read_text()  # the workers' logs
    with tarfile.open(device_run / "traces.tar") as traces:
        rows = {Path(name).parts[1] for name in traces.getnames() if name.endswith(".trace.json.gz")}
    assert rows == {f"{shape}-{row}" for shape in SHAPES for row in JAX_ROWS}
    assert "| gate\\|up | one [2F, D]" in (device_run / "product_bench.txt").read_text()
    bench = (device_run / "command_buffer.txt").read_text()
    assert "| jax-dense |" in bench and "| jax-stability-keep0.4 |" in bench


def test_the_device_run_leaves_only_what_the_device_tool_brings_back(device_run: Path) -> None:
    # The device tool's limits (its README): at most 8 files from $OUT, 16 MiB each and 64 MiB in
    # all, none deeper than two folders, every name in letters, digits, '.', '_' and '-'.
    files = [p.relative_to(device_run) for p in device_run.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    sizes = [(device_run / f).stat().st_size for f in files]
    assert max(sizes) <= 16 * 2**20 and sum(sizes) <= 64 * 2**20
    assert all(len(f.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in f.parts)
               for f in files), files


def test_a_step_that_would_not_fit_is_skipped_with_a_line(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path), DEVICE_RUN_S="0")
    done = subprocess.run(["bash", str(ROOT / ".device" / "run")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "summary.txt").read_text().splitlines() == [
        "env: skipped: 0 s left of the run, 30 s wanted", "suite: skipped: 0 s left of the run, 400 s wanted",
        "product_bench: skipped: 0 s left of the run, 60 s wanted",
        "command_buffer: skipped: 0 s left of the run, 100 s wanted"]


def test_without_git_the_device_run_names_the_commit_it_was_given(tmp_path: Path) -> None:
    # The device's copy of the tree may have no .git; GIT_DIR pointing nowhere stands for that.
    # 45 s: the env step (30 s wanted) runs even if the clock ticks first; the next (60 s) does not.
    env = dict(os.environ, OUT=str(tmp_path), DEVICE_RUN_S="45", GIT_DIR=str(tmp_path / "none"), COMMIT="abc1234")
    done = subprocess.run(["bash", str(ROOT / ".device" / "run")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "commit abc1234" in (tmp_path / "env.txt").read_text().splitlines()


def expected_rows() -> dict[tuple[str, str], str]:
    """(part, row name) -> how it must end on a machine without a GPU."""
    tests = "pytest test_products test_gather test_attention_forms test_rules test_decode test_sparse --collect-only"
    rows = {("tests", tests): "collected"}
    for shape in SHAPES:
        rows |= {("bench", f"{shape}: transformers-pytorch-sdpa-cuda"): "skipped: no GPU",
                 ("bench", f"{shape}: transformers-pytorch-sdpa-cuda-static-compile"): "skipped: no GPU"}
        rows |= {("bench", f"{shape}: {n}"): "measured" for n in JAX_ROWS}
        rows |= {("profile", f"{shape}: {n}"): NO_GPU_TRACE for n in JAX_ROWS}
        if shape == "llama-3-8b":
            rows |= {("offload", "llama-3-8b: transformers-accelerate-cpu-offload"): "skipped: no GPU",
                     ("offload", "llama-3-8b: jax-stability-keep0.4"): "measured"}
    return rows


def test_every_row_is_present_with_its_status(suite) -> None:
    report, _, _ = suite
    got = {(r["part"], r["name"]): r["status"] for r in report["rows"]}
    assert got == expected_rows()
    assert report["tiny"] and report["platform"] == "cpu" and 0 < report["seconds"] < TINY.budget_s


def test_measured_rows_have_positive_finite_numbers_and_skipped_rows_none(suite) -> None:
    report, _, _ = suite
    for r in report["rows"]:
        traced = ("non_matmul_share", "kernel_ms_per_step", "gpu_idle_share")  # from GPU traces only
        numbers = [r.get(k) for k in (*MEASURED, *traced)]
        if r["status"] == "measured":
            assert all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0
                       for x in numbers[:-len(traced)]), r
        else:
            assert all(x is None for x in numbers), r
    tests = next(r for r in report["rows"] if r["part"] == "tests")
    assert tests["tests"] > 10 and tests["seconds"] > 0
    # Memory-limited mode holds every non-FFN weight and the FFN rows a step reads, not the whole model.
    offload = next(r for r in report["rows"] if r["part"] == "offload" and r["status"] == "measured")
    cfg, _ = model_config("llama-3-8b", tiny=True)
    params = random_params(cfg, "bfloat16")
    ffn = sum(x.nbytes for layer in params["layers"] for x in layer["ffn"].values())
    model = sum(x.nbytes for x in jax.tree.leaves(params))
    assert model - ffn < offload["device_weight_bytes"] < model


def test_markdown_lists_every_row_with_the_probes_bandwidth(suite) -> None:
    report, table, out = suite
    assert table.startswith(f"device suite, {report['date']}, cpu (cpu)")
    assert "bandwidth probe of 16 MiB (GB/s per row)" in table.splitlines()[0]
    header = table.splitlines()[2]
    assert "| probe GB/s |" in header and "| non-matmul share | kernel ms/step | GPU idle (profiled) |" in header
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(lines) == len(report["rows"])
    for line, r in zip(lines, report["rows"]):
        assert f"| {r['part']} | {r['name']} | {r['status']} |" in line
        if r["status"] == "measured":
            assert f"| {r['decode_tokens_per_s']:.1f} |" in line and f"| {r['bandwidth_gb_s']:.1f} |" in line
    assert Path(out, "device_suite.md").exists()


def test_every_part_has_a_bound_inside_the_six_minute_budget() -> None:
    """Tests, each job's rows (bench, offload) and its profile rows: every bound set, and all of
    them together within the budget, itself at most 6 minutes."""
    assert {j.kind for j in FULL.jobs} == {"bench", "offload"} and {j.shape for j in FULL.jobs} == set(SHAPES)
    assert FULL.tests_s > 0 and all(j.rows_s > j.reps_s > 0 for j in FULL.jobs)
    assert all(j.profile_s > 0 for j in FULL.jobs if j.kind == "bench")
    assert FULL.tests_s + sum(j.rows_s + j.profile_s + GRACE_S for j in FULL.jobs) <= FULL.budget_s <= 360
    assert all(x > 0 for x in (FULL.setup_s, FULL.warm_s, FULL.profile_row_s))


def test_a_spent_budget_leaves_a_skip_row_with_its_reason_for_every_part(tmp_path) -> None:
    report = run_suite(dataclasses.replace(TINY, budget_s=0), tmp_path)
    reason = "skipped: the suite's 0 s budget is spent"
    assert [(r["part"], r["name"], r["status"]) for r in report["rows"]] == [
        ("tests", "pytest", reason), ("bench", "llama-3-8b", reason), ("offload", "llama-3-8b", reason),
        ("bench", "smollm2-135m", reason)]


def test_the_tests_part_is_killed_at_its_bound(monkeypatch) -> None:
    rows = device_suite.run_tests(dataclasses.replace(TINY, collect_only=False), 3)
    assert [r["status"] for r in rows] == ["skipped: over 3 s (0 passed, 0 failed before the bound)"]
    assert 3 <= rows[0]["seconds"] < 10


def test_a_killed_tests_part_counts_what_passed_before_its_bound(tmp_path, monkeypatch) -> None:
    # A test that passes, then one that hangs: the row counts what pytest printed before the
    # kill, even where Python's output is buffered (pytest flushes each line itself).
    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_quick():\n    pass\n\n"
                                           "def test_hang():\n    time.sleep(120)\n")
    monkeypatch.setattr(device_suite, "DEVICE_TESTS", (f"{tmp_path}/test_hang.py::test_quick",
                                                       f"{tmp_path}/test_hang.py::test_hang"))
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    rows = device_suite.run_tests(dataclasses.replace(TINY, collect_only=False), 6)
    assert [r["status"] for r in rows] == ["skipped: over 6 s (1 passed, 0 failed before the bound)"]


def test_a_compile_over_its_bound_is_killed_and_its_row_skipped(tmp_path) -> None:
    """The offload job with a 0.1 s bound on a row's compile and first run: the JAX row's warm-up
    is killed, the worker restarted without it, and the job ends. (That warm-up took 1.2-1.4 s
    on the 2-core VM while other tests ran, so a 1 s bound, polled every 0.2 s, let it finish
    now and then.)"""
    plan = dataclasses.replace(TINY, warm_s=0.1)
    rows = run_job(Job("offload", "llama-3-8b", 200, 60), plan, 300, tmp_path)
    assert [(r["part"], r["name"], r["status"]) for r in rows] == [
        ("offload", "llama-3-8b: transformers-accelerate-cpu-offload", "skipped: no GPU"),
        ("offload", "llama-3-8b: jax-stability-keep0.4", "skipped: over 0.1 s (compile and first run)")]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["offload-llama-3-8b-0.log",
                                                                    "offload-llama-3-8b-1.log"]


def test_a_row_not_begun_for_lack_of_time_says_so(tmp_path) -> None:
    """A job whose rows must end before its repetitions could fit (1 s in all, 0.5 s of them for
    the repetitions) begins no warm-up: every row says so, and its profile rows too (0.5 s
    after the rows' 1 s, gone before the worker's setup is done)."""
    rows = run_job(Job("bench", "smollm2-135m", 1, 0.5, 0.5), TINY, 300, tmp_path)
    by_status = {(r["part"], r["status"]) for r in rows if "transformers" not in r["name"]}
    assert by_status == {("bench", "skipped: not begun: the job's time was spent (compile and first run)"),
                         ("profile", "skipped: not begun: the job's time was spent (trace)")}


def test_outcomes_are_counted_from_pytests_verbose_lines() -> None:
    """What the tests row reports, from complete or cut-off `pytest -v` output."""
    out = ("tests/test_decode.py::test_a PASSED                  [  2%]\n"
           "tests/test_decode.py::test_b[llama-0.4] FAILED       [  5%]\n"
           "tests/test_sparse.py::test_c SKIPPED (needs a GPU)   [  7%]\n"
           "tests/test_sparse.py::test_d ERROR                   [ 10%]\n"
           "tests/test_sparse.py::test_e PASSED                  [ 12%]\n"
           "tests/test_sparse.py::test_f ")  # cut off mid-test by the bound
    assert device_suite._counts(out) == {"passed": 2, "failed": 1, "error": 1, "skipped": 1}
