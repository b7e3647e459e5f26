"""`bench --suite device --tiny`: the prepared accelerator run, on tiny shapes on the CPU, so that
it cannot rot: every row present, measured rows with real numbers, GPU rows skipped (never faked)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import pytest

from coreinfer_jax.tools import bench
from coreinfer_jax.tools.cli import main
from coreinfer_jax.tools.device_suite import MEASURED
from coreinfer_jax.tools.roofline import bandwidth_probe
from coreinfer_jax.tools.shapes import model_config, random_params

SHAPES = ("smollm2-135m", "llama-3-8b")


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[dict, str, str]:
    out = tmp_path_factory.mktemp("suite")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(bench, "bandwidth_probe", lambda: bandwidth_probe(16 << 20))  # not 512 MiB
        status = main(["bench", "--suite", "device", "--tiny", "--out", str(out)])
    assert status == 0
    return json.loads((out / "device_suite.json").read_text()), (out / "device_suite.md").read_text(), str(out)


def expected_rows() -> dict[tuple[str, str], str]:
    """(part, row name) -> how it must end on a machine without a GPU."""
    rows = {("tests", "pytest test_parity test_decode test_sparse --collect-only"): "collected"}
    for shape in SHAPES:
        rows |= {("bench", f"{shape}: transformers-pytorch-sdpa-cuda"): "skipped: no GPU",
                 ("bench", f"{shape}: jax-dense"): "measured", ("bench", f"{shape}: jax-stability-keep0.4"): "measured",
                 ("bench", f"{shape}: jax-hybrid-0.24+0.24-int4+rest-normalized_magnitude"): "measured"}
    rows |= {("offload", "llama-3-8b: transformers-accelerate-cpu-offload"): "skipped: no GPU",
             ("offload", "llama-3-8b: jax-stability-keep0.4"): "measured"}
    return rows


def test_every_row_is_present_with_its_status(suite) -> None:
    report, _, _ = suite
    got = {(r["part"], r["name"]): r["status"] for r in report["rows"]}
    assert got == expected_rows()
    assert report["tiny"] and report["platform"] == "cpu" and report["seconds"] > 0


def test_measured_rows_have_positive_finite_numbers_and_skipped_rows_none(suite) -> None:
    report, _, _ = suite
    for r in report["rows"]:
        numbers = [r.get(k) for k in MEASURED]
        if r["status"] == "measured":
            assert all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in numbers), r
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


def test_markdown_lists_every_row(suite) -> None:
    report, table, out = suite
    assert table.startswith(f"device suite, {report['date']}, cpu (cpu)")
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(lines) == len(report["rows"])
    for line, r in zip(lines, report["rows"]):
        assert f"| {r['part']} | {r['name']} | {r['status']} |" in line
        if r["status"] == "measured":
            assert f"| {r['decode_tokens_per_s']:.1f} |" in line
    assert Path(out, "device_suite.md").exists()
