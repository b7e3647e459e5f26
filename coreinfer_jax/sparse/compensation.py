"""FLAP-style compensation (An et al. 2024, "Fluctuation-based adaptive structured pruning"):
a neuron that decode does not compute contributes its prompt mean instead of zero.

In pre-fill, per sparse layer and sequence, the mean over the prompt's real tokens of every
neuron's down-projection input `m [F]`; the neurons left out of the core then add a constant
`bias = sum_{j not core} m[j] W_down[j]` `[D]` to every decode step's FFN output (folded into
`b_down`, so the static methods' decode is unchanged). A token-adaptive method (`hybrid`) that
computes some of those neurons at a step subtracts their means again: per token the FFN is
`sum_{j chosen} a[j] W_down[j] + sum_{j not chosen} m[j] W_down[j]`.
"""

from __future__ import annotations

import jax.numpy as jnp

from coreinfer_jax.models.params import Params


def prompt_means(activation: jnp.ndarray, valid: jnp.ndarray, ffn: Params) -> jnp.ndarray:
    """Each neuron's mean down-projection input `[B, F]` over the `valid` `[B, T]` tokens, from the
    activation pre-fill ranks by `[B, T, F]` (OPT's is fc1's output before ReLU, which
    `Stability.validate` checks is the activation)."""
    hidden = activation if "w_gate" in ffn else jnp.maximum(activation, 0)
    hidden = hidden.astype(jnp.float32) * valid[..., None]  # [B, T, F]
    return hidden.sum(1) / jnp.maximum(valid.sum(1), 1)[:, None].astype(jnp.float32)  # [B, F]


def dropped_bias(means: jnp.ndarray, core: jnp.ndarray, w_down: jnp.ndarray) -> jnp.ndarray:
    """`sum_{j not in core} means[j] W_down[j]` `[B, D]` for core ids `core` `[B, K]`."""
    rows = jnp.arange(means.shape[0])[:, None]
    dropped = means.at[rows, core].set(0.0)  # [B, F]
    return (dropped @ w_down.astype(jnp.float32)).astype(w_down.dtype)  # [B, D]


def compensate(activation: jnp.ndarray, valid: jnp.ndarray, core: jnp.ndarray, ffn: Params) -> dict[str, jnp.ndarray]:
    """What pre-fill keeps of one sparse layer: core ids `[B, K]`, the dropped neurons' output
    `bias` `[B, D]` and the prompt `means` `[B, F]`."""
    means = prompt_means(activation, valid, ffn)
    return {"ids": core, "bias": dropped_bias(means, core, ffn["w_down"]), "means": means}


def with_bias(ffn: Params, bias: jnp.ndarray) -> Params:
    """A gathered FFN whose output also adds `bias` `[B, D]` per row (`b_down` becomes `[B, 1, D]`)."""
    return dict(ffn, b_down=ffn.get("b_down", 0) + bias[:, None, :])
