"""The Transformers baselines: its fastest documented setting (static KV cache, `forward`
under `torch.compile`) builds and decodes with Transformers as installed (on the CPU Inductor
compiles C++ for a minute, hence slow); the device it runs on; which methods get a row of the
paper's PyTorch decoding."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from coreinfer_jax import Dense, Hybrid, Stability
from coreinfer_jax.tools.shapes import model_config
from coreinfer_jax.tools.torch_baseline import TorchRunner, paper_decodes

pytest.importorskip("transformers")


@pytest.mark.slow
def test_static_cache_and_compiled_forward_decode() -> None:
    _, hf = model_config("llama-3-8b", tiny=True)
    runner = TorchRunner.static_compiled(hf, "float32", device="cpu")
    assert runner.model.generation_config.cache_implementation == "static"
    assert hasattr(runner.model.forward, "_torchdynamo_orig_callable")  # torch.compile's wrapper
    prompt = list(range(5, 52))
    runner.run(prompt, 8)  # compiles pre-fill and the decode step
    prefill_s, tokens_per_s = runner.run(prompt, 8)
    assert math.isfinite(tokens_per_s) and tokens_per_s > 0 and prefill_s > 0


@pytest.mark.parametrize("platform,cuda,expected", [("gpu", True, "cuda"), ("gpu", False, "cpu"), ("cpu", True, "cpu"),
                                                    ("cpu", False, "cpu")])
def test_transformers_runs_on_the_device_jax_runs_on(platform, cuda, expected, monkeypatch) -> None:
    import jax
    import torch

    from coreinfer_jax.tools import torch_baseline

    monkeypatch.setattr(jax, "devices", lambda: [SimpleNamespace(platform=platform)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert torch_baseline.device_beside_jax() == expected


@pytest.mark.parametrize("method,decodes", [
    (Stability(keep=0.4), True), (Stability(keep=0.4, rule="normalized_magnitude", layer_keep=(3, 5)), True),
    (Stability(keep=0.4, compensate=True), False),  # a bias the paper's code does not add
    (Stability(keep=0.4, share="batch"), False),  # one set for a batch: not the paper's per-prompt set
    (Hybrid(), False), (Dense(), False)])
def test_the_paper_row_is_for_the_methods_the_paper_decodes(method, decodes) -> None:
    assert paper_decodes(method) is decodes
