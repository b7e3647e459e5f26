"""Core-neuron selection rules: which `n_keep` FFN neurons a prompt keeps in one sparse layer.

Every rule is a pure function `(activations [B, T, F], valid [B, T], n_keep, token_keep) ->
int32 [B, n_keep]` with static shapes: padding tokens never count, ties are taken in index
order (`lax.top_k`), and the result always has `n_keep` entries. `n_keep` is static, so a
per-layer budget (a different count per layer) is one compile per distinct count.

- `paper`: CoreInfer's stability-guided rule (`selection.select_core_neurons`), unchanged.
  Each token votes for its largest *signed* activations. Right for ReLU models (OPT), where an
  unimportant neuron is exactly zero and every large activation is positive.
- `magnitude`: the paper's counting, but each token votes for its largest `|activation|`. In
  gated models (`act(gate) * up`: Llama, Qwen, SmolLM2) activations are signed and a large
  negative one moves the residual stream as much as a large positive one; the paper's rule
  never votes for it.
- `normalized_magnitude`: no vote threshold at all: each neuron's share of each token's total
  `|activation|`, summed over the prompt. Normalising per token gives every token the same
  weight: otherwise a few tokens with outsized activations (the first token of a sequence
  typically has them) would choose the neurons for the whole prompt.
- `griffin`: GRIFFIN's statistic (per-token L2-normalised activations, L2 norm over tokens),
  the closest published per-prompt selection, for side-by-side comparison.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from coreinfer_jax.errors import MethodError
from coreinfer_jax.sparse.selection import stability_counts

Rule = Callable[[jnp.ndarray, jnp.ndarray, int, float], jnp.ndarray]


def paper(activations: jnp.ndarray, valid: jnp.ndarray, n_keep: int, token_keep: float) -> jnp.ndarray:
    """The paper's stability-guided rule (`select_core_neurons`), for any `n_keep`.

    Ranks neurons by the number of tokens that have them among their
    `floor(token_keep * P / T)` largest signed activations (P: positives over the T tokens).
    """
    with jax.named_scope("rule_paper"):
        _, idx = lax.top_k(stability_counts(activations, valid, token_keep), n_keep)  # [B, n_keep]
        return idx.astype(jnp.int32)


def magnitude(activations: jnp.ndarray, valid: jnp.ndarray, n_keep: int, token_keep: float) -> jnp.ndarray:
    """The paper's counting with each token voting for its largest `|activation|`.

    Per token the `limit = floor(token_keep * P / T)` neurons of largest magnitude (P counts
    the *signed* positives, so each token votes for as many neurons as under the paper's rule)
    are token-wise core; the `n_keep` neurons core in the most tokens are kept.
    """
    with jax.named_scope("rule_magnitude"):
        counts = stability_counts(activations, valid, token_keep, by_magnitude=True)  # [B, F]
        _, idx = lax.top_k(counts, n_keep)  # [B, n_keep]
        return idx.astype(jnp.int32)


def normalized_magnitude(activations: jnp.ndarray, valid: jnp.ndarray, n_keep: int,
                         token_keep: float) -> jnp.ndarray:
    """The `n_keep` neurons with the largest summed share of each token's activation magnitude.

    Score of neuron j: `sum_t |a[t, j]| / sum_j' |a[t, j']|` over the real tokens t. Each token
    contributes a distribution over neurons that sums to 1, so every token weighs the same and
    a neuron scores by how much of the prompt's FFN output it carries, not by how often it
    crosses a threshold. `token_keep` is not used.
    """
    with jax.named_scope("rule_normalized_magnitude"):
        m = jnp.abs(activations.astype(jnp.float32)) * valid[..., None]  # [B, T, F]
        total = m.sum(-1, keepdims=True)  # [B, T, 1]
        # Padding (and an all-zero token) has total 0: it contributes nothing rather than NaN.
        share = m / jnp.where(total > 0, total, 1.0)  # [B, T, F]
        _, idx = lax.top_k(share.sum(1), n_keep)  # [B, n_keep]
        return idx.astype(jnp.int32)


def griffin(activations: jnp.ndarray, valid: jnp.ndarray, n_keep: int, token_keep: float) -> jnp.ndarray:
    """GRIFFIN's statistic (Dong et al. 2024): each token's activations L2-normalised, then each
    neuron's L2 norm over the prompt's tokens; the `n_keep` largest are kept. Like
    `normalized_magnitude` every token weighs the same, but squares favour neurons that are large
    in a few tokens over ones that are moderate in many. `token_keep` is not used."""
    with jax.named_scope("rule_griffin"):
        a = activations.astype(jnp.float32) * valid[..., None]  # [B, T, F]
        norm = jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True))  # [B, T, 1]
        unit = a / jnp.where(norm > 0, norm, 1.0)
        _, idx = lax.top_k(jnp.sum(unit * unit, axis=1), n_keep)  # [B, n_keep]; the sqrt keeps the order
        return idx.astype(jnp.int32)


RULES: dict[str, Rule] = {"paper": paper, "magnitude": magnitude, "normalized_magnitude": normalized_magnitude,
                          "griffin": griffin}


def check_rule(name: str) -> str:
    if name not in RULES:
        raise MethodError(f"unknown selection rule {name!r}; choose one of: {', '.join(RULES)}")
    return name
