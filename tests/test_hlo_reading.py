"""Reading optimized HLO text: a loop body's weight-sized writes and the bytes it reads, on a
module written by hand (no compiler needed)."""

from __future__ import annotations

from coreinfer_jax.tools.hlo_reading import Write, loop_kernels, loop_read_bytes, loop_writes


HLO = """
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


def test_loop_read_bytes_counts_operands_and_gathered_rows() -> None:
    """By hand, on a small optimized module's text: a while body with one fusion that gathers
    rows of a [1000, 64] f32 parameter and one reduction reading a [256] vector."""
    hlo = HLO
    # 10 gathered rows of 64 floats + 10 int32 indices + the 256-float vector
    assert loop_read_bytes(hlo) == 10 * 64 * 4 + 10 * 4 + 256 * 4
    assert loop_writes(hlo, min_bytes=10 * 64 * 4) == [
        Write("loop_gather_fusion", "fusion kLoop gather", "f32[10,64]", 2560)]


def test_loop_kernels_are_the_body_instructions_that_run_on_the_device() -> None:
    """The two fusions and an unfused in-place update are kernels; the parameter, the
    tuple and its elements, and the loop itself are not."""
    update = ("  %u = f32[256]{0} dynamic-update-slice(%v, %one, %zero)\n"
              "  ROOT %t = (f32[1000,64], s32[10], f32[256]) tuple(%w, %i, %u)")
    hlo = HLO.replace("  ROOT %t = (f32[1000,64], s32[10], f32[256]) tuple(%w, %i, %v)", update)
    assert loop_kernels(HLO) == ["fusion kLoop gather", "fusion kInput reduce"]
    assert loop_kernels(hlo) == ["fusion kLoop gather", "fusion kInput reduce", "dynamic-update-slice"]
    assert loop_writes(hlo, min_bytes=1) == loop_writes(HLO, min_bytes=1)  # an in-place update writes nothing new
