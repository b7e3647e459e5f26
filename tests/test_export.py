"""The benchmark: its Transformers baseline is the same model, its report follows from its timings and bytes."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import run_main
from convert import torch_model_from_checkpoint
from coreinfer_jax import Dense, Generator, Stability
from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.tools import bench, cli
from coreinfer_jax.tools.bench import markdown, run_bench


@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2", "opt_350m_like"])
def test_rebuilt_torch_model_equals_the_original(name, tiny_checkpoint, tiny_torch_model) -> None:
    rebuilt = torch_model_from_checkpoint(tiny_checkpoint(name))
    original = tiny_torch_model(name)
    ids = torch.tensor([[5, 17, 33, 100, 2, 9]])
    with torch.no_grad():
        # Same weights; only the attention kernel differs (SDPA vs the fixture's eager).
        np.testing.assert_allclose(rebuilt(ids).logits.numpy(), original(ids).logits.numpy(), atol=1e-5, rtol=0)


def test_bench_runs_every_row_side_by_side(tiny_checkpoint) -> None:
    report = run_bench(tiny_checkpoint("llama"), [Dense(), Stability(keep=0.5, layers=(1, 2))], new_tokens=8, reps=2,
                       prompt="The cat sat on the mat.")
    assert [r["name"] for r in report["rows"]] == ["transformers-pytorch-eager", "jax-dense", "jax-stability-keep0.5",
                                                   "transformers-pytorch-eager-paper-stability-keep0.5"]
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_ms"] > 0 for r in report["rows"])
    table = markdown(report)
    assert "jax-stability-keep0.5" in table and "transformers-pytorch-eager" in table
    assert "jax-stability-keep0.5 decodes " in table and \
        "as fast as the paper's PyTorch code on the same core neurons (transformers-pytorch-eager-paper-" in table


def test_bench_arithmetic_from_known_timings(tiny_checkpoint, monkeypatch) -> None:
    """Each runner returns a warm-up outlier, then three samples; the report's medians, ratios
    and bounds follow from those and from the tiny Llama's bytes (tests/test_roofline.py)."""
    timings = {  # (pre-fill s, decode tok/s): warm-up, then the repetitions
        "torch": iter([(9.0, 1e4), (0.5, 10.0), (0.9, 40.0), (0.6, 20.0)]),
        "dense": iter([(9.0, 1e4), (0.1, 40.0), (0.5, 90.0), (0.2, 50.0)]),
        # After the warm-up, the generation whose core neurons the paper's row decodes with.
        "stability": iter([(9.0, 1e4), (1.0, 1.0), (0.4, 100.0), (0.05, 70.0), (0.1, 75.0)]),
        "paper": iter([(9.0, 1e4), (0.3, 30.0), (0.7, 25.0), (0.2, 10.0)]),
    }  # medians, not means: 0.6 s and 20 tok/s, 0.2 s and 50 tok/s, 0.1 s and 75 tok/s, 0.3 s and 25 tok/s
    core = np.arange(128)[::-1].reshape(1, 1, 128)  # [B, n_sparse, n]: the first 64 are layer 1's
    handed = []

    class FakeTorch:
        def __init__(self, timing: str = "torch"):
            self.timing = timing

        @classmethod
        def from_checkpoint(cls, *args) -> FakeTorch:
            return cls()

        def decoding_core_neurons(self, core) -> FakeTorch:
            handed.append(core)
            return FakeTorch("paper")

        def peak_memory(self) -> tuple[int, str]:
            return 1, "process max RSS"

        def run(self, prompt_ids, new_tokens):
            return next(timings[self.timing])

    def fake_generate(self, prompts, new_tokens, method, **kwargs):
        prefill_s, tps = next(timings[method.name])
        return SimpleNamespace(prefill_s=prefill_s, decode_tokens_per_s=tps, core_neurons=core)

    bandwidths = iter([4e9, 6e9, 5e9, 1e9, 12e9, 5.5e9, 4.5e9, 3e9, 7e9, 5e9, 2e9, 8e9])  # median 5e9 (mean 5.25e9)
    monkeypatch.setattr(bench, "TorchRunner", FakeTorch)
    monkeypatch.setattr(Generator, "generate_ids", fake_generate)
    monkeypatch.setattr(bench, "bandwidth_probe", lambda: lambda: next(bandwidths))
    report = run_bench(tiny_checkpoint("llama"), [Dense(), Stability(keep=0.5, layers=(1, 2))], new_tokens=8, reps=3,
                       prompt="The cat sat on the mat.")
    assert report["prompt_tokens"] < 16 and report["kv_slots_read"] == 64  # a 16-token bucket + 8 -> 64 slots
    torch_row, dense, sparse, paper = report["rows"]
    assert paper["name"] == "transformers-pytorch-eager-paper-stability-keep0.5"
    assert handed == [{1: list(range(127, 63, -1))}]  # layer 1's 64 core neurons, in the order given
    # Weights 94592 (dense) and 94592 - 12288 (layer 1 at half) float32 elements, 64 KV slots of 512 bytes;
    # a 128-neuron FFN is gathered without padding rows, so the paper's row reads what the JAX row does.
    dense_bytes, sparse_bytes = 94592 * 4 + 64 * 512, (94592 - 12288) * 4 + 64 * 512
    assert [r["bytes_per_token"] for r in report["rows"]] == [dense_bytes, dense_bytes, sparse_bytes, sparse_bytes]
    assert [r["decode_tokens_per_s"] for r in report["rows"]] == [20.0, 50.0, 75.0, 25.0]
    assert [r["prefill_ms"] for r in report["rows"]] == pytest.approx([600.0, 200.0, 100.0, 300.0])
    assert report["bandwidth_gb_s"] == 5.0
    assert sparse["vs_paper"] == pytest.approx(3.0) and sparse["paper_row"] == paper["name"]
    assert paper["vs_torch"] == pytest.approx(1.25)
    assert dense["vs_paper"] is None and paper["vs_dense"] is None
    assert "jax-stability-keep0.5 decodes 3.00x as fast as the paper's PyTorch code" in markdown(report)
    assert (dense["vs_torch"], sparse["vs_torch"], sparse["vs_dense"]) == pytest.approx((2.5, 3.75, 1.5))
    assert dense["bound_tokens_per_s"] == pytest.approx(5e9 / dense_bytes)
    assert sparse["fraction_of_bound"] == pytest.approx(75.0 * sparse_bytes / 5e9)
    assert sparse["speedup_bound"] == pytest.approx(dense_bytes / sparse_bytes)
    assert sparse["fraction_of_speedup_bound"] == pytest.approx(1.5 * sparse_bytes / dense_bytes)
    assert torch_row["vs_dense"] is None and dense["vs_dense"] == 1.0


@pytest.mark.parametrize("kwargs,message", [
    (dict(reps=0), "--reps must be >= 1, got 0"),
    (dict(new_tokens=1), "--new-tokens must be >= 2"),
    (dict(methods=[Dense(), Stability(keep=0.5), Stability(keep=0.5)]), "row jax-stability-keep0.5 is given twice"),
])
def test_bench_refuses_settings_it_cannot_report(kwargs, message, tiny_checkpoint) -> None:
    args = dict(methods=[Dense()], new_tokens=8, reps=2, torch_baseline=False)
    with pytest.raises(CoreInferError, match=message):
        run_bench(tiny_checkpoint("llama"), **{**args, **kwargs})


@pytest.mark.parametrize("flags,preallocate", [((), "false"), (("--no-torch",), None)])
def test_a_bench_with_transformers_leaves_it_gpu_memory(flags, preallocate, monkeypatch, tiny_checkpoint) -> None:
    # On a GPU, JAX would take most of the device when its backend starts, before Transformers loads.
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    monkeypatch.setattr(bench, "run_bench", lambda *args, **kwargs: {})
    done = run_main(cli.main, "bench", "--checkpoint", tiny_checkpoint("llama"), "--json", *flags)
    assert done.returncode == 0, done.stderr
    assert os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE") == preallocate
