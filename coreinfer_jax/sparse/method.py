"""The decoding-method protocol, and the dense method.

A method is a frozen (hashable) dataclass: it is a static argument of the jitted programs, so
one compile serves every prompt of a bucket. The runtime (pre-fill, gather, decode, offload)
and the accounting (roofline, bench, eval) ask a method these questions and never its type:

  pre-fill   `selecting_layers()`: the layers whose FFN activations it reads;
             `select(activation, valid, tables, layer, ffn)`: what it takes from one of them
             (`ffn`: that layer's FFN weights);
             `core_neurons(selected, tables)`: the per-layer results as core-neuron indices
             `int32 [B, n_sparse, n_max]` (None: nothing is kept), or a dict of them
             (`"ids"`) and more (compensation's bias); `neuron_ids(core)` the indices;
             `tables()`: arrays it needs there, passed as traced arguments (not static);
  gather     `prepare(params, cache)`: the method with what it derives from the weights, once
             per generator; `decode_weights(params, core)`: the decode-time param tree, built
             once per generation (the core neurons' rows gathered in the sparse layers);
  decode     `decode_ffn`: the FFN every decode step runs on those weights (hashable: a static
             argument of the decode loop), where a token-adaptive method picks neurons per
             token (`hybrid.Hybrid`); the others run `forward.ffn` and share one compiled loop;
             `offload_refusal()`: why memory-limited mode cannot serve it (None: it can);
  batches    `per_row_weights`: decode reads a gathered copy per row; `batch_shared()`: the
             method with one set for the whole batch (None: it has none);
  accounting `sparse_layers()`, `layer_neurons(width)` (static rows per sparse layer),
             `ffn_bytes(params)` (FFN weight bytes a decode step reads, per layer),
             `label` and `describe()` (how rows and JSON name it).

`Dense` reads nothing and keeps everything. `CoreNeurons` is the base of the CoreInfer
methods (`stability.Stability`, `similarity.Similarity`): a sparse layer range and a per-prompt
neuron set gathered once. A new method is one new class in one file, registered in
`registry.METHODS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

from coreinfer_jax.errors import MethodError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.forward import FFN, ffn
from coreinfer_jax.models.params import Params
from coreinfer_jax.sparse.compensation import with_bias
from coreinfer_jax.sparse.gather import NEURON_ROWS, gather_core_layers, gathered_rows
from coreinfer_jax.sparse.rules import check_share
from coreinfer_jax.sparse.selection import n_keep_for, sharded_count

# The paper sparsifies layers strictly between 5 and 27 of 32 (6..26); other depths scale.
_PAPER_START, _PAPER_END, _PAPER_DEPTH = 5, 27, 32


def default_layer_range(num_layers: int) -> tuple[int, int]:
    """Half-open `[first, end)` of sparse layers, the paper's 6..26 of 32 scaled to depth."""
    start = round(_PAPER_START * num_layers / _PAPER_DEPTH)
    end = round(_PAPER_END * num_layers / _PAPER_DEPTH)
    return start + 1, end


def resolve_layers(layers: tuple[int, int] | None, keep: float, cfg: ModelConfig) -> tuple[int, int]:
    """`layers`, or the default range for `cfg`'s depth; raises MethodError outside the model
    or when `keep` keeps no neuron."""
    first, end = layers or default_layer_range(cfg.num_layers)
    if end <= first:
        raise MethodError(f"sparse layer range {first}:{end} is empty: END must be greater than START "
                          f"(half-open: layers START .. END-1 are sparse)")
    if not 0 <= first < end <= cfg.num_layers:
        raise MethodError(
            f"sparse layer range {first}:{end} is outside the model's {cfg.num_layers} layers "
            f"(need 0 <= START < END <= {cfg.num_layers})"
        )
    if n_keep_for(cfg.intermediate_size, keep) < 1:
        raise MethodError(f"keep={keep} keeps no neuron of {cfg.intermediate_size}")
    return first, end


class Method:
    """The protocol (see the module docstring), with the answers of a method that keeps everything."""

    name: ClassVar[str]
    decode_ffn: ClassVar[FFN] = staticmethod(ffn)

    def offload_refusal(self) -> str | None:
        """Why memory-limited mode (which places only what `core_neurons` names on the device
        before decoding) cannot serve this method, or None."""
        return None

    def validate(self, cfg: ModelConfig) -> Method:
        """This method with every default resolved for `cfg`; raises MethodError if it cannot run on it."""
        return self

    def sharded(self, shards: int) -> Method:
        """This method for tensor parallelism over `shards` devices (`CoreNeurons`: shard-local
        selection); a method that keeps everything needs nothing."""
        return self

    def batch_shared(self) -> Method | None:
        """This method with one neuron set for the whole batch, or None if it has no such mode."""
        return None

    @property
    def per_row_weights(self) -> bool:
        """Whether decode reads a gathered copy of FFN rows per batch row (not shared weights)."""
        return False

    def sparse_layers(self) -> range:
        return range(0)

    def layer_neurons(self, width: int) -> tuple[int, ...]:
        """FFN neurons each sparse layer reads per decoded token, in `sparse_layers()` order."""
        return ()

    def read_rows(self, width: int) -> tuple[int, ...]:
        """FFN rows each sparse layer's decode step reads: `layer_neurons`, and the padding
        rows its gather adds."""
        return self.layer_neurons(width)

    def selecting_layers(self) -> frozenset[int]:
        return frozenset()

    def tables(self) -> Params | None:
        return None

    def select(self, activation: jnp.ndarray, valid: jnp.ndarray, tables: Params | None,
               layer: int | None, ffn: Params, voting: jnp.ndarray | None = None) -> jnp.ndarray:
        """What a selecting layer's activations `[B, T, F]` over `valid` `[B, T]` give, with that
        layer's FFN weights `ffn` at hand. `voting` `[B, T]` (default `valid`) are the tokens a
        set the batch shares is chosen by: a row that only fills a mesh's data axis has none.
        `layer` is None where one compiled program serves every layer (offload's streamed pre-fill)."""
        raise NotImplementedError(f"{type(self).__name__} selects in no layer")

    def core_neurons(self, selected: list[jnp.ndarray], tables: Params | None) -> jnp.ndarray | None:
        return None

    @staticmethod
    def neuron_ids(core: jnp.ndarray | dict[str, jnp.ndarray] | None) -> jnp.ndarray | None:
        """The core-neuron indices `[B, n_sparse, n_max]` of what `core_neurons` returned."""
        return core["ids"] if isinstance(core, dict) else core

    def decode_weights(self, params: Params, core: jnp.ndarray | None) -> Params:
        return params

    def ffn_bytes(self, params: Params) -> list[int]:
        """Per layer, the FFN weight bytes one decode step reads: a sparse layer's neuron-major
        tensors only their `read_rows` (integer arithmetic, so equal row totals give equal
        bytes), every other tensor whole."""
        F = params["layers"][0]["ffn"]["w_up"].shape[0]
        kept = dict(zip(self.sparse_layers(), self.read_rows(F)))
        return [sum(w.nbytes * kept.get(i, F) // F if name in NEURON_ROWS else w.nbytes
                    for name, w in layer["ffn"].items()) for i, layer in enumerate(params["layers"])]

    def prepare(self, params: Params, cache: dict) -> Method:
        """This method with what it derives from the weights (the hybrid's sketch), built once
        per `cache` (a generator keeps one)."""
        return self

    @property
    def label(self) -> str:
        """The row name in tables: the method, and what sets it apart from its defaults."""
        return self.name

    def describe(self) -> dict[str, Any]:
        """The settings for JSON output: `method`, `keep`, `token_keep`, `layers`, `rule`,
        `layer_neurons` (None where the method has no such setting)."""
        return {"method": self.name, "keep": 1.0, "token_keep": None, "layers": None, "rule": None,
                "layer_neurons": None}


@dataclasses.dataclass(frozen=True)
class Dense(Method):
    """Every neuron of every layer: reads nothing in pre-fill, gathers nothing."""

    name: ClassVar[str] = "dense"


class CoreNeurons(Method):
    """Base of the CoreInfer methods: in `sparse_layers()`, decode reads only the per-prompt core
    neurons that pre-fill chose, gathered once per generation. Subclasses are frozen
    dataclasses with `keep` and `layers` (half-open, resolved by `validate`), `shards` and
    `share` fields.

    `shards` N > 1 is shard-local selection (`rules.top_neurons`): each of N equal blocks of
    neurons keeps `int(F / N * keep)` of its own, so that under tensor parallelism over N
    devices the gather stays on the device holding the rows. `share="batch"` keeps one set for
    the whole batch, gathered once as `[K, D]` instead of `[B, K, D]`."""

    keep: float
    layers: tuple[int, int] | None
    shards: int
    share: str

    def check_sharing(self, cfg: ModelConfig, kept: float | None = None) -> None:
        """Raise MethodError unless `shards` divides the FFN width, each shard keeps a neuron of
        the fraction `kept` (default `keep`), and `share` is known."""
        check_share(self.share)
        if self.shards < 1 or cfg.intermediate_size % self.shards:
            raise MethodError(f"shards={self.shards} must be >= 1 and divide the FFN width {cfg.intermediate_size}")
        kept = self.keep if kept is None else kept
        if n_keep_for(cfg.intermediate_size // self.shards, kept) < 1:
            raise MethodError(f"keep={kept:g} keeps no neuron of a shard's {cfg.intermediate_size // self.shards}")

    def sharded(self, shards: int) -> CoreNeurons:
        """Shard-local selection over `shards` devices; a method already sharded otherwise is refused."""
        if self.shards not in (1, shards):
            raise MethodError(f"the method selects over shards={self.shards} but the mesh's tensor axis has {shards}")
        return dataclasses.replace(self, shards=shards)

    def batch_shared(self) -> CoreNeurons:
        return dataclasses.replace(self, share="batch")

    @property
    def per_row_weights(self) -> bool:
        return self.share != "batch"

    def sparse_layers(self) -> range:
        assert self.layers is not None, "call validate(cfg) first"
        return range(*self.layers)

    def layer_neurons(self, width: int) -> tuple[int, ...]:
        return (sharded_count(width, self.keep, self.shards),) * len(self.sparse_layers())

    def read_rows(self, width: int) -> tuple[int, ...]:
        return tuple(gathered_rows(n, width, self.shards) for n in self.layer_neurons(width))

    def decode_weights(self, params: Params, core: jnp.ndarray | dict[str, jnp.ndarray] | None) -> Params:
        """`params` with each sparse layer's FFN replaced by its core neurons `core[:, j]`
        (`[B, K, D]`; `[K, D]` of row 0 when the batch shares one set), plus the compensation
        bias when `core` has one.

        Only the FFNs of sparse layers enter the jitted gather: a jitted function returning the
        other weights would copy them (the whole model) on every generation.
        """
        sparse = self.sparse_layers()
        width = params["layers"][sparse[0]]["ffn"]["w_up"].shape[0]
        gathered = gather_core_layers([params["layers"][i]["ffn"] for i in sparse], self.neuron_ids(core),
                                      counts=self.layer_neurons(width), shards=self.shards,
                                      shared=self.share == "batch")
        if isinstance(core, dict):
            gathered = [with_bias(g, core["bias"][:, j]) for j, g in enumerate(gathered)]
        layers = list(params["layers"])
        for i, layer_ffn in zip(sparse, gathered):
            layers[i] = dict(layers[i], ffn=layer_ffn)
        return dict(params, layers=layers)

    @property
    def sharing_label(self) -> str:
        """" shared" / " 4 shards" / "": what the label adds for `share` and `shards`."""
        return (" shared" if self.share == "batch" else "") + (f" {self.shards} shards" if self.shards > 1 else "")

    def describe(self) -> dict[str, Any]:
        return dict(super().describe(), keep=self.keep, layers=list(self.layers) if self.layers else None,
                    shards=self.shards, share=self.share)
