"""Published peers of CoreInfer's rule, side by side: GRIFFIN's statistic and WINA-style
down-projection weighting, against plain NumPy restatements."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from coreinfer_jax import Generator, Stability
from coreinfer_jax.sparse.rules import RULES
from test_sparse import PROMPTS, ffn_modules, flat


def numpy_griffin(acts: np.ndarray, n_keep: int) -> np.ndarray:
    """GRIFFIN, from its paper: z = a / ||a||_2 per token; s_j = ||z[:, j]||_2 over tokens; top-k."""
    z = acts / np.linalg.norm(acts, axis=1, keepdims=True)
    s = np.linalg.norm(z, axis=0)
    return np.sort(np.argsort(-s, kind="stable")[:n_keep])


def test_griffin_equals_numpy_restatement_and_ignores_padding() -> None:
    rng = np.random.default_rng(3)
    acts = rng.normal(size=(2, 9, 40)).astype(np.float32)
    acts[0, :, 5] *= 30.0  # one neuron large in every token of row 0
    lengths = [9, 6]
    valid = np.arange(9)[None, :] < np.array(lengths)[:, None]
    padded = np.where(valid[..., None], acts, 1e3)  # padding that would dominate if it counted
    got = np.asarray(RULES["griffin"](jnp.asarray(padded), jnp.asarray(valid), 12, 0.2))
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(np.sort(got[b]), numpy_griffin(acts[b, :n], 12))
    assert 5 in got[0]


@pytest.mark.parametrize("rule", ["paper", "normalized_magnitude"])
def test_down_weighting_ranks_activation_times_down_row_norm(rule, tiny_checkpoint, tiny_torch_model) -> None:
    """The core neurons of a down-weighted rule are the plain rule's on activations scaled by
    `||down_proj.weight[:, j]||`, measured here with PyTorch hooks and NumPy."""
    gen = Generator.load(tiny_checkpoint("llama"))
    model = tiny_torch_model("llama")
    layers = (0, gen.cfg.num_layers)
    weighted = Stability(keep=0.3, rule=rule, layers=layers, down_weighted=True)
    got = gen.generate_ids([PROMPTS[0]], 2, method=weighted).core_neurons[0]  # [n_sparse, n_keep]
    plain = gen.generate_ids([PROMPTS[0]], 2, method=Stability(keep=0.3, rule=rule, layers=layers)).core_neurons[0]
    acts = {}
    mods = ffn_modules(model, "llama")
    hooks = [m.register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, flat(a[0]))) for i, m in enumerate(mods)]
    with torch.no_grad():
        model(torch.tensor([PROMPTS[0]]))
    for h in hooks:
        h.remove()

    for layer in range(*layers):
        norms = np.linalg.norm(mods[layer].weight.detach().numpy(), axis=0)  # down_proj [D, F]: per column
        scaled = (acts[layer] * norms)[None]  # [1, T, F]
        want = np.asarray(RULES[rule](jnp.asarray(scaled), jnp.ones((1, scaled.shape[1]), bool),
                                      int(gen.cfg.intermediate_size * 0.3), 0.2))[0]
        assert set(got[layer].tolist()) == set(want.tolist())
    assert not np.array_equal(got, plain), "weighting should change the choice on a random model"
