"""The Transformers baseline in its fastest documented setting (static KV cache, `forward`
under `torch.compile`): it builds and decodes with Transformers as installed. On the CPU
Inductor compiles C++ for a minute, hence slow."""

from __future__ import annotations

import math

import pytest

from coreinfer_jax.tools.shapes import model_config
from coreinfer_jax.tools.torch_baseline import TorchRunner

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
