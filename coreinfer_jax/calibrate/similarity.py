"""Similarity-guided calibration, the procedure: sentence signatures, k-means clusters and,
per cluster, the core-neuron lists of every layer (`sparse.calibration.Calibration` holds the result).

    from coreinfer_jax.calibrate.similarity import calibrate, read_sentences
    cal = calibrate(gen, read_sentences("truthfulqa.csv"), clusters="auto")
    cal.save("calib/")                  # Calibration.load("calib/") reads it back
    python -m coreinfer_jax calibrate --checkpoint DIR --data truthfulqa.csv --out calib/

The method page's steps, over each sentence's real tokens:
  1. at one layer (the reference's 25 of 32, scaled to depth), the sentence's signature:
     per token the `round(0.4 * its positives)` largest activations are token-wise core;
     the `3000 * F / 16384` neurons core in the most tokens (3000 of OPT-6.7B's 16384, the
     reference's default model) form it;
  2. k-means of the multi-hot signatures, k given or `auto` (elbow of k = 1..10, at least 4);
  3. per cluster and layer, over all tokens of the cluster's OWN sentences (the reference
     accumulates clusters 0..c by mistake): per token its `floor(0.4 * mean positives)`
     largest activations, counted; neurons ranked by count. The method keeps the top
     `int(unique * keep)`; the stored list holds `int(F * keep)`, padded with the next
     neurons by count (ties in index order), so any inference keep up to `keep` reads its
     first `n_keep`.
The data is read twice: step 3's token limit depends on the cluster's mean positive count,
known only after clustering, and keeping every layer's activations in between would take
gigabytes.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from coreinfer_jax.calibrate.kmeans import check_clusters, choose_clusters
from coreinfer_jax.errors import CoreInferError, InputError
from coreinfer_jax.models.checkpoint import load_metadata
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.forward import forward, init_cache
from coreinfer_jax.models.params import Params
from coreinfer_jax.paths import check_input, check_replaceable, output_dir
from coreinfer_jax.runtime.batching import prompt_bucket
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.sparse.artifact import ARTIFACT_MARKS, model_identity
from coreinfer_jax.sparse.calibration import Calibration, CalibrationError, default_calibration_layer, signature_size
from coreinfer_jax.sparse.selection import SIMILARITY_TOKEN_FRACTION, n_keep_for, rank_bound, sentence_signature, token_core_counts

# first_pass(rows) -> (signatures bool [B, F], positives [B, L], tokens [B]) of those sentences.
FirstPass = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
# count_pass(rows, limits [B, L]) -> [B, L, F]: per layer, in how many of a sentence's tokens
# each neuron is among the token's `limits[b, layer]` largest activations.
CountPass = Callable[[np.ndarray, np.ndarray], np.ndarray]


def fit(batches: Sequence[np.ndarray], first_pass: FirstPass, count_pass: CountPass, *, model: dict[str, Any],
        layer: int, signature_size: int, clusters: int | str = "auto", keep: float = 1.0, seed: int = 0,
        data_sha256: str = "", progress: bool = True) -> Calibration:
    """Steps 1-3 over sentences served in `batches` (arrays of sentence indices, each index once).

    The passes compute what needs the activations (on the device, for a model); everything
    else, clustering included, happens here.
    """
    if not 0.0 < keep <= 1.0:
        raise CoreInferError(f"keep must be in (0, 1], got {keep}")
    n = sum(len(rows) for rows in batches)
    stats: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    with tqdm(total=n, desc="signatures", unit="sentence", disable=not progress, file=sys.stderr) as bar:
        for rows in batches:
            stats.append((rows, *first_pass(rows)))
            bar.update(len(rows))
    order = np.concatenate([s[0] for s in stats])
    if not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError("batches must cover sentences 0..N-1, each once")
    signatures, positives, tokens = (np.concatenate([s[i] for s in stats])[np.argsort(order)] for i in (1, 2, 3))
    signatures = signatures.astype(bool)  # [N, F]
    positives = positives.astype(np.int64)  # [N, L]

    fitted, inertias = choose_clusters(signatures.astype(np.float64), clusters, seed)
    labels, k = fitted.labels, len(fitted.centroids)
    cluster_positives = np.zeros((k, positives.shape[1]), np.int64)
    np.add.at(cluster_positives, labels, positives)
    cluster_tokens = np.bincount(labels, weights=tokens, minlength=k)  # [k]
    # Step 3's token limit, (0.4 * P) / T then floor as the reference's Python floats do.
    limits = np.floor(SIMILARITY_TOKEN_FRACTION * cluster_positives
                      / np.maximum(cluster_tokens, 1)[:, None]).astype(np.int32)  # [k, L]

    width = signatures.shape[1]
    counts = np.zeros((k, positives.shape[1], width), np.int64)  # [k, L, F]
    with tqdm(total=n, desc="neuron counts", unit="sentence", disable=not progress, file=sys.stderr) as bar:
        for rows in batches:
            np.add.at(counts, labels[rows], count_pass(rows, limits[labels[rows]]))
            bar.update(len(rows))
    ranked = np.argsort(-counts, axis=-1, kind="stable")  # [k, L, F], ties in index order
    return Calibration(
        model=model, layer=layer, keep=keep, signature_size=signature_size, data_sha256=data_sha256, seed=seed,
        inertias=inertias, centroids=fitted.centroids.astype(np.float32),
        neurons=ranked[..., : n_keep_for(width, keep)].astype(np.int32), labels=labels.astype(np.int32),
        signatures=signatures,
    )


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "size"))
def _signature_pass(params: Params, tokens: jnp.ndarray, lengths: jnp.ndarray, *, cfg: ModelConfig, layer: int,
                    size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Positive activations per layer over the real tokens `int32 [B, L]`, and the signature at
    `layer` `bool [B, F]`, of right-padded sentences `tokens` `[B, T]`."""
    B, T = tokens.shape
    valid = jnp.arange(T)[None, :] < lengths[:, None]  # [B, T]

    def select(i: int, activation: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        positives = jnp.sum((activation > 0) & valid[..., None], axis=(1, 2))  # [B]
        return positives, sentence_signature(activation, valid, size) if i == layer else None

    _, _, stats = forward(params, cfg, tokens, jnp.zeros((B,), jnp.int32),
                          init_cache(cfg, B, T, params["embed"].dtype), select=select, prefix=False)
    return jnp.stack([p for p, _ in stats], axis=1), stats[layer][1]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _count_pass(params: Params, tokens: jnp.ndarray, lengths: jnp.ndarray, limits: jnp.ndarray, *,
                cfg: ModelConfig) -> jnp.ndarray:
    """Per layer and neuron, in how many real tokens of each sentence it is among the token's
    `limits[b, layer]` largest activations: `int32 [B, L, F]`."""
    B, T = tokens.shape
    valid = jnp.arange(T)[None, :] < lengths[:, None]  # [B, T]
    k_max = rank_bound(cfg.intermediate_size)

    def select(i: int, activation: jnp.ndarray) -> jnp.ndarray:
        return token_core_counts(activation, jnp.where(valid, limits[:, i : i + 1], 0), k_max)  # [B, F]

    _, _, counts = forward(params, cfg, tokens, jnp.zeros((B,), jnp.int32),
                           init_cache(cfg, B, T, params["embed"].dtype), select=select, prefix=False)
    return jnp.stack(counts, axis=1)


def calibrate(gen: Generator, sentences: Sequence[str], *, layer: int | None = None, clusters: int | str = "auto",
              keep: float = 1.0, seed: int = 0, batch_size: int = 8, data_sha256: str = "",
              model_name: str | None = None, progress: bool = True) -> Calibration:
    """Calibrate the similarity-guided method for `gen` (a `Generator`) on `sentences`.

    `layer`: signature layer (default: the reference's 25 of 32, scaled to depth); `clusters`:
    k or "auto"; `keep`: the largest inference keep to serve. Sentences are batched by length
    (`batch_size` rows, each batch padded to a power-of-two length bucket).
    """
    cfg = gen.cfg
    layer = default_calibration_layer(cfg.num_layers) if layer is None else layer
    if not 0 <= layer < cfg.num_layers:
        raise CoreInferError(f"calibration layer {layer} is outside the model's {cfg.num_layers} layers")
    if batch_size < 1:
        raise CoreInferError(f"batch size must be >= 1, got {batch_size}")
    if isinstance(sentences, str):  # list() of it would be its characters
        raise CoreInferError("sentences must be a sequence of strings, not one string")
    sentences = list(sentences)
    check_clusters(clusters, len(sentences))  # before minutes of signatures, not after
    ids = gen.encode(sentences)
    context = cfg.max_position_embeddings
    if max(len(i) for i in ids) > context:
        raise InputError(f"a calibration sentence has {max(len(i) for i in ids)} tokens, more than the "
                         f"model's context of {context}")
    by_length = np.argsort([len(i) for i in ids], kind="stable")
    batches = [by_length[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    size = signature_size(cfg.intermediate_size)

    def pack(rows: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        # Always `batch_size` rows (spare rows: one padding token), so a bucket compiles once.
        bucket = prompt_bucket(max(len(ids[r]) for r in rows), context)
        tokens = np.zeros((batch_size, bucket), np.int32)
        lengths = np.ones(batch_size, np.int32)
        for j, r in enumerate(rows):
            tokens[j, : len(ids[r])] = ids[r]
            lengths[j] = len(ids[r])
        return jnp.asarray(tokens), jnp.asarray(lengths)

    def first_pass(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        positives, signatures = _signature_pass(gen.params, *pack(rows), cfg=cfg, layer=layer, size=size)
        n = len(rows)
        return np.asarray(signatures)[:n], np.asarray(positives)[:n], np.array([len(ids[r]) for r in rows])

    def count_pass(rows: np.ndarray, limits: np.ndarray) -> np.ndarray:
        padded = np.zeros((batch_size, cfg.num_layers), np.int32)
        padded[: len(rows)] = limits
        return np.asarray(_count_pass(gen.params, *pack(rows), jnp.asarray(padded), cfg=cfg))[: len(rows)]

    return fit(batches, first_pass, count_pass, model=model_identity(cfg, model_name), layer=layer,
               signature_size=size, clusters=clusters, keep=keep, seed=seed, data_sha256=data_sha256,
               progress=progress)


def truthfulqa_sentence(question: str, answer: str) -> str:
    """A calibration sentence as the reference builds it from TruthfulQA."""
    return "Question:" + question + "Answer:" + answer


def read_sentences(path: str | Path) -> list[str]:
    """Calibration sentences: a `.csv` with TruthfulQA's `Question` and `Best Answer` columns,
    or any other file as text, one sentence per non-empty line."""
    path = check_input(path, "file", "calibration data")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"Question", "Best Answer"} - set(reader.fieldnames or ())
            if missing:
                raise CalibrationError(f"{path}: a CSV needs TruthfulQA's 'Question' and 'Best Answer' columns; "
                                       f"missing {', '.join(sorted(missing))}")
            sentences = [truthfulqa_sentence(row["Question"], row["Best Answer"]) for row in reader]
    else:
        sentences = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not sentences:
        raise CalibrationError(f"{path} holds no sentences")
    return sentences


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def clusters_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clusters must be an integer or 'auto', got {text!r}") from None


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The `calibrate` subcommand (the caller adds the model arguments)."""
    p = sub.add_parser("calibrate", help="similarity-guided calibration: cluster sentence signatures, "
                                         "per-cluster core neurons")
    p.add_argument("--data", type=Path, required=True,
                   help="TruthfulQA CSV (Question, Best Answer) or a text file with one sentence per line")
    p.add_argument("--out", type=output_dir, required=True, help="calibration directory to write")
    p.add_argument("--layer", type=int, default=None,
                   help="signature layer (default: the reference's 25 of 32, scaled to depth)")
    p.add_argument("--clusters", type=clusters_arg, default="auto",
                   help="k, or auto: the elbow of the k-means inertia over k = 1..10, at least 4")
    p.add_argument("--keep", type=float, default=1.0,
                   help="largest keep the calibration serves (lists hold int(F * keep) neurons)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N sentences")
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--force", action="store_true", help="replace an earlier calibration at --out")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    check_replaceable(args.out, args.force, "calibration", ARTIFACT_MARKS, CalibrationError)
    if args.limit is not None and args.limit < 1:
        raise CoreInferError(f"--limit must be >= 1, got {args.limit}")
    sentences = read_sentences(args.data)[: args.limit]
    gen = Generator.load(args.checkpoint, args.dtype)
    t0 = time.perf_counter()
    cal = calibrate(gen, sentences, layer=args.layer, clusters=args.clusters, keep=args.keep, seed=args.seed,
                    batch_size=args.batch_size, data_sha256=file_sha256(args.data),
                    model_name=load_metadata(args.checkpoint).get("source"))
    cal.save(args.out, overwrite=args.force)
    curve = ", ".join(f"{k}: {v:.1f}" for k, v in cal.inertias.items())
    sizes = np.bincount(cal.labels, minlength=cal.clusters).tolist()
    print(f"{len(sentences)} sentences, signature layer {cal.layer} ({cal.signature_size} neurons), "
          f"{cal.clusters} clusters of {sizes}; inertia by k: {curve}; {time.perf_counter() - t0:.1f}s "
          f"-> {args.out}")
    return 0
