"""Sparse decoding: gathered weights, faithfulness to a PyTorch masking restatement, bad input."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from coreinfer_jax import Generator, Stability, default_layer_range, make_method
from coreinfer_jax.sparse.gather import gather_core_weights
from method_reference import reference_select

PROMPTS = [[5, 17, 33, 100, 2, 9, 250, 41, 7, 61, 3, 90, 14, 15], [7, 8, 9, 10, 11]]


def ffn_modules(model: torch.nn.Module, family: str) -> list[torch.nn.Module]:
    """The module whose output (OPT: fc1, before ReLU) or input (Llama: down_proj) CoreInfer reads."""
    if family == "opt":
        return [layer.fc1 for layer in model.model.decoder.layers]
    return [layer.mlp.down_proj for layer in model.model.layers]


def flat(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1, t.shape[-1]).numpy().copy()


def torch_masked_generate(model: torch.nn.Module, family: str, ids: list[int], method: Stability,
                          n: int) -> tuple[list[int], dict[int, np.ndarray]]:
    """The paper's rule restated in PyTorch: a dense pre-fill records activations, NumPy picks
    the core neurons, and every decode step zeroes the other neurons of each sparse layer."""
    mods = ffn_modules(model, family)
    acts: dict[int, np.ndarray] = {}
    record = []
    for i in method.sparse_layers():
        # OPT flattens tokens to [B*T, D] around its FFN; Llama keeps [B, T, F]. B is 1 here.
        if family == "opt":
            hook = mods[i].register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, flat(o)))
        else:
            hook = mods[i].register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, flat(a[0])))
        record.append(hook)
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in record:
        h.remove()
    core = {i: reference_select(acts[i], method.keep, method.token_keep)[0] for i in method.sparse_layers()}

    masks = {}
    for i, kept in core.items():
        mask = torch.zeros(mods[i].out_features if family == "opt" else mods[i].in_features)
        mask[torch.as_tensor(kept)] = 1.0
        masks[i] = mask
    return generate_with_decode_masks(model, family, ids, list(masks), lambda i, a: masks[i], n), core


def generate_with_decode_masks(model: torch.nn.Module, family: str, ids: list[int], layers: list[int],
                               mask: Callable[[int, torch.Tensor], torch.Tensor], n: int,
                               fill: dict[int, torch.Tensor] | None = None) -> list[int]:
    """`n` greedy tokens where every decode step multiplies the FFN activation of each of `layers`
    (OPT: fc1's output; Llama: down_proj's input) by `mask(layer, activation [1, 1, F])` `[F]`;
    with `fill`, a masked-out neuron takes the value `fill[layer]` `[F]` instead of 0 (OPT: a
    non-negative value passes ReLU unchanged)."""
    mods = ffn_modules(model, family)

    def only_decode(t: torch.Tensor) -> bool:
        return t.numel() == t.shape[-1]  # one token: a decode step, not the pre-fill

    def apply(i: int, a: torch.Tensor) -> torch.Tensor:
        m = mask(i, a.reshape(1, 1, -1))
        return a * m if fill is None else a * m + (1 - m) * fill[i]

    hooks = []
    for i in layers:
        if family == "opt":
            # Zeroing fc1's output (bias included) removes the neuron; ReLU(0) = 0.
            hooks.append(mods[i].register_forward_hook(
                lambda m, a, o, i=i: apply(i, o) if only_decode(o) else o))
        else:
            hooks.append(mods[i].register_forward_pre_hook(
                lambda m, a, i=i: (apply(i, a[0]),) if only_decode(a[0]) else a))
    return greedy_with_hooks(model, ids, n, hooks)


def greedy_with_hooks(model: torch.nn.Module, ids: list[int], n: int, hooks: list) -> list[int]:
    """`n` greedy tokens after `ids` with the forward `hooks` in place, removed afterwards."""
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
    finally:
        for h in hooks:
            h.remove()
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", ["llama", "qwen2", "opt", "opt_350m_like"])
@pytest.mark.parametrize("keep", [0.4, 0.7])
def test_sparse_generation_matches_masking_restatement(name, keep, tiny_checkpoint, tiny_torch_model) -> None:
    gen = Generator.load(tiny_checkpoint(name))
    model = tiny_torch_model(name)
    method = Stability(keep=keep, token_keep=0.2, layers=(1, gen.cfg.num_layers)).validate(gen.cfg)
    ours = gen.generate_ids(PROMPTS, max_new_tokens=20, method=method, stop_at_eos=False)
    dense = gen.generate_ids(PROMPTS, max_new_tokens=20, stop_at_eos=False)
    assert ours.tokens != dense.tokens, "sparsity should change something on a random model"
    for b, ids in enumerate(PROMPTS):
        want_tokens, core = torch_masked_generate(model, gen.cfg.family, ids, method, 20)
        for j, layer in enumerate(method.sparse_layers()):
            assert set(ours.core_neurons[b, j].tolist()) == set(core[layer].tolist())
        assert ours.tokens[b] == want_tokens


def test_gathered_weights_are_rows_and_columns_of_the_full_weights(tiny_checkpoint, tiny_torch_model) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    model = tiny_torch_model("llama")
    ffn = gen.params["layers"][1]["ffn"]
    idx = jnp.asarray([[3, 0, 7], [100, 5, 64]], jnp.int32)
    got = gather_core_weights(ffn, idx)
    mlp = model.model.layers[1].mlp
    for b in range(2):
        rows = np.asarray(idx[b])
        np.testing.assert_array_equal(got["w_gate"][b], mlp.gate_proj.weight.detach().numpy()[rows])
        np.testing.assert_array_equal(got["w_up"][b], mlp.up_proj.weight.detach().numpy()[rows])
        np.testing.assert_array_equal(got["w_down"][b], mlp.down_proj.weight.detach().numpy()[:, rows].T)


def test_default_layer_range_scales_the_papers() -> None:
    assert default_layer_range(32) == (6, 27)  # the paper: strictly between 5 and 27
    assert default_layer_range(30) == (6, 25)  # SmolLM2-135M: layers 6..24


@pytest.mark.parametrize("kwargs,words", [
    ({"keep": 0.0}, "keep must be in (0, 1]"),
    ({"keep": 1.5}, "keep must be in (0, 1]"),
    ({"token_keep": -0.1}, "token_keep must be in (0, 1]"),
    ({"token_keep": 2.0}, "token_keep must be in (0, 1]"),
])
def test_bad_fractions_are_rejected(kwargs, words) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("]", r"\]")):
        Stability(**kwargs)


def test_bad_layer_range_and_method_name(tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    n = gen.cfg.num_layers
    for layers in [(0, n + 1), (-1, 1)]:
        with pytest.raises(ValueError, match="outside the model"):
            gen.generate_ids([[1, 2, 3]], 4, method=Stability(layers=layers))
    for layers in [(2, 2), (2, 1)]:  # empty, not outside: its own message
        with pytest.raises(ValueError, match="is empty: END must be greater than START"):
            gen.generate_ids([[1, 2, 3]], 4, method=Stability(layers=layers))
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        make_method("magic")
