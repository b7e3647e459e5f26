"""The paper's PyTorch decoding (`bench`'s row beside Transformers): a Transformers model whose
sparse layers' FFN linears multiply by copies of the core neurons' rows and columns decodes
what this project's sparse decoding decodes with the same core neurons, and is put back after."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coreinfer_jax import Generator, Stability
from coreinfer_jax.tools.paper_decoding import CoreLinear, core_neuron_linears

PROMPT = [5, 17, 33, 100, 2, 9, 41, 77, 12]
NEW = 6


def torch_logits(model, new_tokens: int) -> np.ndarray:
    """Greedy `generate` from `PROMPT`: the logits of each new token, `[new_tokens, V]`."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                             return_dict_in_generate=True)
    return torch.stack(out.logits)[:, 0].numpy()


# Gated (separate gate/up; Phi-3's fused gate_up_proj; Gemma 3's GeGLU) and ReLU (OPT, fc1's bias).
@pytest.mark.parametrize("name", ["llama", "phi3", "gemma3", "opt"])
def test_paper_decoding_gives_this_projects_sparse_logits(name, tiny_checkpoint, tiny_torch_model) -> None:
    gen = Generator.load(tiny_checkpoint(name))
    method = gen.resolve(Stability(keep=0.5, layers=(1, 2)))
    ours = gen.generate_ids([PROMPT], NEW, method=method, stop_at_eos=False, return_logits=True)
    core = {layer: ids.tolist() for layer, ids in zip(method.sparse_layers(), ours.core_neurons[0])}
    model = tiny_torch_model(name)
    dense = torch_logits(model, NEW)
    with core_neuron_linears(model, core):
        paper = torch_logits(model, NEW)
    np.testing.assert_allclose(paper, ours.logits[0], atol=1e-4, rtol=0)
    assert np.abs(paper - dense).max() > 1e-2  # the core neurons alone, not the whole FFN


def test_the_model_is_put_back(tiny_torch_model) -> None:
    model = tiny_torch_model("llama")
    before = dict(model.named_modules())
    dense = torch_logits(model, 2)
    with core_neuron_linears(model, {1: [0, 5, 7]}):
        swapped = dict(model.named_modules())
        assert [n for n, m in swapped.items() if isinstance(m, CoreLinear)] == [
            "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    np.testing.assert_array_equal(torch_logits(model, 2), dense)


def test_a_layer_without_ffn_linears_is_refused(tiny_torch_model) -> None:
    model = tiny_torch_model("llama")
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"no FFN linears .* in layers \[7\]"):
        with core_neuron_linears(model, {1: [0, 1], 7: [0, 1]}):
            pass
    after = dict(model.named_modules())
    assert all(after[n] is before[n] for n in before)  # layer 1's swap undone too
