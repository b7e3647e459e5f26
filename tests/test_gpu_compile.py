"""The deviceless sm_90 compile check: at Llama-3-8B widths (4 layers, so it compiles in
seconds), no method's decode loop writes a weight-sized buffer at every step, and what the
loop reads is the method's counted bytes. Needs the `cuda12` extra (XLA's GPU compiler), no GPU."""

from __future__ import annotations

import jax
import pytest

from coreinfer_jax.sparse import gather
from coreinfer_jax.sparse.stability import Stability
from coreinfer_jax.tools import gpu_compile
from coreinfer_jax.tools.shapes import model_config, random_params

pytestmark = [pytest.mark.skipif(gpu_compile.unavailable() is not None, reason=str(gpu_compile.unavailable())),
              pytest.mark.slow]


@pytest.fixture(scope="module")
def llama8b():
    cfg, _ = model_config("llama-3-8b", num_layers=4)
    return cfg, jax.eval_shape(lambda: random_params(cfg, "bfloat16"))


@pytest.mark.parametrize("label", ["dense", "stability keep 0.4", "stability keep 0.4 shared", "similarity keep 0.4",
                                   "hybrid default", "stability keep 0.4 compensated"])
def test_decode_loop_copies_no_weights_and_reads_the_counted_bytes(label, llama8b) -> None:
    cfg, params = llama8b
    compiled = gpu_compile.compile_method(cfg, params, gpu_compile.methods(cfg)[label], label=label)
    assert "__triton" in compiled.decode  # compiled by the GPU backend: its products are Triton fusions
    assert gpu_compile.loop_writes(compiled.decode) == []
    assert abs(compiled.step_bytes / compiled.counted_bytes - 1) <= gpu_compile.BYTES_TOLERANCE
    if label != "dense":
        assert compiled.gather is not None


def test_the_check_finds_the_copies_the_h200_run_found(llama8b, monkeypatch) -> None:
    """The gather as it was before the fused layout: XLA concatenates gate|up and pads the
    down rows (5734 -> 5760) in the loop of each sparse layer, as the H200 profile showed."""
    cfg, params = llama8b
    jax.clear_caches()
    monkeypatch.setattr(gather, "fused_layout", gather.gather_core_weights)
    compiled = gpu_compile.compile_method(cfg, params, Stability(keep=0.4))
    jax.clear_caches()
    found = {(w.op.split()[-1], w.shape) for w in gpu_compile.loop_writes(compiled.decode)}
    n_sparse = len(Stability(keep=0.4).validate(cfg).sparse_layers())
    assert n_sparse >= 1
    assert ("concatenate", "bf16[11468,4096]") in found
    assert ("pad", "bf16[5760,4096]") in found
    assert len(gpu_compile.loop_writes(compiled.decode)) == 2 * n_sparse


def test_loop_read_bytes_counts_operands_and_gathered_rows() -> None:
    """By hand, on a small optimized module's text: a while body with one fusion that gathers
    rows of a [1000, 64] f32 parameter and one reduction reading a [256] vector."""
    hlo = """
%fused_g (param_0.1: f32[1000,64], param_1.1: s32[10]) -> f32[10,64] {
  %param_0.1 = f32[1000,64]{1,0} parameter(0)
  %param_1.1 = s32[10]{0} parameter(1)
  ROOT %gather.1 = f32[10,64]{1,0} gather(%param_0.1, %param_1.1), offset_dims={1}, slice_sizes={1,64}
}

%fused_r (param_0.2: f32[256]) -> f32[] {
  %param_0.2 = f32[256]{0} parameter(0)
  ROOT %reduce.1 = f32[] reduce(%param_0.2, %c), dimensions={0}
}

%body (p: (f32[1000,64], s32[10], f32[256])) -> (f32[1000,64], s32[10], f32[256]) {
  %p = (f32[1000,64], s32[10], f32[256]) parameter(0)
  %w = f32[1000,64]{1,0} get-tuple-element(%p), index=0
  %i = s32[10]{0} get-tuple-element(%p), index=1
  %v = f32[256]{0} get-tuple-element(%p), index=2
  %loop_gather_fusion = f32[10,64]{1,0} fusion(%w, %i), kind=kLoop, calls=%fused_g
  %input_reduce_fusion = f32[] fusion(%v), kind=kInput, calls=%fused_r
  ROOT %t = (f32[1000,64], s32[10], f32[256]) tuple(%w, %i, %v)
}

ENTRY %main (a: (f32[1000,64], s32[10], f32[256])) -> (f32[1000,64], s32[10], f32[256]) {
  %a = (f32[1000,64], s32[10], f32[256]) parameter(0)
  ROOT %while = (f32[1000,64], s32[10], f32[256]) while(%a), condition=%cond, body=%body
}
"""
    # 10 gathered rows of 64 floats + 10 int32 indices + the 256-float vector
    assert gpu_compile.loop_read_bytes(hlo) == 10 * 64 * 4 + 10 * 4 + 256 * 4
    assert gpu_compile.loop_writes(hlo, min_bytes=10 * 64 * 4) == [
        gpu_compile.Write("loop_gather_fusion", "fusion kLoop gather", "f32[10,64]", 2560)]
