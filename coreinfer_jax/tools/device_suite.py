"""`python -m coreinfer_jax bench --suite device [--tiny] [--out DIR]`: one prepared run of
what is worth measuring on an accelerator, written as one JSON and one markdown table.

Parts, in order (one GPU, under 8 minutes):
  tests    the pytest files that exercise the compiled programs (parity, decode, sparse), in a
           subprocess with a time bound and float32 matmuls at full precision (a GPU's default
           TF32 would break the parity tolerances);
  bench    SmolLM2- and Llama-3-8B-shaped bfloat16 random-weight decoding: JAX dense,
           stability keep 0.4 and the hybrid default (its sketch is built from any weights)
           against Transformers on CUDA (its own random initialisation of the same config: only
           speed is compared);
  offload  memory-limited mode (FFN weights in pinned host memory) at Llama-3-8B shapes against
           Transformers + accelerate CPU offload held to the same GPU bytes of weights.
`--tiny` swaps in tiny shapes and short runs, and only collects the tests (CPU, about a
minute): CI runs it, so the suite cannot rot. A row that needs a GPU and finds none reads
"skipped: no GPU"; a part that breaks becomes one "failed: ..." row (traceback on stderr)
and the exit status is 1. No row ever carries numbers it did not measure.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import jax

from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.runtime.offload import PINNED, device_bytes
from coreinfer_jax.sparse.hybrid import Hybrid
from coreinfer_jax.sparse.method import Dense
from coreinfer_jax.sparse.stability import Stability
from coreinfer_jax.tools.bench import RANDOM_PROMPT_TOKENS, measure
from coreinfer_jax.tools.roofline import ffn_bytes_per_token
from coreinfer_jax.tools.shapes import model_config, random_params, random_prompt
from coreinfer_jax.tools.torch_baseline import TorchRunner

ROOT = Path(__file__).resolve().parents[2]
DEVICE_TESTS = ("tests/test_parity.py", "tests/test_decode.py", "tests/test_sparse.py")
# The numbers every measured row carries (positive and finite).
MEASURED = ("decode_tokens_per_s", "bytes_per_token", "fraction_of_bound", "compile_s", "peak_memory_bytes")
KEEP = 0.4
DTYPE = "bfloat16"


@dataclasses.dataclass(frozen=True)
class Plan:
    shapes: tuple[str, ...] = ("smollm2-135m", "llama-3-8b")
    offload_shape: str = "llama-3-8b"
    new_tokens: int = 128
    # Accelerate copies every offloaded layer to the GPU for every token: seconds per token at 8B.
    offload_new_tokens: int = 16
    reps: int = 3
    collect_only: bool = False
    test_timeout_s: int = 240
    tiny: bool = False


FULL = Plan()
TINY = Plan(new_tokens=8, offload_new_tokens=8, reps=2, collect_only=True, test_timeout_s=120, tiny=True)


def has_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def skipped(part: str, name: str, reason: str) -> dict[str, Any]:
    return {"part": part, "name": name, "status": f"skipped: {reason}"}


def run_tests(plan: Plan) -> list[dict[str, Any]]:
    """The device test files in a pytest subprocess, bounded by `plan.test_timeout_s`."""
    files = [f for f in DEVICE_TESTS if (ROOT / f).exists()]
    if not files:
        return [skipped("tests", "pytest", f"no test files under {ROOT} (an installed package)")]
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", *files]
    if plan.collect_only:
        cmd.append("--collect-only")
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    name = "pytest " + " ".join(Path(f).stem for f in files) + (" --collect-only" if plan.collect_only else "")
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=plan.test_timeout_s)
    except subprocess.TimeoutExpired:
        return [{"part": "tests", "name": name, "status": f"failed: over the {plan.test_timeout_s} s bound"}]
    summary = (r.stdout.strip().splitlines() or [""])[-1]
    counts = [int(w) for w, nxt in zip(summary.split(), summary.split()[1:]) if w.isdigit()
              and nxt.strip(",") in ("passed", "tests", "test")]
    status = ("collected" if plan.collect_only else "passed") if r.returncode == 0 else f"failed: {summary}"
    if r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-4000:], file=sys.stderr)
    return [{"part": "tests", "name": name, "status": status, "tests": counts[0] if counts else None,
             "seconds": time.perf_counter() - t}]


def rows_of(part: str, prefix: str, report: dict[str, Any]) -> list[dict[str, Any]]:
    """`bench.measure` rows as suite rows."""
    out = []
    for r in report["rows"]:
        out.append({"part": part, "name": f"{prefix}: {r['name']}", "status": "measured",
                    "vs_baseline": r["vs_torch"], "vs_dense": r["vs_dense"],
                    **{k: r[k] for k in (*MEASURED, "peak_memory_kind", "prefill_ms")}})
    return out


def _free() -> None:
    gc.collect()
    if torch_cuda():
        import torch

        torch.cuda.empty_cache()


def run_bench_part(plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for shape in plan.shapes:
        cfg, hf = model_config(shape, plan.tiny)
        gen = Generator(cfg, random_params(cfg, DTYPE), tokenizer=None)
        runner = TorchRunner.from_hf_config(hf, DTYPE, "sdpa", "cuda") if torch_cuda() else None
        report = measure(gen, random_prompt(cfg, RANDOM_PROMPT_TOKENS), [Dense(), Stability(keep=KEEP), Hybrid()],
                         plan.new_tokens, plan.reps, runner, "transformers-pytorch-sdpa-cuda")
        if runner is None:
            rows.append(skipped("bench", f"{shape}: transformers-pytorch-sdpa-cuda", "no GPU"))
        rows += rows_of("bench", shape, report)
        del gen, runner
        _free()
    return rows


def run_offload_part(plan: Plan) -> list[dict[str, Any]]:
    """Memory-limited mode against accelerate, each holding the same GPU bytes of weights."""
    shape = plan.offload_shape
    cfg, hf = model_config(shape, plan.tiny)
    # Made straight into pinned host memory: the device never holds the whole model.
    gen = Generator(cfg, random_params(cfg, DTYPE, memory_kind=PINNED), tokenizer=None, offload=True,
                    host_memory=PINNED)
    method = Stability(keep=KEEP).validate(cfg)
    # What decoding holds on the device: every non-FFN weight, and the FFN rows it reads per token.
    held = device_bytes(gen.offloaded[0]) + ffn_bytes_per_token(cfg, gen.params, method)
    runner = TorchRunner.offloaded(hf, DTYPE, held) if torch_cuda() and has_gpu() else None
    report = measure(gen, random_prompt(cfg, RANDOM_PROMPT_TOKENS), [method], plan.offload_new_tokens, plan.reps,
                     runner, "transformers-accelerate-cpu-offload")
    rows = [] if runner else [skipped("offload", f"{shape}: transformers-accelerate-cpu-offload", "no GPU")]
    rows += rows_of("offload", shape, report)
    for r in rows:
        if r["status"] == "measured":
            r["device_weight_bytes"] = held
    del gen, runner
    _free()
    return rows


PARTS: dict[str, Callable[[Plan], list[dict[str, Any]]]] = {
    "tests": run_tests, "bench": run_bench_part, "offload": run_offload_part}


def run_suite(plan: Plan, out: Path) -> dict[str, Any]:
    """Every part in turn; writes `out/device_suite.json` and `out/device_suite.md`."""
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for part, run in PARTS.items():
        print(f"device suite: {part}", file=sys.stderr)
        try:
            rows += run(plan)
        except Exception as e:  # the report must still be written: one row says what broke
            traceback.print_exc()
            rows.append({"part": part, "name": part, "status": f"failed: {type(e).__name__}: {e}".splitlines()[0]})
    versions = {"jax": jax.__version__}
    if torch_cuda() or "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__
    report = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
              "platform": jax.devices()[0].platform, "tiny": plan.tiny, "dtype": DTYPE, "keep": KEEP,
              "new_tokens": plan.new_tokens, "offload_new_tokens": plan.offload_new_tokens, "reps": plan.reps,
              "seconds": time.perf_counter() - t0, **versions, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_suite.json").write_text(json.dumps(report, indent=2))
    (out / "device_suite.md").write_text(markdown(report) + "\n")
    return report


def _num(x: float | None, spec: str) -> str:
    return "" if x is None or not math.isfinite(x) else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"device suite, {report['date']}, {report['device']} ({report['platform']}), JAX {report['jax']}"
             f"{', PyTorch ' + report['torch'] if 'torch' in report else ''}{', tiny shapes' if report['tiny'] else ''}: "
             f"{report['dtype']} random weights, batch 1, {report['new_tokens']} new tokens "
             f"({report['offload_new_tokens']} offloaded), median of {report['reps']}, "
             f"{report['seconds']:.0f} s in all",
             "", "| part | row | status | decode tok/s | vs baseline | vs jax dense | MB/token | of bound "
             "| compile s | peak GiB | tests | seconds |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        peak = _num(r.get("peak_memory_bytes") and r["peak_memory_bytes"] / 2**30, ".2f")
        kind = r.get("peak_memory_kind") or ""
        lines.append(
            f"| {r['part']} | {r['name']} | {r['status']} | {_num(r.get('decode_tokens_per_s'), '.1f')} "
            f"| {_num(r.get('vs_baseline'), '.2f')} | {_num(r.get('vs_dense'), '.2f')} "
            f"| {_num(r.get('bytes_per_token') and r['bytes_per_token'] / 1e6, '.1f')} "
            f"| {_num(r.get('fraction_of_bound'), '.0%')} | {_num(r.get('compile_s'), '.1f')} "
            f"| {peak}{' (' + kind + ')' if peak else ''} | {r.get('tests') or ''} | {_num(r.get('seconds'), '.0f')} |")
    return "\n".join(lines)


def suite_main(args: argparse.Namespace) -> int:
    # Transformers shares the GPU with JAX here: JAX must take memory as it needs it, not
    # preallocate most of the device (effective while no JAX computation has run yet).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    report = run_suite(TINY if args.tiny else FULL, args.out)
    print(markdown(report))
    print(f"wrote {args.out / 'device_suite.json'} and {args.out / 'device_suite.md'}", file=sys.stderr)
    return 1 if any(r["status"].startswith("failed") for r in report["rows"]) else 0
