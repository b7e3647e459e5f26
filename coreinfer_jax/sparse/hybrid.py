"""Token-adaptive core neurons: CoreInfer's per-prompt core plus per-token neurons.

In each sparse layer, decode reads the prompt's static core neurons (any stability rule,
`keep` of F, gathered once per generation, as `Stability`) and, at every token, `dynamic`
of F more neurons chosen among the others: the ones a predictor scores highest for that
token's FFN input, gathered from the full weights in the step itself. Shapes are static
(`int32 [B, n_dynamic]` per layer and step), so nothing recompiles within a bucket.

Per-prompt sets lose much more on gated (SiLU/GeGLU) models than on ReLU ones: a neuron
that matters for one token is silent for the next. Per-token choice recovers most of it
(with a perfect predictor, static 0.2 + per-token 0.2 is within ~8% of dense perplexity on
SmolLM2 where static 0.4 is ~2x); `select_by="oracle"` ranks by the true activations
(every FFN weight is read: a quality bound and a test reference, never faster than dense).
`keep=0` is the per-token-only mode (the predictor chooses every neuron).

Two predictors: `select_by="sketch"` (the default for gated models) ranks by a 4-bit copy of
the gate and up projections built from the weights (`sparse.sketch`: near the true
activations' ranking at a twelfth of a float32 layer's bytes); `select_by="predictor"` by a
fitted low-rank predictor (`sparse.predictor`, `r * (D + F)` numbers per projection).

The neurons in neither set contribute zero (`rest="zero"`) or, the gated default, the
sketch's estimate of their activation through a 4-bit copy of the down projection
(`rest="sketch"`, `sparse.token_step`): on SmolLM2 the default with it (static 0.24 +
per-token 0.24, 62% of dense FFN bytes) is at 1.02x dense perplexity and 98.5% of dense
TruthfulQA, where 0.25 + 0.25 without it was at 1.08x and 93% (docs/hybrid.md).

Bytes per decoded token and sparse layer: static rows + dynamic rows + the predictor (and
the down projection's sketch) (`ffn_bytes`). A batch of one reads only the sketch's rows
outside its core, gathered with the core's (`reads_outside`, `sketch.outside_layers`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import jax.numpy as jnp

from coreinfer_jax.errors import MethodError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import Params
from coreinfer_jax.sparse.compensation import with_bias
from coreinfer_jax.sparse.gather import NEURON_ROWS, gather_core_layers, gathered_rows
from coreinfer_jax.sparse.method import resolve_layers
from coreinfer_jax.sparse.predictor import MAKE, Predictor, PredictorError
from coreinfer_jax.sparse.rules import check_rule
from coreinfer_jax.sparse.selection import check_fraction, sharded_count
from coreinfer_jax.sparse.sketch import Sketch, outside_layers, sketch_bytes
from coreinfer_jax.sparse.stability import Stability, down_norms
from coreinfer_jax.sparse.token_step import RESTS, TokenNeurons, core_masks

SELECT_BY = ("sketch", "predictor", "oracle")
# What `Hybrid()` resolves to per model family when keep, dynamic, rule, select_by, layers or
# rest are left unset, chosen on TruthfulQA, SQuAD and WikiText-2 (docs/hybrid.md): gated
# models need the per-token share, and with the sketch's ranking every layer but the first
# can be sparse; ReLU models keep most of their quality with a per-prompt core alone.
# "layers": (first layer, layers left dense at the end), or None for the paper's range
# scaled to depth.
# "rest": what the other neurons add (the sketch's estimate needs the sketch's ranking; with
# another predictor, or compensation, an unset rest is "zero").
RECOMMENDED = {"gated": {"keep": 0.24, "dynamic": 0.24, "rule": "normalized_magnitude", "select_by": "sketch",
                         "layers": (1, 0), "rest": "sketch"},
               "relu": {"keep": 0.3, "dynamic": 0.1, "rule": "paper", "select_by": "predictor", "layers": None,
                        "rest": "zero"}}


@dataclasses.dataclass(frozen=True)
class Hybrid(Stability):
    """Static core neurons (`keep`, chosen by `rule` in pre-fill) plus `dynamic` per-token neurons.

    `rest` is what the other neurons add: "zero" (skipped, as CoreInfer does) or "sketch" (their
    estimate from the 4-bit sketch, through a 4-bit copy of the down projection).
    `keep`, `dynamic`, `rule`, `select_by`, `layers` and `rest` left None take the model family's
    `RECOMMENDED` values in `validate`. `predictor` is a `Predictor` or its directory for
    `select_by="predictor"`, or a `Sketch` (built from the weights when None; not part of
    equality: predictors of one shape share every compile); `select_by="oracle"` needs none.
    """

    keep: float | None = None
    rule: str | None = None
    dynamic: float | None = None
    predictor: Predictor | Sketch | str | Path | None = dataclasses.field(default=None, compare=False, repr=False)
    select_by: str | None = None
    rest: str | None = None
    rank: int | None = dataclasses.field(default=None, init=False)
    name: ClassVar[str] = "hybrid"
    per_token_means: ClassVar[bool] = True

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
        if self.rest is not None and self.rest not in RESTS:
            raise MethodError(f"rest must be one of {', '.join(RESTS)}, got {self.rest!r}")
        if self.select_by is not None and self.select_by not in SELECT_BY:
            raise MethodError(f"select_by must be one of {', '.join(SELECT_BY)}, got {self.select_by!r}")
        predictor = self.predictor
        if isinstance(predictor, (str, Path)):
            predictor = Predictor.load(predictor)
        object.__setattr__(self, "predictor", predictor)
        object.__setattr__(self, "rank", predictor.rank if predictor is not None else None)

    def validate(self, cfg: ModelConfig) -> Hybrid:
        """This method with unset settings resolved for `cfg` (its family's recommended ones);
        raises when `select_by="predictor"` has no predictor fitted for this model and layers."""
        kind = "relu" if cfg.family == "opt" else "gated"
        unset = {k: v for k, v in RECOMMENDED[kind].items() if getattr(self, k) is None}
        if self.select_by is None and isinstance(self.predictor, Predictor):
            unset["select_by"] = "predictor"  # a fitted predictor given is the one to use
        if "rest" in unset and (unset.get("select_by", self.select_by) != "sketch" or self.compensate):
            unset["rest"] = "zero"
        if unset.get("layers") is not None:
            first, dense_at_end = unset["layers"]
            unset["layers"] = (first, cfg.num_layers - dense_at_end)
        method = dataclasses.replace(self, **unset) if unset else self
        if method.share != "row":
            raise MethodError("the hybrid method picks each row's own neurons at every step: it has no "
                              "share='batch' mode")
        layers = resolve_layers(method.layers, method.keep + method.dynamic, cfg)
        method.check_sharing(cfg, kept=method.keep + method.dynamic)
        method.check_compensation(cfg)
        if method.rest == "sketch" and (method.select_by != "sketch" or method.compensate):
            raise MethodError("rest='sketch' adds the sketch's estimate of the neurons left out: it needs "
                              "select_by='sketch' and no compensation (which fills the same neurons)")
        predictor = method.predictor
        if method.select_by == "predictor":
            if not isinstance(predictor, Predictor):
                raise PredictorError(f"the hybrid method needs a predictor (--predictor DIR); make one with `{MAKE}`")
            predictor.check_model(cfg)
            if not predictor.covers(*layers):
                have = f"{predictor.layers[0]}:{predictor.layers[1]}"
                raise PredictorError(f"the predictor has factors for layers {have}, not for the sparse layers "
                                     f"{layers[0]}:{layers[1]}: fit one for them (`predictor --layers "
                                     f"{layers[0]}:{layers[1]}`) or decode the layers it covers (`--layers {have}`, "
                                     f"layers=({predictor.layers[0]}, {predictor.layers[1]}))")
        elif method.select_by == "sketch" and predictor is not None:
            if not isinstance(predictor, Sketch):
                raise MethodError("a fitted predictor is for select_by='predictor'; the sketch is built from the "
                                  "weights")
            if not predictor.covers(*layers):
                raise PredictorError(f"the sketch covers layers {predictor.layers[0]}:{predictor.layers[1]}, not "
                                     f"the sparse layers {layers[0]}:{layers[1]}")
            if method.rest == "sketch" and not predictor.down:
                raise MethodError("rest='sketch' needs a sketch with the down projection: Sketch.build(..., "
                                  "down=True)")
        return dataclasses.replace(method, layers=layers)

    def prepare(self, params: Params, cache: dict) -> Hybrid:
        """With `select_by="sketch"` and no sketch given, this method with the sketch of
        `params` for its layers (kept in `cache`, so a generator builds it once)."""
        if self.select_by != "sketch" or self.predictor is not None:
            return self
        key = ("sketch", self.layers, self.rest == "sketch")
        if key not in cache:
            cache[key] = Sketch.build(params, self.layers, down=self.rest == "sketch")
        return dataclasses.replace(self, predictor=cache[key])

    def batch_shared(self) -> None:
        return None  # its per-token neurons are each row's own

    def offload_refusal(self) -> str:
        return "it reads FFN rows chosen at every token, which would cross from host memory at every step"

    @property
    def decode_ffn(self) -> TokenNeurons:
        return TokenNeurons(self.dynamic, self.select_by, self.shards, self.rest)

    def choose(self, activation: jnp.ndarray, valid: jnp.ndarray, layer: int | None, ffn: Params) -> jnp.ndarray:
        if sharded_count(activation.shape[-1], self.keep, self.shards) == 0:
            return jnp.zeros(activation.shape[:1] + (0,), jnp.int32)  # [B, 0]: per-token only
        return super().choose(activation, valid, layer, ffn)

    def decode_weights(self, params: Params, core: jnp.ndarray | dict[str, jnp.ndarray] | None) -> Params:
        """Per sparse layer the gathered core rows (once per generation), their mask, the full FFN
        (the arrays themselves, not copies), the layer's predictor factors and, compensating,
        the prompt means (the core's output then adds the left-out neurons' bias)."""
        sparse = self.sparse_layers()
        width = params["layers"][sparse[0]]["ffn"]["w_up"].shape[0]
        counts = self.layer_neurons(width)
        ffns = [params["layers"][i]["ffn"] for i in sparse]
        ids = self.neuron_ids(core)
        gathered = gather_core_layers(ffns, ids, counts=counts, shards=self.shards)
        masks = core_masks(ids, counts=counts, width=width)
        source = None if self.select_by == "oracle" else self.prepare(params, {}).predictor
        factors = source.layer_factors(*self.layers) if source is not None else [{}] * len(sparse)
        norms = [down_norms(f) for f in ffns] if self.down_weighted else None  # [F] each, once per generation
        outside = outside_layers(factors, ffns, masks, norms, sizes=tuple(width - n for n in counts)) \
            if self.reads_outside(ffns[0], ids.shape[0]) else None
        layers = list(params["layers"])
        for j, i in enumerate(sparse):
            layers[i] = dict(layers[i], ffn={"core": gathered[j], "core_mask": masks[j], "full": ffns[j],
                                             "predictor": factors[j]})
            if norms is not None:
                layers[i]["ffn"]["down_norm"] = norms[j]
            if isinstance(core, dict):
                layers[i]["ffn"].update(core=with_bias(gathered[j], core["bias"][:, j]), means=core["means"][:, j])
            if outside is not None:
                layers[i]["ffn"]["outside"] = outside[j]
        return dict(params, layers=layers)

    def reads_outside(self, ffn: Params, batch: int) -> bool:
        """Whether a decode step ranks and estimates only the neurons outside the core, from the
        sketch's rows gathered once per generation (`sketch.outside_rows`): for a batch of one
        (a batch would need a copy per row, more bytes than the shared sketch), on one device,
        of a gated layer (a ReLU sketch pairs neurons in its bytes), with a core and a use for
        the sketch."""
        F = ffn["w_up"].shape[0]
        return (self.select_by == "sketch" and batch == 1 and self.shards == 1 and "w_gate" in ffn
                and sharded_count(F, self.keep, 1) > 0 and (sharded_count(F, self.dynamic, 1) > 0 or self.rest == "sketch"))

    def ffn_bytes(self, params: Params) -> list[int]:
        """Static rows (padded: `Method.read_rows`) + dynamic rows + the predictor (sketch or
        factors; the sketch's rows outside the core only where a batch of one `reads_outside`)
        in sparse layers; the oracle reads all."""
        F = params["layers"][0]["ffn"]["w_up"].shape[0]
        rows = gathered_rows(sharded_count(F, self.keep, self.shards), F, self.shards) + \
            sharded_count(F, self.dynamic, self.shards)
        sparse = set(self.sparse_layers())
        out = []
        for i, layer in enumerate(params["layers"]):
            ffn_params = layer["ffn"]
            if i not in sparse or self.select_by == "oracle":
                out.append(sum(w.nbytes for w in ffn_params.values()))
                continue
            ranked = F - sharded_count(F, self.keep, self.shards) if self.reads_outside(ffn_params, 1) else F
            if sharded_count(F, self.dynamic, self.shards) == 0 and self.rest == "zero":
                extra = 0  # no per-token choice: the predictor is never read
            elif self.select_by == "sketch":
                extra = sketch_bytes(ffn_params, down=self.rest == "sketch", neurons=None if ranked == F else ranked)
            else:
                extra = self.predictor.bytes_per_layer()
            if self.down_weighted:
                extra += ranked * 4  # float32 norms
            if self.compensate:  # the bias, and the means of the dynamic neurons (float32)
                w_down = ffn_params["w_down"]
                extra += (0 if "b_down" in ffn_params else w_down.shape[1] * w_down.dtype.itemsize) + \
                    sharded_count(F, self.dynamic, self.shards) * 4
            out.append(extra + sum(w.nbytes * rows // F if name in NEURON_ROWS else w.nbytes
                                   for name, w in ffn_params.items()))
        return out

    @property
    def label(self) -> str:
        """"hybrid 0.24+0.24 int4+rest normalized_magnitude" (static + dynamic, predictor and
        the rest's estimate, rule)."""
        how = {"oracle": "oracle", "sketch": "int4"}.get(self.select_by, f"r{self.rank}")
        how += "+rest" if self.rest == "sketch" else ""
        return f"{self.name} {self.keep:g}+{self.dynamic:g} {how} {self.rule}{self.options_label}{self.sharing_label}"

    def describe(self) -> dict[str, Any]:
        return dict(super().describe(), dynamic=self.dynamic, rank=self.rank, select_by=self.select_by, rest=self.rest)
