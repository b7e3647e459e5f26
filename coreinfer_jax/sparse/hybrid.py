"""Token-adaptive core neurons: CoreInfer's per-prompt core plus per-token neurons.

In each sparse layer, decode reads the prompt's static core neurons (any stability rule,
`keep` of F, gathered once per generation, as `Stability`) and, at every token, `dynamic`
of F more neurons chosen among the others: the ones a low-rank predictor
(`sparse.predictor`) scores highest for that token's FFN input, gathered from the full
weights in the step itself. Shapes are static (`int32 [B, n_dynamic]` per layer and step),
so nothing recompiles within a bucket.

Per-prompt sets lose much more on gated (SiLU/GeGLU) models than on ReLU ones: a neuron
that matters for one token is silent for the next. Per-token choice recovers most of it
(with a perfect predictor, static 0.2 + per-token 0.2 is within ~8% of dense perplexity on
SmolLM2 where static 0.4 is ~2x); `select_by="oracle"` ranks by the true activations
(every FFN weight is read: a quality bound and a test reference, never faster than dense).
`keep=0` is the per-token-only mode (the predictor chooses every neuron).

Bytes per decoded token and sparse layer: static rows + dynamic rows + the predictor's
`r * (D + F)` per projection (`ffn_elements`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from coreinfer_jax.errors import MethodError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.forward import activation_fn, ffn
from coreinfer_jax.models.params import Params
from coreinfer_jax.sparse.gather import NEURON_ROWS, gather_core_layers, gather_rows
from coreinfer_jax.sparse.method import check_fraction, resolve_layers
from coreinfer_jax.sparse.predictor import MAKE, Predictor, PredictorError, predicted_scores
from coreinfer_jax.sparse.rules import check_rule, top_neurons
from coreinfer_jax.sparse.selection import sharded_count
from coreinfer_jax.sparse.stability import Stability, down_norms

SELECT_BY = ("predictor", "oracle")
# What `Hybrid()` resolves to per model family when keep, dynamic or rule are left unset,
# chosen on ../shared/data (docs/hybrid.md): ReLU models keep most of their quality with a
# per-prompt core alone, gated ones need the per-token share.
RECOMMENDED = {"gated": {"keep": 0.2, "dynamic": 0.2, "rule": "normalized_magnitude"},
               "relu": {"keep": 0.3, "dynamic": 0.1, "rule": "paper"}}


@dataclasses.dataclass(frozen=True)
class TokenNeurons:
    """The decode-step FFN of a hybrid method (hashable: a static argument of the decode loop).

    A sparse layer's params are `{"core": gathered core rows [B, K, D], "core_idx": [B, K],
    "full": the layer's whole FFN, "predictor": its factors}` (and `"down_norm"` `[F]` when
    down-weighted); every other layer's are its FFN.
    """

    dynamic: float
    select_by: str
    shards: int = 1

    def __call__(self, p: Params, x: jnp.ndarray, cfg: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
        if "full" not in p:
            return ffn(p, x, cfg)
        full, core_idx = p["full"], p["core_idx"]
        B, T, _ = x.shape
        F = full["w_up"].shape[0]
        n_dynamic = sharded_count(F, self.dynamic, self.shards)
        if n_dynamic == 0:
            return ffn(p["core"], x, cfg)
        with jax.named_scope("token_neurons"):
            if self.select_by == "oracle":
                _, true = ffn(full, x, cfg)  # [B, T, F]
                scores = true if cfg.family == "opt" else jnp.abs(true)
            else:
                scores = predicted_scores(p["predictor"], full, x, activation_fn(cfg))  # [B, T, F]
            if "down_norm" in p:
                scores = scores * p["down_norm"]  # the neuron's output size (down_weighted)
            core = jnp.zeros((B, F), bool).at[jnp.arange(B)[:, None], core_idx].set(True)  # [B, F]
            scores = jnp.where(core[:, None, :], -jnp.inf, scores)
            dynamic = top_neurons(scores, n_dynamic, self.shards)  # [B, T, n_dynamic]
        if T == 1:
            # Decode: read only the chosen rows (on a mesh, each device from its own), then both
            # neuron sets' contributions.
            neuron_major = {k: v for k, v in full.items() if k != "b_down"}
            rows = gather_rows(neuron_major, dynamic[:, 0], self.shards)  # [B, n, D]
            out, hidden = ffn(p["core"], x, cfg)
            return out + ffn(rows, x, cfg)[0], hidden
        # A teacher-forced chunk: each token its own neurons; masking the full FFN computes the
        # same sum without gathering T copies of the rows.
        chosen = core[:, None, :] | jnp.zeros((B, T, F), bool).at[
            jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None], dynamic].set(True)  # [B, T, F]
        return masked_ffn(full, x, chosen, cfg)


def masked_ffn(full: Params, x: jnp.ndarray, chosen: jnp.ndarray, cfg: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The FFN of `x` `[B, T, D]` with, per token, only the `chosen` `[B, T, F]` neurons."""
    _, score = ffn(full, x, cfg)  # [B, T, F]
    hidden = activation_fn(cfg)(score) if cfg.family == "opt" else score
    out = jnp.einsum("btf,fd->btd", jnp.where(chosen, hidden, 0), full["w_down"])  # [B, T, D]
    if "b_down" in full:
        out = out + full["b_down"]
    return out, score


@dataclasses.dataclass(frozen=True)
class Hybrid(Stability):
    """Static core neurons (`keep`, chosen by `rule` in pre-fill) plus `dynamic` per-token neurons.

    `keep`, `dynamic` and `rule` left None take the model family's `RECOMMENDED` values in
    `validate`. `predictor` is a `Predictor` or its directory (not part of equality: predictors
    of one shape share every compile); `select_by="oracle"` needs none.
    """

    keep: float | None = None
    rule: str | None = None
    dynamic: float | None = None
    predictor: Predictor | str | Path | None = dataclasses.field(default=None, compare=False, repr=False)
    select_by: str = "predictor"
    rank: int | None = dataclasses.field(default=None, init=False)
    name: ClassVar[str] = "hybrid"
    offload_supported: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.keep is not None and not 0.0 <= self.keep < 1.0:
            raise MethodError(f"keep must be in [0, 1) for the hybrid method, got {self.keep}")
        if self.dynamic is not None and not 0.0 <= self.dynamic <= 1.0:
            raise MethodError(f"dynamic must be in [0, 1], got {self.dynamic}")
        check_fraction("token_keep", self.token_keep)
        if self.keep is not None and self.dynamic is not None and not 0.0 < self.keep + self.dynamic <= 1.0:
            raise MethodError(f"keep + dynamic must be in (0, 1], got {self.keep:g} + {self.dynamic:g}")
        if self.rule is not None:
            check_rule(self.rule)
        if self.layer_keep is not None:
            raise MethodError("the hybrid method takes no per-layer budget")
        if self.select_by not in SELECT_BY:
            raise MethodError(f"select_by must be one of {', '.join(SELECT_BY)}, got {self.select_by!r}")
        predictor = self.predictor
        if isinstance(predictor, (str, Path)):
            predictor = Predictor.load(predictor)
        object.__setattr__(self, "predictor", predictor)
        object.__setattr__(self, "rank", predictor.rank if predictor is not None else None)

    def validate(self, cfg: ModelConfig) -> Hybrid:
        """This method with unset settings resolved for `cfg` (its family's recommended ones, the
        default sparse layers); raises without a predictor fitted for this model and layers."""
        kind = "relu" if cfg.family == "opt" else "gated"
        unset = {k: v for k, v in RECOMMENDED[kind].items() if getattr(self, k) is None}
        method = dataclasses.replace(self, **unset) if unset else self
        if method.share != "row":
            raise MethodError("the hybrid method picks each row's own neurons at every step: it has no "
                              "share='batch' mode")
        layers = resolve_layers(method.layers, method.keep + method.dynamic, cfg)
        method.check_sharing(cfg, kept=method.keep + method.dynamic)
        if method.select_by == "predictor":
            if method.predictor is None:
                raise PredictorError(f"the hybrid method needs a predictor (--predictor DIR); make one with `{MAKE}`")
            method.predictor.check_model(cfg)
            if not method.predictor.covers(*layers):
                raise PredictorError(f"the predictor has factors for layers {method.predictor.layers[0]}:"
                                     f"{method.predictor.layers[1]}, not for the sparse layers {layers[0]}:{layers[1]}")
        return dataclasses.replace(method, layers=layers)

    def batch_shared(self) -> None:
        return None  # its per-token neurons are each row's own

    @property
    def decode_ffn(self) -> TokenNeurons:
        return TokenNeurons(self.dynamic, self.select_by, self.shards)

    def select(self, activation: jnp.ndarray, valid: jnp.ndarray, tables: Params | None,
               layer: int | None, ffn: Params) -> jnp.ndarray:
        if sharded_count(activation.shape[-1], self.keep, self.shards) == 0:
            return jnp.zeros(activation.shape[:1] + (0,), jnp.int32)  # [B, 0]: per-token only
        return super().select(activation, valid, tables, layer, ffn)

    def decode_weights(self, params: Params, core: jnp.ndarray | None) -> Params:
        """Per sparse layer the gathered core rows (once per generation), their ids, the full FFN
        (the arrays themselves, not copies) and the layer's predictor factors."""
        sparse = self.sparse_layers()
        width = params["layers"][sparse[0]]["ffn"]["w_up"].shape[0]
        counts = self.layer_neurons(width)
        ffns = [params["layers"][i]["ffn"] for i in sparse]
        gathered = gather_core_layers(ffns, core, counts=counts, shards=self.shards)
        factors = (self.predictor.layer_factors(*self.layers) if self.select_by == "predictor"
                   else [{}] * len(sparse))
        layers = list(params["layers"])
        for j, i in enumerate(sparse):
            layers[i] = dict(layers[i], ffn={"core": gathered[j], "core_idx": core[:, j, : counts[j]],
                                             "full": ffns[j], "predictor": factors[j]})
            if self.down_weighted:
                layers[i]["ffn"]["down_norm"] = down_norms(ffns[j])  # [F], once per generation
        return dict(params, layers=layers)

    def ffn_elements(self, params: Params) -> list[int]:
        """Static rows + dynamic rows + predictor factors in sparse layers; the oracle reads all."""
        F = params["layers"][0]["ffn"]["w_up"].shape[0]
        rows = sharded_count(F, self.keep, self.shards) + sharded_count(F, self.dynamic, self.shards)
        extra = self.predictor.elements_per_token() if self.select_by == "predictor" else 0
        extra += F if self.down_weighted else 0
        sparse = set(self.sparse_layers())
        out = []
        for i, layer in enumerate(params["layers"]):
            if i not in sparse or self.select_by == "oracle":
                out.append(sum(w.size for w in layer["ffn"].values()))
                continue
            out.append(extra + sum(w.size * rows // F if name in NEURON_ROWS else w.size
                                   for name, w in layer["ffn"].items()))
        return out

    @property
    def label(self) -> str:
        """"hybrid 0.2+0.2 r64 normalized_magnitude" (static + dynamic, predictor rank, rule)."""
        how = "oracle" if self.select_by == "oracle" else f"r{self.rank}"
        down = "+down" if self.down_weighted else ""
        return f"{self.name} {self.keep:g}+{self.dynamic:g} {how} {self.rule}{down}{self.sharing_label}"

    def describe(self) -> dict[str, Any]:
        return dict(super().describe(), dynamic=self.dynamic, rank=self.rank, select_by=self.select_by)
