"""The real SmolLM2-135M-Instruct (bundled GGUF, dequantised, float32) against Transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coreinfer_jax import Generator, Stability
from test_sparse import torch_masked_generate

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "Water boils at a temperature of",
    "The three primary colors are",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def gen(smollm2_checkpoint) -> Generator:
    return Generator.load(smollm2_checkpoint)


def test_greedy_continuations_match_transformers(gen: Generator, smollm2_torch_model) -> None:
    ids = gen.encode(PROMPTS)
    ours = gen.generate_ids(ids, max_new_tokens=32, stop_at_eos=False, return_logits=True)
    for b, p in enumerate(ids):
        with torch.no_grad():
            x = torch.tensor([p])
            want = smollm2_torch_model.generate(x, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                                pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
            last = smollm2_torch_model(x).logits[0, -1].numpy()
        assert ours.tokens[b] == want, PROMPTS[b]
        assert np.abs(ours.logits[b, 0] - last).max() < 1e-3


def test_sparse_decoding_matches_the_masking_restatement(gen: Generator, smollm2_torch_model) -> None:
    """Stability-guided decoding on the real model, against PyTorch masking with NumPy selection.

    Activations agree to ~1e-5, so a neuron tied at a token's cut-off can in rare cases land
    on the other side; the core sets must agree almost entirely, and the tokens exactly.
    """
    method = Stability(keep=0.6).validate(gen.cfg)
    ids = gen.encode(PROMPTS[:2])
    ours = gen.generate_ids(ids, max_new_tokens=16, method=method, stop_at_eos=False)
    for b, p in enumerate(ids):
        want, core = torch_masked_generate(smollm2_torch_model, "llama", p, method, 16)
        for j, layer in enumerate(method.sparse_layers()):
            overlap = len(set(ours.core_neurons[b, j].tolist()) & set(core[layer].tolist()))
            assert overlap >= 0.99 * len(core[layer]), f"layer {layer}: {overlap}/{len(core[layer])}"
        assert ours.tokens[b] == want, PROMPTS[b]
