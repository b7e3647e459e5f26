"""`jax.profiler` traces of generation, readable by TensorBoard's profile plugin or XProf, and
the numbers the device suite takes from them: the share of GPU kernel time spent outside
matrix products, and the share of the decode's time in which the GPU runs no kernel."""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import jax

# Matrix-product kernels by name: XLA's GPU products are Triton fusions named "gemm_fusion_dot_N"
# or cuBLAS custom calls, whose kernels are named after cuBLAS/CUTLASS ("...gemm...",
# "...gemv..." for matrix-vector, "nvjet_..." and "sm90_xmma_..." on Hopper). Everything else
# (fusions of elementwise ops, reductions, concatenates, copies, sorts, memcpy) is "outside".
MATMUL_KERNEL = re.compile(r"gemm|gemv|cublas|cutlass|matmul|dot|nvjet|xmma", re.IGNORECASE)
# The XLA module of the decode loop (`engine.decode`): the share is of decoding, not pre-fill.
DECODE_MODULE = "jit_decode"


@contextlib.contextmanager
def maybe_profile(directory: Path | None) -> Iterator[None]:
    """Trace the enclosed work into `directory` when it is set; do nothing otherwise."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(directory)):
        yield
    print(f"profile written to {directory} (view: tensorboard --logdir {directory}, or xprof)", file=sys.stderr)


def read_trace(directory: Path) -> dict[str, Any]:
    """The newest `*.trace.json.gz` (Chrome/perfetto JSON) that `jax.profiler.trace` wrote under `directory`."""
    traces = sorted(directory.glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no *.trace.json.gz under {directory}")
    with gzip.open(traces[-1]) as f:
        return json.load(f)


def gpu_kernels(trace: dict[str, Any], module: str = DECODE_MODULE) -> list[dict[str, Any]]:
    """The GPU kernels of `trace`: the complete ("ph": "X") events of the processes named
    "/device:GPU:N"; only those of XLA module `module` where any event names its module
    (`args.hlo_module`), else all of them."""
    gpus = {e["pid"] for e in trace["traceEvents"] if e.get("ph") == "M" and e.get("name") == "process_name"
            and e.get("args", {}).get("name", "").startswith("/device:GPU:")}
    kernels = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("pid") in gpus]
    if any(e.get("args", {}).get("hlo_module") == module for e in kernels):
        kernels = [e for e in kernels if e.get("args", {}).get("hlo_module") == module]
    return kernels


def gpu_kernel_us(trace: dict[str, Any], module: str = DECODE_MODULE) -> tuple[float, float]:
    """`(all, matrix products)`: microseconds of `gpu_kernels(trace, module)`."""
    kernels = gpu_kernels(trace, module)
    return sum(e["dur"] for e in kernels), sum(e["dur"] for e in kernels if MATMUL_KERNEL.search(e["name"]))


def gpu_idle_share(trace: dict[str, Any], module: str = DECODE_MODULE) -> float | None:
    """The share of the time from the first of `gpu_kernels(trace, module)` to the end of the
    last in which none of them runs (overlapping kernels count once); None without kernels.

    Between decode steps the GPU waits for the host: XLA runs `lax.while_loop` by copying the
    loop's condition to the host after every step and launching the next step from there
    (the 2026-12-04 H200 trace of 16 tokens: a `MemcpyD2H`, then 2.4-3.2 ms without kernels,
    before each of its 15 later steps). The profiler slows the host, so an unprofiled run
    idles less than this."""
    kernels = sorted(gpu_kernels(trace, module), key=lambda e: e["ts"])
    if not kernels:
        return None
    busy, end = 0.0, kernels[0]["ts"]
    for e in kernels:
        start, stop = max(e["ts"], end), e["ts"] + e["dur"]
        busy += max(0.0, stop - start)
        end = max(end, stop)
    span = end - kernels[0]["ts"]
    return 1 - busy / span if span > 0 else 0.0


def non_matmul_share(trace: dict[str, Any]) -> float | None:
    """The share of the decode's GPU kernel time outside matrix products; None where the trace
    holds no GPU kernels (a CPU run)."""
    total, matmul = gpu_kernel_us(trace)
    return None if total == 0 else 1 - matmul / total
