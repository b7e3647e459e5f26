"""The deviceless sm_90 compile check: at Llama-3-8B widths (4 layers, so it compiles in
seconds), no method's decode loop writes a weight-sized buffer at every step, and what the
loop reads is the method's counted bytes. Needs a CUDA plugin (the `cuda12` or `cuda13` extra:
XLA's GPU compiler), no GPU."""

from __future__ import annotations

import jax
import pytest

from coreinfer_jax.models import forward, products
from coreinfer_jax.sparse import gather
from coreinfer_jax.sparse.stability import Stability
from coreinfer_jax.tools import gpu_compile
from coreinfer_jax.tools.hlo_reading import loop_kernels, loop_writes
from coreinfer_jax.tools.shapes import model_config, random_params


def compiles(test):
    """A test that runs XLA's GPU compiler: seconds a program, and only with a CUDA plugin."""
    reason = gpu_compile.unavailable()
    return pytest.mark.slow(pytest.mark.skipif(reason is not None, reason=str(reason))(test))


@pytest.mark.parametrize("plugins", [("jax_plugins.xla_cuda12",), ("jax_plugins.xla_cuda13",), ()])
def test_either_cuda_plugin_brings_the_compiler(plugins, monkeypatch) -> None:
    """The GPU image runs CUDA 13's plugin, CI installs CUDA 12's: either compiles for sm_90."""
    real = gpu_compile.importlib.util.find_spec

    def find_spec(name, *args):
        if name in gpu_compile.CUDA_PLUGINS:
            return object() if name in plugins else None
        return real(name, *args)

    monkeypatch.setattr(gpu_compile.importlib.util, "find_spec", find_spec)
    if plugins:
        assert gpu_compile.unavailable() is None
    else:
        assert "no CUDA plugin is installed (pip install -e '.[cuda12]')" in gpu_compile.unavailable()
        with pytest.raises(gpu_compile.GpuCompileError, match="no CUDA plugin"):
            gpu_compile.replicated.__wrapped__()


def test_without_any_cuda_plugin_the_reason_is_given_not_an_import_error(monkeypatch) -> None:
    """Installed without the `cuda12`/`cuda13` extras there is no `jax_plugins` package at all,
    and Python's `find_spec` of a module inside a missing package raises instead of answering."""
    monkeypatch.setattr(gpu_compile, "CUDA_PLUGINS", ("coreinfer_no_such_package.xla_cuda12",))
    assert "no CUDA plugin is installed" in gpu_compile.unavailable()


@pytest.fixture(scope="module")
def llama8b():
    cfg, _ = model_config("llama-3-8b", num_layers=4)
    return cfg, jax.eval_shape(lambda: random_params(cfg, "bfloat16"))


@compiles
@pytest.mark.parametrize("label", ["dense", "stability keep 0.4", "stability keep 0.4 shared", "similarity keep 0.4",
                                   "hybrid default", "stability keep 0.4 compensated"])
def test_decode_loop_copies_no_weights_and_reads_the_counted_bytes(label, llama8b) -> None:
    cfg, params = llama8b
    compiled = gpu_compile.compile_method(cfg, params, gpu_compile.methods(cfg)[label], label=label)
    assert "__triton" in compiled.decode  # compiled by the GPU backend: its products are Triton fusions
    assert compiled.prefill is not None and "__triton" in compiled.prefill
    assert loop_writes(compiled.decode) == []
    # One row's sort is six launches, 56 us, on an H200: the hybrid's per-token choice selects
    # by radix instead (`sparse.radix_select`).
    assert not [op for op in loop_kernels(compiled.decode) if op.endswith("sort")]
    assert abs(compiled.step_bytes / compiled.counted_bytes - 1) <= gpu_compile.BYTES_TOLERANCE
    if label != "dense":
        assert compiled.gather is not None


@compiles
def test_the_check_finds_the_copies_the_h200_run_found(llama8b, monkeypatch) -> None:
    """The gather and the norm as they were on the H200 (before the fused layout; norms
    finished before their products): XLA concatenates gate|up and pads the down rows
    (5734 -> 5760) in the loop of each sparse layer, as the H200 profile showed."""
    cfg, params = llama8b
    jax.clear_caches()
    monkeypatch.setattr(gather, "fused_layout", gather.gather_core_weights)
    monkeypatch.setattr(forward, "norm_for_products", lambda p, x, cfg: (forward.norm(p, x, cfg), None))
    compiled = gpu_compile.compile_method(cfg, params, Stability(keep=0.4), prefill=False)
    jax.clear_caches()
    found = {(w.op.split()[-1], w.shape) for w in loop_writes(compiled.decode)}
    n_sparse = len(Stability(keep=0.4).validate(cfg).sparse_layers())
    assert n_sparse >= 1
    assert ("concatenate", "bf16[11468,4096]") in found
    assert ("pad", "bf16[5760,4096]") in found
    assert len(loop_writes(compiled.decode)) == 2 * n_sparse


# Kernels a layer adds to a decode step at 8B widths, bf16, batch 1 (2026-12-05, JAX 0.10.2; the same
# under 0.11.2 with either CUDA plugin, 2026-12-06):
# 7 products for dense (QKV, scores, values, output, gate, up, down; the sparse methods read
# gate|up with one), the softmax, the query's RoPE, two cache writes (the new key's RoPE
# fused in), two residual adds (which also sum split-K partials), two norms of one kernel
# each (scaled after their products: `forward.norm_for_products`), and the activation. The
# hybrid adds its sketch, its per-token products and the rest's estimate, and a radix
# selection of eleven small kernels in place of one sort (six launches, 56 us on an H200);
# its FFN norm is one kernel too (the sketch and the per-token rows apply `r` after their
# reductions, `models.products`).
KERNELS_PER_LAYER = {"dense": 17, "stability keep 0.4": 16, "hybrid default": 33}


@compiles
@pytest.mark.parametrize("label", sorted(KERNELS_PER_LAYER))
def test_a_decode_layer_compiles_to_few_kernels(label) -> None:
    assert gpu_compile.kernels_per_layer(label) <= KERNELS_PER_LAYER[label]


@compiles
def test_the_sorted_choice_on_a_gpu_is_a_sort_in_the_loop(llama8b, monkeypatch) -> None:
    """The check sees a sort where there is one: the hybrid with the CPU's forms (`lax.top_k`)."""
    cfg, params = llama8b
    jax.clear_caches()
    monkeypatch.setattr(products, "FORCE", "cpu")
    compiled = gpu_compile.compile_method(cfg, params, gpu_compile.methods(cfg)["hybrid default"], prefill=False)
    jax.clear_caches()
    assert [op for op in loop_kernels(compiled.decode) if op.endswith("sort")]


@compiles
def test_the_cpu_forms_on_a_gpu_cost_kernels(monkeypatch) -> None:
    """The CPU's forms compiled for a GPU: each norm finished before its products is a
    reduction and then a multiply (two kernels more per layer), and attending to the new
    token apart from the cache makes a kernel that concatenates the scores and recomputes the
    new key inside it (the H200 profile's 30 us per layer-step), so more again."""
    jax.clear_caches()
    monkeypatch.setattr(products, "FORCE", "cpu")
    assert gpu_compile.kernels_per_layer("dense") > KERNELS_PER_LAYER["dense"] + 2
    jax.clear_caches()
