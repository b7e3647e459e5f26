"""The share of GPU kernel time outside matrix products and the share of the decode's time
the GPU idles, read from perfetto JSON traces: synthetic traces whose shares are computed by
hand, and the 2026-12-04 H200 traces against the totals their README reports."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from coreinfer_jax.tools.profiling import gpu_idle_share, gpu_kernel_us, non_matmul_share, read_trace

H200 = Path(__file__).resolve().parents[2] / "shared" / "gpu" / "h200-2026-12-04"


def meta(pid: int, name: str) -> dict:
    return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}


def kernel(name: str, dur: float, module: str | None = "jit_decode", pid: int = 1, ph: str = "X") -> dict:
    args = {} if module is None else {"hlo_module": module}
    return {"ph": ph, "pid": pid, "tid": 14, "ts": 0.0, "dur": dur, "name": name, "args": args}


DECODE = [  # GPU kernels of the decode module: 65 us of products out of 84
    kernel("gemm_fusion_dot_420", 30), kernel("void gemv2T_kernel_val<int, int, __nv_bfloat16>", 15),
    kernel("nvjet_tst_128x64_64x8_1x1_v_bz_TNT", 20), kernel("input_concatenate_fusion_60", 10),
    kernel("loop_add_fusion_62", 5), kernel("MemcpyD2D", 4)]
OTHERS = [
    kernel("gemm_fusion_dot_577", 1000, module="jit_prefill"),  # pre-fill: not decode
    kernel("dot", 500, pid=2),  # a host thread, not a GPU
    kernel("input_reduce_fusion_67", 700, ph="i"),  # not a complete event
]


def trace_of(events: list[dict]) -> dict:
    return {"displayTimeUnit": "ns", "traceEvents": [meta(1, "/device:GPU:0"), meta(2, "/host:CPU"), *events]}


def test_share_of_a_synthetic_trace_by_hand(tmp_path) -> None:
    run = tmp_path / "plugins" / "profile" / "2026_12_04"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump(trace_of(DECODE + OTHERS), f)
    trace = read_trace(tmp_path)
    assert gpu_kernel_us(trace) == (84, 65)
    assert non_matmul_share(trace) == pytest.approx(19 / 84)


def test_without_module_names_every_gpu_kernel_counts() -> None:
    untagged = [dict(e, args={}) for e in DECODE + OTHERS[:1]]  # pre-fill's 1000 us product now counts
    assert gpu_kernel_us(trace_of(untagged + OTHERS[1:])) == (1084, 1065)
    assert non_matmul_share(trace_of(untagged)) == pytest.approx(19 / 1084)


def test_idle_share_of_a_synthetic_trace_by_hand() -> None:
    """Kernels at 0-30, 30-45, 50-70, 65-75 (overlapping the one before) and 100-110 us, and
    pre-fill's kernel in the gap: busy 30 + 15 + 20 + 5 + 10 = 80 of 110 us."""
    at = [(0, 30), (30, 15), (50, 20), (65, 10), (100, 10)]
    events = [dict(kernel(f"k{i}", dur), ts=float(ts)) for i, (ts, dur) in enumerate(at)]
    events.append(dict(kernel("gemm_fusion_dot_577", 20, module="jit_prefill"), ts=78.0))
    assert gpu_idle_share(trace_of(events[::-1])) == pytest.approx(30 / 110)
    assert gpu_idle_share(trace_of(events[:2])) == 0.0


def test_a_cpu_trace_has_no_share(tmp_path) -> None:
    assert non_matmul_share(trace_of([kernel("dot", 500, pid=2)])) is None
    assert gpu_idle_share(trace_of([kernel("dot", 500, pid=2)])) is None
    with pytest.raises(FileNotFoundError, match="no .*trace.json.gz"):
        read_trace(tmp_path)


@pytest.mark.parametrize("name,total_ms,matmul_ms", [("dense", 106.7, 66.3), ("stability-keep0.4", 124.5, 52.6)])
def test_the_h200_traces_give_their_readmes_totals(name, total_ms, matmul_ms) -> None:
    """The README summed every GPU kernel of the trace (pre-fill included): with the module
    filter off (a module no event names), the same totals."""
    path = H200 / f"{name}.trace.json.gz"
    if not path.exists():
        pytest.skip(f"{path} is not in this checkout's shared/")
    with gzip.open(path) as f:
        trace = json.load(f)
    total, matmul = gpu_kernel_us(trace, module="no such module")
    assert (round(total / 1e3, 1), round(matmul / 1e3, 1)) == (total_ms, matmul_ms)
    assert 0 < non_matmul_share(trace) < 1


def test_the_h200_dense_decode_idles_after_each_steps_copy_to_the_host() -> None:
    """In the H200 dense trace (16 tokens), each decode step ends with a `MemcpyD2H` (the
    loop's condition) and the 15 before the last are followed by milliseconds without kernels:
    the idle share is those gaps (and the few microseconds between other kernels) over the
    decode's span."""
    path = H200 / "dense.trace.json.gz"
    if not path.exists():
        pytest.skip(f"{path} is not in this checkout's shared/")
    with gzip.open(path) as f:
        trace = json.load(f)
    kernels = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X"
                      and e.get("args", {}).get("hlo_module") == "jit_decode" and "kernel_details" in e["args"]
                      or e.get("name") == "MemcpyD2H" and e.get("args", {}).get("hlo_module") == "jit_decode"),
                     key=lambda e: e["ts"])
    after_copy = [b["ts"] - a["ts"] - a["dur"] for a, b in zip(kernels, kernels[1:]) if a["name"] == "MemcpyD2H"]
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    assert len([g for g in after_copy if g > 1000]) == 15  # a millisecond or more before each next step
    assert gpu_idle_share(trace) == pytest.approx(sum(g for g in after_copy if g > 0) / span, abs=0.01)
