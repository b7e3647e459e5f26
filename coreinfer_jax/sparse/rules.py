"""Core-neuron selection rules: which `n_keep` FFN neurons a prompt keeps in one sparse layer.

A rule is a score `(activations [B, T, F], valid [B, T], token_keep) -> [B, F]` (`SCORES`):
padding tokens never count. `top_neurons` keeps the `n_keep` highest-scoring neurons, with
static shapes (ties in index order, `lax.top_k`; always `n_keep` entries): among all F, or
shard-locally (`shards`: each of N equal blocks of neurons, the rows one tensor-parallel
device holds, keeps `n_keep / N` of its own), per row or once for the whole batch (`share`).
`RULES[name](activations, valid, n_keep, token_keep)` is the plain per-row, global choice.
`n_keep` is static, so a per-layer budget is one compile per distinct count.

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
from coreinfer_jax.models.products import by_platform
from coreinfer_jax.sparse.radix_select import radix_top
from coreinfer_jax.sparse.selection import stability_counts

Score = Callable[[jnp.ndarray, jnp.ndarray, float], jnp.ndarray]
Rule = Callable[[jnp.ndarray, jnp.ndarray, int, float], jnp.ndarray]
SHARES = ("row", "batch")


def paper(activations: jnp.ndarray, valid: jnp.ndarray, token_keep: float) -> jnp.ndarray:
    """The paper's stability-guided rule (`select_core_neurons`).

    Scores neurons by the number of tokens that have them among their
    `floor(token_keep * P / T)` largest signed activations (P: positives over the T tokens).
    """
    with jax.named_scope("rule_paper"):
        return stability_counts(activations, valid, token_keep)  # [B, F]


def magnitude(activations: jnp.ndarray, valid: jnp.ndarray, token_keep: float) -> jnp.ndarray:
    """The paper's counting with each token voting for its largest `|activation|`.

    Per token the `limit = floor(token_keep * P / T)` neurons of largest magnitude (P counts
    the *signed* positives, so each token votes for as many neurons as under the paper's rule)
    are token-wise core; a neuron scores the number of tokens it is core in.
    """
    with jax.named_scope("rule_magnitude"):
        return stability_counts(activations, valid, token_keep, by_magnitude=True)  # [B, F]


def normalized_magnitude(activations: jnp.ndarray, valid: jnp.ndarray, token_keep: float) -> jnp.ndarray:
    """Each neuron's summed share of each token's activation magnitude.

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
        return share.sum(1)  # [B, F]


def griffin(activations: jnp.ndarray, valid: jnp.ndarray, token_keep: float) -> jnp.ndarray:
    """GRIFFIN's statistic (Dong et al. 2024): each token's activations L2-normalised, then each
    neuron's L2 norm over the prompt's tokens; the `n_keep` largest are kept. Like
    `normalized_magnitude` every token weighs the same, but squares favour neurons that are large
    in a few tokens over ones that are moderate in many. `token_keep` is not used."""
    with jax.named_scope("rule_griffin"):
        a = activations.astype(jnp.float32) * valid[..., None]  # [B, T, F]
        norm = jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True))  # [B, T, 1]
        unit = a / jnp.where(norm > 0, norm, 1.0)
        return jnp.sum(unit * unit, axis=1)  # [B, F]; the sqrt keeps the order


SCORES: dict[str, Score] = {"paper": paper, "magnitude": magnitude, "normalized_magnitude": normalized_magnitude,
                            "griffin": griffin}


def top_neurons(scores: jnp.ndarray, n_keep: int, shards: int = 1, share: str = "row") -> jnp.ndarray:
    """The `n_keep` highest `scores` `[..., F]` as `int32 [..., n_keep]`, ties in index order.

    With `shards` N, neuron block s (rows `s*F/N .. (s+1)*F/N`, what tensor-parallel device s
    holds) contributes its own `n_keep / N` best, in ids block s of the result: the gather then
    never crosses devices. `share="batch"` ranks the scores summed over the rows (axis 0) and
    gives every row the same set (one gathered copy serves the batch).
    """
    lead = scores.shape[:-1]
    if share == "batch":
        scores = scores.sum(0, keepdims=True)  # [1, F]
    # Two-dimensional: XLA's CPU top-k took ~40% longer on the same numbers as [B, T, N, F/N].
    _, idx = lax.top_k(scores.reshape(-1, scores.shape[-1] // shards), n_keep // shards)  # [B * T * N, n/N]
    return jnp.broadcast_to(_ids(idx, scores.shape, shards), (*lead, n_keep))


def top_neurons_and_mask(scores: jnp.ndarray, n_keep: int, shards: int = 1) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`top_neurons(scores, n_keep, shards)` per row of `scores` `[B, T, F]`, and `bool
    [B, T, F]`: True at those ids.

    A decode step (`T == 1`) lowered for a GPU selects without sorting
    (`radix_select.radix_top`: the same ids, in increasing order); everything else ranks
    with `lax.top_k` and scatters the ids into the mask. (Comparing with the last kept score
    instead made XLA's CPU backend turn its top-k into a full sort: 8x slower at SmolLM2's
    widths.)"""
    blocks = scores.reshape(-1, scores.shape[-1] // shards)  # [B * T * N, F/N]
    n = n_keep // shards
    if scores.shape[-2] == 1:
        idx, mask = by_platform(lambda b: _sorted_top(b, n), lambda b: radix_top(b, n), blocks)
    else:
        idx, mask = _sorted_top(blocks, n)
    return _ids(idx, scores.shape, shards), mask.reshape(scores.shape)


def _sorted_top(blocks: jnp.ndarray, n: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Each row's top `n` in-block ids `[R, n]` (by score, `lax.top_k`) and its mask `[R, F/N]`."""
    _, idx = lax.top_k(blocks, n)  # [R, n]
    return idx, jnp.zeros(blocks.shape, bool).at[jnp.arange(blocks.shape[0])[:, None], idx].set(True)


def _ids(idx: jnp.ndarray, shape: tuple[int, ...], shards: int) -> jnp.ndarray:
    """In-block ids `[R, n/N]` as neuron ids `int32 [..., n]`."""
    block = shape[-1] // shards
    return (idx.reshape(*shape[:-1], shards, -1) + jnp.arange(shards)[:, None] * block).reshape(
        *shape[:-1], -1).astype(jnp.int32)


def _plain(score: Score) -> Rule:
    def rule(activations: jnp.ndarray, valid: jnp.ndarray, n_keep: int, token_keep: float) -> jnp.ndarray:
        return top_neurons(score(activations, valid, token_keep), n_keep)

    rule.__doc__ = score.__doc__
    return rule


RULES: dict[str, Rule] = {name: _plain(score) for name, score in SCORES.items()}


def check_share(share: str) -> str:
    if share not in SHARES:
        raise MethodError(f"unknown share {share!r}; choose one of: {', '.join(SHARES)}")
    return share


def check_rule(name: str) -> str:
    if name not in RULES:
        raise MethodError(f"unknown selection rule {name!r}; choose one of: {', '.join(RULES)}")
    return name
