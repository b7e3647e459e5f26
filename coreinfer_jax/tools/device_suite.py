"""`python -m coreinfer_jax bench --suite device [--tiny] [--out DIR]`: one prepared run of
what is worth measuring on an accelerator, written as one JSON and one markdown table.

It is long because it is one bounded run: each part's worker processes, their time bounds
and the rows that say why a part was cut belong together, so a GPU session can trust it.

Parts, in order, each with its own time bound inside a whole-suite budget (`Plan`; 6 minutes
on one GPU):
  tests    pytest files that exercise the compiled programs (products, gather, decode, sparse;
           `-m "not slow"`) in one process (no xdist), float32 matmuls at full precision (a
           GPU's default TF32 would break the parity tolerances), XLA's autotuning off;
  bench    Llama-3-8B- and SmolLM2-shaped bfloat16 random-weight decoding: JAX dense,
           stability keep 0.4 per row and batch-shared, the hybrid default (its sketch is built
           from any weights), against Transformers on CUDA: sdpa as it comes, and with its static
           cache and `torch.compile` (its fastest documented setting; random initialisation of
           the same config: only speed is compared);
  profile  for each JAX bench row, the share of the decode's GPU kernel time outside matrix
           products (`profiling.non_matmul_share`), from a `jax.profiler` trace of one
           generation; taken in the bench's process, where the programs are compiled already;
  offload  memory-limited mode (FFN weights in pinned host memory) at Llama-3-8B shapes against
           Transformers + accelerate CPU offload held to the same GPU bytes of weights.

Bounds are hard: every bench and offload job runs in a worker process that reports each phase
as it starts ("setup", "warm:<row>" for a row's compile and first run, "reps", "profile:<row>")
and each row as it is done; the suite kills a worker whose phase or job outlasts its bound,
writes that row as "skipped: over N s (...)" and restarts the worker without it while the job
has time left. Compiled programs go to a JAX compilation cache under `--out`, so a restart or
a second run of the suite does not compile again. Every row a part could not measure says
why ("skipped: ..."); a row that breaks is "failed: ..." (tracebacks in `--out`/logs) and the
exit status is 1. No row ever carries numbers it did not measure.
`--tiny` swaps in tiny shapes, short runs and a 16 MiB bandwidth probe, and only collects the
tests (CPU): CI runs it, so the suite cannot rot.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import jax

from coreinfer_jax.paths import write_text_atomically
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.runtime.offload import PINNED, device_bytes
from coreinfer_jax.sparse.hybrid import Hybrid
from coreinfer_jax.sparse.method import Dense, Method
from coreinfer_jax.sparse.stability import Stability
from coreinfer_jax.tools.bench import RANDOM_PROMPT_TOKENS, label, measure
from coreinfer_jax.tools.profiling import gpu_idle_share, gpu_kernel_us, non_matmul_share, read_trace
from coreinfer_jax.tools.roofline import PROBE_BYTES, BandwidthProbe, ffn_bytes_per_token
from coreinfer_jax.tools.shapes import model_config, random_params, random_prompt
from coreinfer_jax.tools.torch_baseline import TorchRunner

ROOT = Path(__file__).resolve().parents[2]
# The tests whose programs a GPU compiles differently from a CPU: the products' and attention's
# GPU forms (forced on and off in a hybrid batch of one, the bench's path), the fused and padded
# gather (a gated and a ReLU family: the layout differs by family kind), the radix selection,
# the decode loop's donated cache, and dense and sparse decoding against their restatements.
# The whole files took 109 s on a 2-core CPU (pytest's count), these 39 (48 with Python's start).
NODES = {
    "products": ("test_each_form_equals_numpy", "test_the_gpu_forms_finish_a_norm_after_the_reduction",
                 "test_hybrid_decode_with_the_gpu_forms_gives_the_cpu_tokens[llama-sketch-1]"),
    "gather": ("test_padded_rows_by_hand", "test_padding_rows_are_zero_and_contribute_nothing",
               *(f"test_fused_padded_gather_equals_the_plain_gather_token_for_token[{c}]"
                 for c in ("llama-stability", "llama-hybrid", "opt-shared"))),
    "attention_forms": ("test_each_form_equals_numpy",),
    "rules": ("test_radix_selection_equals_numpy[299-bfloat16]", "test_radix_selection_equals_numpy[37-float32]"),
    "decode": ("test_segmented_decode_matches_transformers", "test_resumed_loop_updates_the_kv_cache_in_place[greedy]"),
    "sparse": ("test_sparse_generation_matches_masking_restatement[0.4-llama]",),
}
DEVICE_TESTS = tuple(f"tests/test_{f}.py::{n}" for f, nodes in NODES.items() for n in nodes)
# The numbers every measured bench or offload row carries (positive and finite).
MEASURED = ("decode_tokens_per_s", "bytes_per_token", "bandwidth_gb_s", "fraction_of_bound", "compile_s",
            "peak_memory_bytes")
KEEP = 0.4
DTYPE = "bfloat16"
TORCH_SDPA = "transformers-pytorch-sdpa-cuda"
TORCH_COMPILED = "transformers-pytorch-sdpa-cuda-static-compile"
TORCH_OFFLOAD = "transformers-accelerate-cpu-offload"
NO_GPU_TRACE = "skipped: no GPU kernels in a CPU trace"
POLL_S = 0.2
MIN_START_S = 5  # a job with less time left than this is not (re)started


def bench_methods() -> list[Method]:
    return [Dense(), Stability(keep=KEEP), Stability(keep=KEEP, share="batch"), Hybrid()]


@dataclasses.dataclass(frozen=True)
class Job:
    """One worker's share of the suite, seconds of wall clock for each of its stages."""
    kind: str  # "bench" (its profile rows after) or "offload"
    shape: str
    rows_s: float  # setup, every row's warm-up and the timed repetitions
    reps_s: float  # of `rows_s`, kept for the timed repetitions: a warm-up is not begun past it
    profile_s: float = 0  # the profile rows, after `rows_s`


@dataclasses.dataclass(frozen=True)
class Plan:
    # The targets are at Llama-3-8B shapes, so its bench runs first; the SmolLM2 one is the
    # first to lose rows when the budget runs short (it gave the tests part 15 s).
    jobs: tuple[Job, ...] = (Job("bench", "llama-3-8b", 150, 45, 40), Job("offload", "llama-3-8b", 45, 25),
                             Job("bench", "smollm2-135m", 30, 12, 10))
    new_tokens: int = 128
    # Accelerate copies every offloaded layer to the GPU for every token: seconds per token at 8B.
    offload_new_tokens: int = 8
    reps: int = 3
    collect_only: bool = False
    tiny: bool = False
    probe_bytes: int = PROBE_BYTES
    budget_s: float = 360  # the whole suite, Python's start excluded: the tests and the jobs fill it
    tests_s: float = 70
    # Hard bounds of one phase inside a job (a hang, not a slow row, is what these catch).
    setup_s: float = 45  # random weights, Transformers models, the bandwidth probe
    warm_s: float = 60  # one row's compile and first run (torch.compile's included)
    profile_row_s: float = 15  # one row's traced generation and its parsing


FULL = Plan()
TINY = Plan(jobs=(Job("bench", "llama-3-8b", 300, 60, 120), Job("offload", "llama-3-8b", 200, 60),
                  Job("bench", "smollm2-135m", 300, 60, 120)),
            new_tokens=8, offload_new_tokens=8, reps=2, collect_only=True, tiny=True, probe_bytes=16 << 20,
            budget_s=1800, tests_s=240, setup_s=120, warm_s=120, profile_row_s=60)
GRACE_S = 5  # of a job's bound, for its worker to start and exit


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


# --- the tests part --------------------------------------------------------------------------


def _counts(output: str) -> dict[str, int]:
    """Outcomes in pytest's `-v` lines ("tests/x.py::name PASSED [ 5%]"), partial output included."""
    outcomes = [m.group(1).lower() for m in re.finditer(r"::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", output)]
    return {w: outcomes.count(w) for w in ("passed", "failed", "error", "skipped")}


def run_tests(plan: Plan, bound_s: float) -> list[dict[str, Any]]:
    """The device test files in one pytest process (no xdist), killed at `bound_s`."""
    files = [f for f in DEVICE_TESTS if (ROOT / f.split("::")[0]).exists()]
    stems = dict.fromkeys(Path(f.split("::")[0]).stem for f in DEVICE_TESTS)
    name = "pytest " + " ".join(stems) + (" --collect-only" if plan.collect_only else "")
    if not files:
        return [skipped("tests", name, f"no test files under {ROOT} (an installed package)")]
    # `-o addopts=` drops the project's `-n 2`; `-p no:xdist` holds even where xdist is absent.
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:xdist", "-p", "no:cacheprovider",
           "-m", "not slow", *(["-q", "--collect-only"] if plan.collect_only else ["-v"]), *files]
    # The test suite pins JAX to the CPU unless told otherwise (tests/conftest.py): name this
    # process's platform, so the tests run on the device being measured.
    # Autotuning off: it compiles and times several kernels per product to pick the fastest,
    # compile time these correctness tests spend in every program and whose result they
    # never measure.
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_PLATFORMS=jax.devices()[0].platform,
               XLA_FLAGS=" ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_gpu_autotune_level=0"])))
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=bound_s)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        done = _counts(out)
        return [{"part": "tests", "name": name, "status": f"skipped: over {bound_s:.0f} s ({done['passed']} passed, "
                 f"{done['failed'] + done['error']} failed before the bound)", "seconds": time.perf_counter() - t}]
    summary = (r.stdout.strip().splitlines() or [""])[-1]
    if r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-4000:], file=sys.stderr)
        return [{"part": "tests", "name": name, "status": f"failed: {summary}", "seconds": time.perf_counter() - t}]
    done = _counts(r.stdout)
    tests = sum("::" in line for line in r.stdout.splitlines()) if plan.collect_only else done["passed"]
    return [{"part": "tests", "name": name, "status": "collected" if plan.collect_only else "passed",
             "tests": tests, "seconds": time.perf_counter() - t}]


# --- jobs, run inside a worker process -------------------------------------------------------


def rows_of(part: str, prefix: str, report: dict[str, Any]) -> list[dict[str, Any]]:
    """`bench.measure` rows as suite rows."""
    return [{"part": part, "name": f"{prefix}: {r['name']}", "status": "measured", "vs_baseline": r["vs_torch"],
             "vs_dense": r["vs_dense"], "bandwidth_gb_s": report["bandwidth_gb_s"],
             **{k: r[k] for k in MEASURED if k != "bandwidth_gb_s"}, "peak_memory_kind": r["peak_memory_kind"],
             "prefill_ms": r["prefill_ms"]} for r in report["rows"]]


class Clock:
    """A job's deadlines, told to its worker: rows end by `rows_by`, profile rows by `ends_by`
    (wall clock, `time.time()`, kept across restarts). A row's warm-up is not begun when what
    would be left could not hold the timed repetitions, so a late row costs one "skipped" row
    rather than the kill of the job and every row it had warmed up; a profile row is not begun
    when the previous one's time is no longer left."""

    def __init__(self, job: Job, spec: dict[str, Any], emit: Callable[..., None]):
        self.job, self.rows_by, self.ends_by, self.emit = job, spec["rows_by"], spec["ends_by"], emit
        self.profile_began: float | None = None
        self.profile_took = 0.0

    def phase(self, phase: str) -> bool:
        kind, _, row = phase.partition(":")
        now = time.time()
        if kind == "profile" and self.profile_began is not None:
            self.profile_took = now - self.profile_began  # the previous row's: this one's estimate
        need, by = {"warm": (self.job.reps_s, self.rows_by),
                    "profile": (self.profile_took, self.ends_by)}.get(kind, (0, math.inf))
        if now + need >= by:
            part = "profile" if kind == "profile" else self.job.kind
            self.emit(row=skipped(part, row, f"not begun: the job's time was spent ({WHAT[kind]})"))
            return False
        if kind == "profile":
            self.profile_began = now
        self.emit(phase=phase)
        return True


def _baseline(baselines: dict[str, TorchRunner], name: str, make: Callable[[], TorchRunner], part: str, shape: str,
              emit: Callable[..., None]) -> None:
    """`baselines[name] = make()`; where Transformers fails to build it, that costs its own row
    ("failed: ..."), not the job's JAX rows."""
    try:
        baselines[name] = make()
    except Exception as e:
        traceback.print_exc()
        status = f"failed: {type(e).__name__}: {e}".splitlines()[0]
        emit(row={"part": part, "name": f"{shape}: {name}", "status": status})


def bench_job(plan: Plan, job: Job, skip: set[tuple[str, str]], emit: Callable[..., None], spec: dict[str, Any]
              ) -> None:
    """Bench rows of one shape, then the profile rows of its JAX methods."""
    shape, clock = job.shape, Clock(job, spec, emit)
    emit(phase="setup")
    cfg, hf = model_config(shape, plan.tiny)
    gen = Generator(cfg, random_params(cfg, DTYPE), tokenizer=None)
    methods = [gen.resolve(m) for m in bench_methods()]
    jax_names = [f"{shape}: {label(m)}" for m in methods]
    emit(rows=[("bench", f"{shape}: {n}") for n in (TORCH_SDPA, TORCH_COMPILED)]
         + [("bench", n) for n in jax_names] + [("profile", n) for n in jax_names])
    baselines: dict[str, TorchRunner] = {}
    for name, make in ((TORCH_SDPA, lambda: TorchRunner.from_hf_config(hf, DTYPE, "sdpa", "cuda")),
                       (TORCH_COMPILED, lambda: TorchRunner.static_compiled(hf, DTYPE))):
        if not torch_cuda():
            emit(row=skipped("bench", f"{shape}: {name}", "no GPU"))
        elif ("bench", f"{shape}: {name}") not in skip:
            _baseline(baselines, name, make, "bench", shape, emit)
    prompt = random_prompt(cfg, RANDOM_PROMPT_TOKENS)
    to_bench = [m for m, n in zip(methods, jax_names) if ("bench", n) not in skip]
    if baselines or to_bench:  # a restart after every bench row is done goes straight to profiling
        report = measure(gen, prompt, to_bench, plan.new_tokens, plan.reps, baselines,
                         phase=lambda p: clock.phase(p.replace(":", f":{shape}: ", 1)),
                         probe=BandwidthProbe(plan.probe_bytes))
        for row in rows_of("bench", shape, report):
            emit(row=row)
    del baselines
    _free()
    for m, name in zip(methods, jax_names):
        if ("profile", name) in skip or not clock.phase(f"profile:{name}"):
            continue
        trace_dir = Path(spec["work"]) / "traces" / name.replace(": ", "-").replace(" ", "_")
        with jax.profiler.trace(str(trace_dir)):
            gen.generate_ids([prompt], plan.new_tokens, method=m, stop_at_eos=False)
        trace = read_trace(trace_dir)
        share = non_matmul_share(trace)
        kernel_us, matmul_us = gpu_kernel_us(trace)
        emit(row={"part": "profile", "name": name, "status": "measured" if share is not None else NO_GPU_TRACE,
                  "non_matmul_share": share, "gpu_idle_share": gpu_idle_share(trace) if share is not None else None,
                  "kernel_ms": kernel_us / 1e3 if share is not None else None,
                  # Decode steps: every token but the first, which pre-fill's logits give.
                  "kernel_ms_per_step": kernel_us / 1e3 / (plan.new_tokens - 1) if share is not None else None,
                  "matmul_ms": matmul_us / 1e3 if share is not None else None, "trace": str(trace_dir)})


def offload_job(plan: Plan, job: Job, skip: set[tuple[str, str]], emit: Callable[..., None], spec: dict[str, Any]
                ) -> None:
    """Memory-limited mode against accelerate, each holding the same GPU bytes of weights."""
    shape, clock = job.shape, Clock(job, spec, emit)
    emit(phase="setup")
    cfg, hf = model_config(shape, plan.tiny)
    # Made straight into pinned host memory: the device never holds the whole model.
    gen = Generator(cfg, random_params(cfg, DTYPE, memory_kind=PINNED), tokenizer=None, offload=True,
                    host_memory=PINNED)
    method = Stability(keep=KEEP).validate(cfg)
    emit(rows=[("offload", f"{shape}: {n}") for n in (TORCH_OFFLOAD, label(method))])
    # What decoding holds on the device: every non-FFN weight, and the FFN rows it reads per token.
    held = device_bytes(gen.offloaded[0]) + ffn_bytes_per_token(cfg, gen.params, method)
    baselines: dict[str, TorchRunner] = {}
    if not (torch_cuda() and has_gpu()):
        emit(row=skipped("offload", f"{shape}: {TORCH_OFFLOAD}", "no GPU"))
    elif ("offload", f"{shape}: {TORCH_OFFLOAD}") not in skip:
        _baseline(baselines, TORCH_OFFLOAD, lambda: TorchRunner.offloaded(hf, DTYPE, held), "offload", shape, emit)
    to_bench = [] if ("offload", f"{shape}: {label(method)}") in skip else [method]
    report = measure(gen, random_prompt(cfg, RANDOM_PROMPT_TOKENS), to_bench, plan.offload_new_tokens, plan.reps,
                     baselines, phase=lambda p: clock.phase(p.replace(":", f":{shape}: ", 1)),
                     probe=BandwidthProbe(plan.probe_bytes))
    for row in rows_of("offload", shape, report):
        emit(row=dict(row, device_weight_bytes=held))


JOBS = {"bench": bench_job, "offload": offload_job}


def _free() -> None:
    gc.collect()
    if torch_cuda():
        import torch

        torch.cuda.empty_cache()


def plan_from_dict(d: dict[str, Any]) -> Plan:
    """`dataclasses.asdict(plan)` after a JSON round trip, back to a `Plan`."""
    return Plan(**dict(d, jobs=tuple(Job(**j) for j in d["jobs"])))


def worker_main(spec_path: str, events_path: str) -> None:
    """A job's worker process: runs the job in `spec_path`, appending its events to `events_path`."""
    spec = json.loads(Path(spec_path).read_text())
    plan = plan_from_dict(spec["plan"])
    with open(events_path, "a") as f:
        def emit(**event: Any) -> None:
            f.write(json.dumps({"t": time.time(), **event}) + "\n")
            f.flush()  # the suite reads events while the job runs

        job = Job(**spec["job"])
        JOBS[job.kind](plan, job, {tuple(s) for s in spec["skip"]}, emit, spec)


# --- the supervisor --------------------------------------------------------------------------


def _phase_bound(plan: Plan, phase: str) -> float | None:
    """A phase's hard bound; None for the timed repetitions, which `Clock` keeps in the job's."""
    return {"setup": plan.setup_s, "warm": plan.warm_s, "profile": plan.profile_row_s}.get(phase.split(":")[0])


WHAT = {"setup": "setup", "warm": "compile and first run", "reps": "timed repetitions", "profile": "trace"}


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _run_worker(job: Job, plan: Plan, spec: dict[str, Any], out: Path, attempt: int, hard_by: float
                ) -> tuple[list[dict[str, Any]], str | None, int | None, Path]:
    """One worker process, killed at `hard_by` or when a phase outlasts its bound:
    `(its events, the phase it was killed in ("job" at `hard_by`) or None, exit status, log)`."""
    work = Path(spec["work"])
    stem = f"{job.kind}-{job.shape}-{attempt}"
    spec_path, events, log = work / f"{stem}.spec.json", work / f"{stem}.events.jsonl", out / "logs" / f"{stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    events.write_text("")
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(out / "jax-cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    killed = None
    with open(log, "w") as err:
        # Its own session, so that the kill takes every process it started along.
        proc = subprocess.Popen([sys.executable, "-m", "coreinfer_jax.tools.device_suite", str(spec_path), str(events)],
                                cwd=ROOT, env=env, stdout=err, stderr=err, start_new_session=True)
        while proc.poll() is None:
            time.sleep(POLL_S)
            phases = [e for e in _events(events) if "phase" in e]
            bound = _phase_bound(plan, phases[-1]["phase"]) if phases else None
            if time.time() > hard_by:
                killed = "job"
            elif bound is not None and time.time() - phases[-1]["t"] > bound:
                killed = phases[-1]["phase"]
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return _events(events), killed, None if killed else proc.returncode, log


def run_job(job: Job, plan: Plan, bound_s: float, out: Path) -> list[dict[str, Any]]:
    """A job's rows within `bound_s`: a phase past its bound or a crash drops its row and the
    worker is restarted without it, while time is left."""
    t0 = time.time()
    hard_by = t0 + bound_s
    rows_by = min(t0 + job.rows_s, hard_by - GRACE_S - job.profile_s)
    ends_by = min(hard_by - GRACE_S, rows_by + job.profile_s)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    names: list[tuple[str, str]] = []
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for attempt in itertools.count():
        if hard_by - time.time() < MIN_START_S:
            reason = f"over the job's {bound_s:.0f} s"
            break
        spec = {"job": dataclasses.asdict(job), "plan": dataclasses.asdict(plan), "skip": list(rows),
                "work": str(work), "rows_by": rows_by, "ends_by": ends_by}
        events, killed, status, log = _run_worker(job, plan, spec, out, attempt, hard_by)
        for e in events:
            if "rows" in e:
                names = [tuple(n) for n in e["rows"]]
            if "row" in e:
                rows[(e["row"]["part"], e["row"]["name"])] = e["row"]
        phases = [e["phase"] for e in events if "phase" in e]
        phase = phases[-1] if phases else "setup"
        kind, _, row = phase.partition(":")
        if killed is None and status == 0:
            reason = "not reported by its job"
            break
        if killed == "job":
            reason = f"over the job's {bound_s:.0f} s (in its {WHAT[kind]})"
            break
        why = (f"skipped: over {_phase_bound(plan, phase):g} s ({WHAT[kind]})" if killed
               else f"failed: {_last_error(log)} (log {log.name})")
        if kind in ("warm", "profile"):  # the row's own trouble: restart without it
            key = ("profile" if kind == "profile" else job.kind, row)
            rows[key] = {"part": key[0], "name": row, "status": why}
            continue
        names = names or [(job.kind, f"{job.shape}: {phase}")]
        rows.update({n: {"part": n[0], "name": n[1], "status": why} for n in names if n not in rows})
        break
    names = names or [(job.kind, job.shape)]
    return [rows.get(n) or skipped(n[0], n[1], reason) for n in names]


def _last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return (lines[-1] if lines else "no output").strip()[:200]


def run_suite(plan: Plan, out: Path) -> dict[str, Any]:
    """Every part in turn, each within its bound and what is left of the budget; writes
    `out/device_suite.json` and `out/device_suite.md`."""
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []

    def left(bound: float) -> float:
        return min(bound, plan.budget_s - (time.monotonic() - t0))

    steps: list[tuple[str, str, float, Callable[[float], list[dict[str, Any]]]]] = [
        ("tests", "pytest", plan.tests_s, lambda b: run_tests(plan, b))]
    for job in plan.jobs:
        steps.append((job.kind, job.shape, job.rows_s + job.profile_s + GRACE_S,
                      lambda b, job=job: run_job(job, plan, b, out)))
    for part, what, bound, run in steps:
        print(f"device suite: {part} {what} (bound {bound:.0f} s)", file=sys.stderr)
        if left(bound) < MIN_START_S:
            rows.append(skipped(part, what, f"the suite's {plan.budget_s:.0f} s budget is spent"))
            continue
        try:
            rows += run(left(bound))
        except Exception as e:  # the report must still be written: one row says what broke
            traceback.print_exc()
            rows.append({"part": part, "name": what, "status": f"failed: {type(e).__name__}: {e}".splitlines()[0]})
    report = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
              "platform": jax.devices()[0].platform, "tiny": plan.tiny, "dtype": DTYPE, "keep": KEEP,
              "new_tokens": plan.new_tokens, "offload_new_tokens": plan.offload_new_tokens, "reps": plan.reps,
              "probe_bytes": plan.probe_bytes, "plan": dataclasses.asdict(plan),
              "seconds": time.monotonic() - t0, "jax": jax.__version__, "rows": rows}
    if torch_cuda():
        report["torch"] = sys.modules["torch"].__version__
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "device_suite.json", json.dumps(report, indent=2))
    write_text_atomically(out / "device_suite.md", markdown(report) + "\n")
    return report


def _num(x: float | None, spec: str) -> str:
    return "" if x is None or not math.isfinite(x) else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"device suite, {report['date']}, {report['device']} ({report['platform']}), JAX {report['jax']}"
             f"{', PyTorch ' + report['torch'] if 'torch' in report else ''}{', tiny shapes' if report['tiny'] else ''}: "
             f"{report['dtype']} random weights, batch 1, {report['new_tokens']} new tokens "
             f"({report['offload_new_tokens']} offloaded), median of {report['reps']}, "
             f"bandwidth probe of {report['probe_bytes'] / 2**20:.0f} MiB (GB/s per row), "
             f"{report['seconds']:.0f} s in all",
             "", "| part | row | status | decode tok/s | vs baseline | vs jax dense | MB/token | probe GB/s | of bound "
             "| non-matmul share | kernel ms/step | GPU idle (profiled) | compile s | peak GiB | tests | seconds |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        peak = _num(r.get("peak_memory_bytes") and r["peak_memory_bytes"] / 2**30, ".2f")
        kind = r.get("peak_memory_kind") or ""
        lines.append(
            f"| {r['part']} | {r['name']} | {r['status']} | {_num(r.get('decode_tokens_per_s'), '.1f')} "
            f"| {_num(r.get('vs_baseline'), '.2f')} | {_num(r.get('vs_dense'), '.2f')} "
            f"| {_num(r.get('bytes_per_token') and r['bytes_per_token'] / 1e6, '.1f')} "
            f"| {_num(r.get('bandwidth_gb_s'), '.1f')} | {_num(r.get('fraction_of_bound'), '.0%')} "
            f"| {_num(r.get('non_matmul_share'), '.0%')} | {_num(r.get('kernel_ms_per_step'), '.2f')} "
            f"| {_num(r.get('gpu_idle_share'), '.0%')} "
            f"| {_num(r.get('compile_s'), '.1f')} "
            f"| {peak}{' (' + kind + ')' if peak else ''} | {r.get('tests') or ''} | {_num(r.get('seconds'), '.0f')} |")
    return "\n".join(lines)


def suite_main(args: argparse.Namespace) -> int:
    # Transformers shares the GPU with JAX here: JAX must take memory as it needs it, not
    # preallocate most of the device (effective while no JAX computation has run yet; the
    # workers inherit it).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    report = run_suite(TINY if args.tiny else FULL, args.out)
    print(markdown(report))
    print(f"wrote {args.out / 'device_suite.json'} and {args.out / 'device_suite.md'}", file=sys.stderr)
    return 1 if any(r["status"].startswith("failed") for r in report["rows"]) else 0


if __name__ == "__main__":
    worker_main(*sys.argv[1:])
