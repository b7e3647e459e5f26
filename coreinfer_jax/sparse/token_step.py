"""The hybrid method's decode-step FFN: the static core rows, per-token neurons, and the rest.

At each step and sparse layer a predictor scores every neuron for this token's FFN input;
the best `dynamic` of F outside the prompt's core are gathered from the full weights and
computed exactly, next to the core's rows gathered once per generation. The other neurons
contribute zero (`rest="zero"`, CoreInfer's skipping) or the sketch's estimate of their
activation through a 4-bit copy of the down projection (`rest="sketch"`): the sketch already
estimated every neuron's activation to rank them, and the left-out ones are the small ones,
whose 4-bit error is small next to the exact neurons' contribution.

Teacher-forced chunks (`score_ids`, pre-fill of later chunks) give every token its own
neurons by masking the full FFN: the same sum without gathering T copies of the rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.forward import activation_fn, ffn, finished
from coreinfer_jax.models.params import Params
from coreinfer_jax.models.products import gathered_times, times_gathered
from coreinfer_jax.sparse.gather import gather_rows
from coreinfer_jax.sparse.predictor import predicted_scores
from coreinfer_jax.sparse.rules import top_neurons_and_mask
from coreinfer_jax.sparse.selection import sharded_count
from coreinfer_jax.sparse.sketch import rest_output, sketch_estimate

RESTS = ("zero", "sketch")


@dataclasses.dataclass(frozen=True)
class TokenNeurons:
    """The decode-step FFN of a hybrid method (hashable: a static argument of the decode loop).

    A sparse layer's params are `{"core": gathered core rows [B, K, D], "core_mask": bool [B, F]
    (True at the core), "full": the layer's whole FFN, "predictor": its factors}` (and `"down_norm"` `[F]` when
    down-weighted, `"means"` `[B, F]` when compensating, `"outside"`: the sketch's rows outside
    the core, `sketch.outside_layers`, for a batch of one); every other layer's are its FFN.
    """

    dynamic: float
    select_by: str
    shards: int = 1
    rest: str = "zero"

    def __call__(self, p: Params, y: jnp.ndarray, cfg: ModelConfig,
                 row_scale: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
        """`y` `[B, T, D]` is the FFN's input, or with `row_scale` an unfinished norm of it
        (`forward.norm_for_products`): the core's products, the sketch and the per-token rows
        finish it after their reductions; the other predictors, and the rows on a mesh, read it
        finished (`forward.finished`; unused, XLA drops it, and the norm stays one kernel)."""
        if "full" not in p:
            return ffn(p, y, cfg, row_scale)
        full, core = p["full"], p["core_mask"]
        B, T, _ = y.shape
        F = full["w_up"].shape[0]
        n_dynamic = sharded_count(F, self.dynamic, self.shards)
        if n_dynamic == 0 and self.rest == "zero":
            return ffn(p["core"], y, cfg, row_scale)
        x = finished(y, row_scale)  # [B, T, D]
        outside = p.get("outside") if T == 1 else None
        with jax.named_scope("token_neurons"):
            scores, estimate = self.scores(p, x, y, cfg, row_scale, outside)  # [B, T, F] ([1, 1, F - K] outside)
            if n_dynamic:
                dynamic, picked = top_neurons_and_mask(scores, n_dynamic, self.shards)  # [B, T, n], like scores
            else:
                dynamic, picked = jnp.zeros((B, T, 0), jnp.int32), jnp.zeros(scores.shape, bool)
            if outside is not None:
                dynamic = jnp.take(outside["ids"], dynamic)  # [1, 1, n]: neuron ids
            chosen = picked if outside is not None else core[:, None, :] | picked  # like scores
        if T == 1:
            out, hidden = ffn(p["core"], y, cfg, row_scale)  # the core's products finish the norm
            out = out + self.dynamic_rows(p, y, dynamic[:, 0], cfg, row_scale)
        else:
            out, hidden = masked_ffn(full, x, chosen, cfg, p.get("means"))
        if self.rest == "sketch":
            factors = p["predictor"] if outside is None else outside
            out = out + rest_output(factors, jnp.where(chosen, 0, estimate), y.shape[-1])  # [B, T, D]
        return out, hidden

    def scores(self, p: Params, x: jnp.ndarray, y: jnp.ndarray, cfg: ModelConfig, row_scale: jnp.ndarray | None,
               outside: Params | None) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """How much each neuron outside the core matters for this step's FFN input (`x`
        finished, `y` and `row_scale` as in `__call__`), `[B, T, F]` with the core at -inf, and
        the sketch's estimate of every neuron's activation (None from another predictor).
        With `outside` (`sketch.outside_rows`, one token of a batch of one), both over its
        neurons only, `[1, 1, F - K]`: a step reads none of the core's sketch rows."""
        if outside is not None:
            scores, estimate = sketch_estimate(outside, outside, y, activation_fn(cfg), False, row_scale)
            return (scores * outside["down_norm"] if "down_norm" in outside else scores), estimate
        full, estimate = p["full"], None
        if self.select_by == "oracle":
            _, true = ffn(full, x, cfg)  # [B, T, F]
            scores = true if cfg.family == "opt" else jnp.abs(true)
        elif self.select_by == "sketch":
            scores, estimate = sketch_estimate(p["predictor"], full, y, activation_fn(cfg),
                                               cfg.family == "opt", row_scale)  # [B, T, F] each
        else:
            scores = predicted_scores(p["predictor"], full, x, activation_fn(cfg))  # [B, T, F]
        if "down_norm" in p:
            scores = scores * p["down_norm"]  # the neuron's output size (down_weighted)
        return jnp.where(p["core_mask"][:, None, :], -jnp.inf, scores), estimate

    def dynamic_rows(self, p: Params, y: jnp.ndarray, dynamic: jnp.ndarray, cfg: ModelConfig,
                     row_scale: jnp.ndarray | None = None) -> jnp.ndarray:
        """One token's output `[B, 1, D]` from its `dynamic` `[B, n]` rows of the FFN input `y`
        `[B, 1, D]` (with `row_scale`, as in `__call__`), read from the full weights where they
        lie (`models.products`; on a mesh, each device gathers its own)."""
        if dynamic.shape[-1] == 0:
            return jnp.zeros_like(y)
        full = p["full"]
        if self.shards > 1:
            x = finished(y, row_scale)  # [B, 1, D]
            neuron_major = {k: v for k, v in full.items() if k != "b_down"}
            rows = gather_rows(neuron_major, dynamic, self.shards)  # [B, n, D]
            out = ffn(rows, x, cfg)[0]
            if "means" in p:  # computed now: their prompt means leave the compensation bias
                means = jnp.take_along_axis(p["means"], dynamic, axis=1)  # [B, n]
                out = out - jnp.einsum("bn,bnd->bd", means.astype(x.dtype), rows["w_down"])[:, None]
            return out

        def project(name: str) -> jnp.ndarray:  # [B, n]
            out = times_gathered(y[:, 0], full[f"w_{name}"], dynamic, None if row_scale is None else row_scale[:, 0])
            return out + jnp.take(full[f"b_{name}"], dynamic) if f"b_{name}" in full else out

        act = activation_fn(cfg)
        h = act(project("up")) if cfg.family == "opt" else act(project("gate")) * project("up")  # [B, n]
        if "means" in p:
            h = h - jnp.take_along_axis(p["means"], dynamic, axis=1).astype(h.dtype)
        return gathered_times(h, full["w_down"], dynamic)[:, None]


@functools.partial(jax.jit, static_argnames=("counts", "width"))
def core_masks(core: jnp.ndarray, *, counts: tuple[int, ...], width: int) -> list[jnp.ndarray]:
    """Per sparse layer, `bool [B, F]`: True at its first `counts[j]` core ids of `core`
    `[B, n_sparse, n_max]` (built once per generation, not at every step)."""
    rows = jnp.arange(core.shape[0])[:, None]
    return [jnp.zeros((core.shape[0], width), bool).at[rows, core[:, j, :n]].set(True) for j, n in enumerate(counts)]


def masked_ffn(full: Params, x: jnp.ndarray, chosen: jnp.ndarray, cfg: ModelConfig,
               means: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The FFN of `x` `[B, T, D]` with, per token, only the `chosen` `[B, T, F]` neurons; the
    others contribute 0, or their prompt `means` `[B, F]` (compensation)."""
    _, score = ffn(full, x, cfg)  # [B, T, F]
    hidden = activation_fn(cfg)(score) if cfg.family == "opt" else score
    fill = 0 if means is None else means[:, None, :].astype(hidden.dtype)
    out = jnp.einsum("btf,fd->btd", jnp.where(chosen, hidden, fill), full["w_down"])  # [B, T, D]
    if "b_down" in full:
        out = out + full["b_down"]
    return out, score
