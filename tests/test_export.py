"""A converted checkpoint rebuilt as a Transformers model (the benchmark's baseline) is the same model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convert import torch_model_from_checkpoint
from coreinfer_jax.tools.bench import markdown, run_bench
from coreinfer_jax import Dense, Stability


@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2", "opt_350m_like"])
def test_rebuilt_torch_model_equals_the_original(name, tiny_checkpoint, tiny_torch_model) -> None:
    rebuilt = torch_model_from_checkpoint(tiny_checkpoint(name))
    original = tiny_torch_model(name)
    ids = torch.tensor([[5, 17, 33, 100, 2, 9]])
    with torch.no_grad():
        # Same weights; only the attention kernel differs (SDPA vs the fixture's eager).
        np.testing.assert_allclose(rebuilt(ids).logits.numpy(), original(ids).logits.numpy(), atol=1e-5, rtol=0)


def test_bench_reports_every_row_side_by_side(tiny_checkpoint) -> None:
    report = run_bench(tiny_checkpoint("llama"), [Dense(), Stability(keep=0.5, layers=(1, 2))], new_tokens=8, reps=2,
                       prompt="The cat sat on the mat.")
    names = [r["name"] for r in report["rows"]]
    assert names == ["transformers-pytorch-eager", "jax-dense", "jax-stability-keep0.5"]
    torch_row, dense, sparse = report["rows"]
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_ms"] > 0 for r in report["rows"])
    assert dense["vs_torch"] == pytest.approx(dense["decode_tokens_per_s"] / torch_row["decode_tokens_per_s"])
    assert sparse["vs_dense"] == pytest.approx(sparse["decode_tokens_per_s"] / dense["decode_tokens_per_s"])
    assert dense["speedup_bound"] == 1.0 and sparse["speedup_bound"] > 1.0
    assert sparse["bytes_per_token"] < dense["bytes_per_token"]
    assert report["bandwidth_gb_s"] > 0
    table = markdown(report)
    assert "jax-stability-keep0.5" in table and "transformers-pytorch-eager" in table
