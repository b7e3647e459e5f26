"""The deviceless sm_90 compile check: at Llama-3-8B widths (4 layers, so it compiles in
seconds), no method's decode loop writes a weight-sized buffer at every step, and what the
loop reads is the method's counted bytes. Needs the `cuda12` extra (XLA's GPU compiler), no GPU."""

from __future__ import annotations

import jax
import pytest

from coreinfer_jax.sparse import gather
from coreinfer_jax.sparse.stability import Stability
from coreinfer_jax.tools import gpu_compile
from coreinfer_jax.tools.hlo_reading import loop_writes
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
    assert loop_writes(compiled.decode) == []
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
    found = {(w.op.split()[-1], w.shape) for w in loop_writes(compiled.decode)}
    n_sparse = len(Stability(keep=0.4).validate(cfg).sparse_layers())
    assert n_sparse >= 1
    assert ("concatenate", "bf16[11468,4096]") in found
    assert ("pad", "bf16[5760,4096]") in found
    assert len(loop_writes(compiled.decode)) == 2 * n_sparse
