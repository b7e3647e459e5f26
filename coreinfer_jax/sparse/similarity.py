"""Similarity-guided core neurons: the prompt's signature picks a calibration cluster, whose
per-layer neuron lists serve every sparse layer."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp

from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import Params
from coreinfer_jax.sparse.calibration import Calibration, CalibrationError
from coreinfer_jax.sparse.method import CoreNeurons, resolve_layers
from coreinfer_jax.sparse.rules import top_neurons
from coreinfer_jax.sparse.selection import assign_clusters, check_fraction, sentence_signature, sharded_count


@dataclasses.dataclass(frozen=True)
class Similarity(CoreNeurons):
    """Similarity-guided core neurons: the prompt's signature at the calibration layer picks the
    nearest calibration cluster, whose neuron lists (the first `n_keep`) serve every sparse layer.

    `calibration` is a `Calibration` or its directory. It takes no part in equality and hashing:
    the compiled pre-fill depends only on the fields copied from it below (its arrays are
    traced arguments), so calibrations of the same shapes share one compile.

    `shards` and `share` (`method.CoreNeurons`) rank the neurons by their place in the
    cluster's list (unlisted ones last, in index order): shard-local, each shard keeps its own
    best-listed neurons; shared, the batch keeps the neurons listed highest over its rows'
    clusters (summed `list_length - rank`).
    """

    calibration: Calibration | str | Path = dataclasses.field(compare=False, repr=False)
    keep: float = 0.4
    layers: tuple[int, int] | None = None
    shards: int = 1
    share: str = "row"
    layer: int = dataclasses.field(init=False)
    signature_size: int = dataclasses.field(init=False)
    width: int = dataclasses.field(init=False)
    name: ClassVar[str] = "similarity"

    def __post_init__(self) -> None:
        check_fraction("keep", self.keep)
        cal = self.calibration if isinstance(self.calibration, Calibration) else Calibration.load(self.calibration)
        object.__setattr__(self, "calibration", cal)
        object.__setattr__(self, "layer", cal.layer)
        object.__setattr__(self, "signature_size", cal.signature_size)
        object.__setattr__(self, "width", cal.width)

    @property
    def n_keep(self) -> int:
        return sharded_count(self.width, self.keep, self.shards)

    def validate(self, cfg: ModelConfig) -> Similarity:
        """This method with `layers` resolved for `cfg`; raises if the calibration was made for
        another model or holds fewer than `n_keep` neurons per list."""
        self.calibration.check_model(cfg)
        layers = resolve_layers(self.layers, self.keep, cfg)
        self.check_sharing(cfg)
        if self.n_keep > self.calibration.list_length:
            raise CalibrationError(
                f"keep={self.keep} needs {self.n_keep} neurons per layer but the calibration stores "
                f"{self.calibration.list_length} (it was made with keep={self.calibration.keep}); "
                f"calibrate again with --keep {self.keep} or more")
        return dataclasses.replace(self, layers=layers)

    def selecting_layers(self) -> frozenset[int]:
        return frozenset({self.layer})

    def tables(self) -> Params:
        """Calibration `centroids` `[k, F]` and `neurons` `[k, num_layers, list_length]`."""
        return self.calibration.device_tables

    def select(self, activation: jnp.ndarray, valid: jnp.ndarray, tables: Params | None,
               layer: int | None, ffn: Params, voting: jnp.ndarray | None = None) -> jnp.ndarray:
        """Each prompt's cluster `int32 [B]`: the centroid nearest its signature over its
        `voting` tokens (`Method.select`); -1 for a row without one (one that only fills a mesh's
        data axis, which a shared set must not count)."""
        voting = valid if voting is None else voting
        signature = sentence_signature(activation, voting, self.signature_size)  # [B, F]
        return jnp.where(voting.any(1), assign_clusters(signature, tables["centroids"]), -1)

    def core_neurons(self, selected: list[jnp.ndarray], tables: Params | None) -> jnp.ndarray:
        return cluster_core_neurons(tables["neurons"], selected[0], method=self)

    @property
    def label(self) -> str:
        return f"{self.name} keep {self.keep:g}" + self.sharing_label


@functools.partial(jax.jit, static_argnames=("method",))
def cluster_core_neurons(neurons: jnp.ndarray, cluster: jnp.ndarray, *, method: Similarity) -> jnp.ndarray:
    """The first `n_keep` neurons of each sparse layer's list `[B, n_sparse, n_keep]` of each
    row's `cluster` `[B]`, from the calibration's `neurons` `[k, num_layers, list_length]`
    (with `shards` or `share`: the best-listed ones, see `Similarity`; a shared set ignores rows
    without a cluster, -1)."""
    first, end = method.layers
    with jax.named_scope("cluster_core_neurons"):
        if method.shards == 1 and method.share == "row":
            return jnp.take(neurons[:, first:end, : method.n_keep], cluster, axis=0)
        lists = jnp.take(neurons[:, first:end], jnp.maximum(cluster, 0), axis=0)  # [B, n_sparse, L]
        B, n_sparse, L = lists.shape
        ranked = jnp.arange(L, 0, -1, dtype=jnp.int32) * (cluster >= 0)[:, None]  # [B, L]: first listed scores L
        rank_score = jnp.broadcast_to(ranked[:, None], lists.shape)
        scores = jnp.zeros((B, n_sparse, method.width), jnp.int32).at[
            jnp.arange(B)[:, None, None], jnp.arange(n_sparse)[None, :, None], lists].set(rank_score)
        return jnp.stack([top_neurons(scores[:, j], method.n_keep, method.shards, method.share)
                          for j in range(n_sparse)], axis=1)  # [B, n_sparse, n_keep]
