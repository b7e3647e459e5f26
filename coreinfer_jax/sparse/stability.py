"""Stability-guided core neurons: each prompt chooses its own, in every sparse layer, in pre-fill."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

from coreinfer_jax.errors import MethodError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import Params
from coreinfer_jax.sparse import compensation
from coreinfer_jax.sparse.method import CoreNeurons, resolve_layers
from coreinfer_jax.sparse.rules import SCORES, check_rule, top_neurons
from coreinfer_jax.sparse.selection import check_fraction, n_keep_for


@dataclasses.dataclass(frozen=True)
class Stability(CoreNeurons):
    """Core neurons selected in pre-fill from the prompt's own activations.

    `layers` is a half-open range `(first, end)` of sparse layers; None means the paper's
    default scaled to the model's depth. `rule` names the selection rule (`rules.RULES`;
    "paper" is CoreInfer's stability-guided rule). `layer_keep`, when given, is a per-layer
    budget: the neuron count of each sparse layer, totalling what `keep` keeps uniformly
    (the same FFN bytes per token), e.g. from `budget.Budget.layer_neurons`. `down_weighted`
    ranks each neuron's activation times its down-projection row's norm (`weighted`).
    `compensate` adds the left-out neurons' prompt means to decode's FFN output (FLAP-style,
    `sparse.compensation`).
    `shards` and `share` (`method.CoreNeurons`): shard-local selection for tensor parallelism,
    one set for the whole batch.
    """

    keep: float = 0.4
    token_keep: float = 0.2
    layers: tuple[int, int] | None = None
    rule: str = "paper"
    layer_keep: tuple[int, ...] | None = None
    down_weighted: bool = False
    compensate: bool = False
    shards: int = 1
    share: str = "row"
    name: ClassVar[str] = "stability"
    # Whether pre-fill also keeps each neuron's prompt mean (a per-token method subtracts the
    # means of the neurons it computes from the compensation bias).
    per_token_means: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_fraction("keep", self.keep)
        check_fraction("token_keep", self.token_keep)
        check_rule(self.rule)
        if self.layer_keep is not None:
            # A list would make the method unhashable, and it is a static jit argument.
            object.__setattr__(self, "layer_keep", tuple(int(n) for n in self.layer_keep))

    def validate(self, cfg: ModelConfig) -> Stability:
        """This method with `layers` resolved for `cfg`; raises on a range outside the model or
        a per-layer budget of the wrong length, range or total."""
        method = dataclasses.replace(self, layers=resolve_layers(self.layers, self.keep, cfg))
        method.check_sharing(cfg)
        method.check_compensation(cfg)
        if method.layer_keep is not None:
            check_layer_budget(method.layer_keep, len(method.sparse_layers()), cfg.intermediate_size, method.keep)
            if any(n % method.shards for n in method.layer_keep):
                raise MethodError(f"per-layer budget counts must be multiples of shards={method.shards} (each "
                                  f"shard keeps an equal share), got {list(method.layer_keep)}")
        return method

    def check_compensation(self, cfg: ModelConfig) -> None:
        """Compensation reads the down projection's input: for OPT, ReLU of what pre-fill ranks."""
        if self.compensate and cfg.family == "opt" and cfg.hidden_act != "relu":
            raise MethodError(f"compensation supports OPT models with ReLU, not {cfg.hidden_act!r}")

    def layer_neurons(self, width: int) -> tuple[int, ...]:
        return self.layer_keep or super().layer_neurons(width)

    def selecting_layers(self) -> frozenset[int]:
        return frozenset(self.sparse_layers())

    def select(self, activation: jnp.ndarray, valid: jnp.ndarray, tables: Params | None,
               layer: int | None, ffn: Params, voting: jnp.ndarray | None = None,
               ) -> jnp.ndarray | dict[str, jnp.ndarray]:
        """That layer's core neurons `[B, n]` chosen by `voting` (`Method.select`), with
        `compensate` also what `compensation.compensate` keeps: each row's means over its own
        `valid` tokens."""
        core = self.choose(activation, valid if voting is None else voting, layer, ffn)
        return compensation.compensate(activation, valid, core, ffn) if self.compensate else core

    def ffn_bytes(self, params: Params) -> list[int]:
        """With `compensate`, also the bias each sparse layer adds (unless it had a `b_down`)."""
        out = super().ffn_bytes(params)
        if self.compensate:
            for i in self.sparse_layers():
                w_down = params["layers"][i]["ffn"]["w_down"]
                out[i] += 0 if "b_down" in params["layers"][i]["ffn"] else w_down.shape[1] * w_down.dtype.itemsize
        return out

    def choose(self, activation: jnp.ndarray, valid: jnp.ndarray, layer: int | None, ffn: Params) -> jnp.ndarray:
        """That layer's core neurons `[B, n]` by `rule`: its budget's count, or `int(F * keep)`."""
        width = activation.shape[-1]
        if layer is None:
            # The streamed (offload) pre-fill compiles one layer program for all layers and
            # does not know which layer it runs, so it cannot serve per-layer counts.
            if self.layer_keep is not None:
                raise MethodError("a per-layer budget (layer_keep) is not supported in offload mode")
            n = self.layer_neurons(width)[0]
        else:
            n = dict(zip(self.sparse_layers(), self.layer_neurons(width)))[layer]
        scores = SCORES[self.rule](self.weighted(activation, ffn), valid, self.token_keep)  # [B, F]
        return top_neurons(scores, n, self.shards, self.share)

    def weighted(self, activation: jnp.ndarray, ffn: Params) -> jnp.ndarray:
        """With `down_weighted`, each neuron's activation times the norm of its down-projection row
        (WINA / R-Sparse): its output's size, not just its input's. Norms are positive, so signs
        (which the paper's rule counts) are kept."""
        if not self.down_weighted:
            return activation
        return activation * down_norms(ffn).astype(activation.dtype)  # [B, T, F]

    def core_neurons(self, selected: list, tables: Params | None) -> jnp.ndarray | dict[str, jnp.ndarray]:
        """`[B, n_sparse, n_max]`: with a per-layer budget, layer j's count of ids come first and
        the rest of its row is -1; the gather slices each layer to its count statically. With
        `compensate`, `{"ids": that, "bias": [B, n_sparse, D]}` (`"means"` `[B, n_sparse, F]` too
        where decode picks neurons per token)."""
        ids = [s["ids"] for s in selected] if self.compensate else selected
        n_max = max(s.shape[1] for s in ids)
        core = jnp.stack([jnp.pad(s, ((0, 0), (0, n_max - s.shape[1])), constant_values=-1)
                          for s in ids], axis=1)  # [B, n_sparse, n_max]
        if not self.compensate:
            return core
        kept = {"ids": core, "bias": jnp.stack([s["bias"] for s in selected], axis=1)}  # bias [B, n_sparse, D]
        if self.per_token_means:
            kept["means"] = jnp.stack([s["means"] for s in selected], axis=1)  # [B, n_sparse, F]
        return kept

    @property
    def label(self) -> str:
        """"stability keep 0.4", plus the rule unless it is the paper's and "+budget" with a budget."""
        plain = self.rule == "paper" and self.layer_keep is None and not self.down_weighted and not self.compensate
        variant = "" if plain else self.rule + ("+budget" if self.layer_keep is not None else "") + self.options_label
        return f"{self.name} keep {self.keep:g}" + (f" {variant}" if variant else "") + self.sharing_label

    @property
    def options_label(self) -> str:
        """"+down" with `down_weighted`, "+comp" with `compensate`."""
        return ("+down" if self.down_weighted else "") + ("+comp" if self.compensate else "")

    def describe(self) -> dict[str, Any]:
        return dict(super().describe(), token_keep=self.token_keep, rule=self.rule,
                    layer_neurons=list(self.layer_keep) if self.layer_keep else None,
                    down_weighted=self.down_weighted, compensate=self.compensate)


def down_norms(ffn: Params) -> jnp.ndarray:
    """`||W_down[j]||` of every neuron `[F]` (neuron-major `w_down` `[F, D]`)."""
    return jnp.sqrt(jnp.sum(jnp.square(ffn["w_down"].astype(jnp.float32)), axis=-1))


def check_layer_budget(counts: tuple[int, ...], n_layers: int, width: int, keep: float) -> None:
    """Raise unless `counts` gives each of `n_layers` sparse layers 1..`width` neurons and
    totals `n_layers * int(width * keep)`, the uniform keep's neurons (and FFN bytes)."""
    if len(counts) != n_layers:
        raise MethodError(f"per-layer budget has {len(counts)} counts but there are {n_layers} sparse layers")
    if not all(1 <= n <= width for n in counts):
        raise MethodError(f"per-layer budget counts must be in 1..{width} (the FFN width), got {list(counts)}")
    want = n_layers * n_keep_for(width, keep)
    if sum(counts) != want:
        raise MethodError(f"per-layer budget totals {sum(counts)} neurons but keep={keep:g} keeps {want} "
                          f"({n_layers} layers x {n_keep_for(width, keep)})")
