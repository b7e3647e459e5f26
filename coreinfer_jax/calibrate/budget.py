"""Per-layer neuron budgets, the procedure: measure each sparse layer's sensitivity
(`sparse.budget.Budget` holds the result and allocates neurons by it).

Sensitivity of sparse layer j at keep k: the increase of the teacher-forced NLL per token on
calibration text (WikiText windows: a densely pre-filled context chooses the core neurons,
the next tokens are scored) when only layer j keeps its `int(F * k)` core neurons (by the
budget's rule) and every other layer is dense. A layer whose loss grows more gets more
neurons, in proportion to its sensitivity, with the same total as the uniform keep (so the
same FFN bytes per token). Each layer stays within [half, twice] the uniform count: the
sensitivity was measured at the uniform count and says little about a layer cut far below it.

`python -m coreinfer_jax budget --data wikitext.txt --rule normalized_magnitude --keep 0.4 0.6
--first-window 20 --out budget.json` writes the measurement; `--budget budget.json` on
generate/bench/eval/sweep turns it into `Stability(layer_keep=...)` for any measured keep.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.evaluation.data import load_wikitext
from coreinfer_jax.evaluation.evaluate import wikitext_windows
from coreinfer_jax.models.params import Params
from coreinfer_jax.paths import output_file, write_atomically
from coreinfer_jax.runtime import engine
from coreinfer_jax.runtime.batching import cache_length, prompt_bucket
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.sparse.budget import Budget
from coreinfer_jax.sparse.method import Dense
from coreinfer_jax.sparse.rules import RULES
from coreinfer_jax.sparse.stability import Stability


@jax.jit
def _without_dropped(w_down: jnp.ndarray, core: jnp.ndarray) -> jnp.ndarray:
    """`w_down` `[F, D]` with every row not in `core` `[K]` zeroed: the layer then computes
    exactly its core neurons' contribution, in the dense layout (one compile for all layers)."""
    keep = jnp.zeros(w_down.shape[0], w_down.dtype).at[core].set(1)  # [F]
    return w_down * keep[:, None]


def _with_layer_sparse(params: Params, layer: int, core: jnp.ndarray) -> Params:
    layers = list(params["layers"])
    ffn = layers[layer]["ffn"]
    layers[layer] = dict(layers[layer], ffn=dict(ffn, w_down=_without_dropped(ffn["w_down"], core)))
    return dict(params, layers=layers)


def measure(gen: Generator, windows: Sequence[tuple[list[int], list[int]]], rule: str, keeps: Sequence[float],
            layers: tuple[int, int] | None = None, token_keep: float = 0.2,
            progress: Callable[[int], None] = lambda n: None) -> Budget:
    """Per-layer sensitivities at each of `keeps` on `windows` `(context, scored)` of token ids.

    One window at a time (batch 1): the masked `w_down` is shared by the whole batch, and
    per-row core neurons would need a different weight tree per layer, i.e. a compile each.
    """
    cfg = gen.cfg
    probe = Stability(keep=keeps[0], token_keep=token_keep, layers=layers, rule=rule).validate(cfg)
    sparse = probe.sparse_layers()
    sums = {k: np.zeros(len(sparse)) for k in keeps}
    dense_nll, tokens = 0.0, 0
    for context, scored in windows:
        ids = jnp.asarray([context + [0] * (prompt_bucket(len(context), cfg.max_position_embeddings) - len(context))],
                          jnp.int32)  # [1, bucket]
        lengths = jnp.asarray([len(context)], jnp.int32)
        chunk = prompt_bucket(len(scored), cfg.max_position_embeddings)
        targets = jnp.asarray([scored + [0] * (chunk - len(scored))], jnp.int32)  # [1, chunk]
        cache_len = cache_length(ids.shape[1], chunk)

        def nll(weights: Params, first_logits: jnp.ndarray, cache) -> float:
            logprobs, _ = engine.score_continuation(weights, first_logits, cache, lengths, targets, cfg=cfg)
            return -float(np.asarray(logprobs)[0, : len(scored)].sum())

        first_logits, cache, _ = engine.prefill(gen.params, ids, lengths, cfg=cfg, method=Dense(),
                                                cache_len=cache_len)
        base = nll(gen.params, first_logits, cache)
        dense_nll, tokens = dense_nll + base, tokens + len(scored)
        for keep in keeps:
            method = dataclasses.replace(probe, keep=keep).validate(cfg)
            # The selecting pre-fill is dense; its logits and cache equal the dense pre-fill's.
            first_logits, cache, core = engine.prefill(gen.params, ids, lengths, cfg=cfg, method=method,
                                                       cache_len=cache_len)  # core [1, n_sparse, n_keep]
            for j, layer in enumerate(sparse):
                sums[keep][j] += nll(_with_layer_sparse(gen.params, layer, core[0, j]), first_logits, cache) - base
                progress(1)
    return Budget(rule=rule, layers=probe.layers, width=cfg.intermediate_size, token_keep=token_keep,
                  sensitivity={k: tuple(float(s / tokens) for s in sums[k]) for k in keeps},
                  dense_nll_per_token=dense_nll / tokens, windows=len(windows))


def add_parser(sub: argparse._SubParsersAction, layers_arg: Callable[[str], tuple[int, int]]
               ) -> argparse.ArgumentParser:
    """The `budget` subcommand; `layers_arg` parses `--layers` (the command line's parser)."""
    b = sub.add_parser("budget", help="measure per-layer sensitivities and write a per-layer neuron budget")
    b.add_argument("--data", type=Path, required=True, help="your copy of WikiText-2 raw text")
    b.add_argument("--rule", choices=list(RULES), default="paper", help="the selection rule the budget is for")
    b.add_argument("--keep", type=float, nargs="+", default=[0.4], help="uniform keeps to measure at")
    b.add_argument("--token-keep", type=float, default=0.2)
    b.add_argument("--layers", type=layers_arg, default=None, help="sparse layers START:END (default: the paper's)")
    b.add_argument("--windows", type=int, default=8, help="calibration windows")
    b.add_argument("--first-window", type=int, default=20,
                   help="skip this many windows (default 20: those `sweep` evaluates on)")
    b.add_argument("--context-tokens", type=int, default=256)
    b.add_argument("--scored-tokens", type=int, default=128)
    b.add_argument("--out", type=output_file, required=True, help="budget JSON to write")
    b.set_defaults(func=main)
    return b


def main(args: argparse.Namespace) -> int:
    if args.windows < 1 or args.first_window < 0:
        raise CoreInferError("--windows must be >= 1 and --first-window >= 0")
    gen = Generator.load(args.checkpoint, args.dtype)
    windows = wikitext_windows(gen, load_wikitext(args.data), args.context_tokens, args.scored_tokens,
                               args.first_window + args.windows)[args.first_window:]
    if not windows:
        raise CoreInferError(f"the text has no windows after the first {args.first_window}")
    n_sparse = len(Stability(layers=args.layers).validate(gen.cfg).sparse_layers())
    with tqdm(total=len(windows) * len(args.keep) * n_sparse, desc="budget", unit="layer") as bar:
        budget = measure(gen, windows, args.rule, args.keep, args.layers, args.token_keep, bar.update)
    write_atomically(args.out, budget.save)  # an interrupt never leaves half a file
    for k in args.keep:
        print(f"keep {k:g}: layers {budget.layers[0]}..{budget.layers[1] - 1} neurons "
              f"{','.join(map(str, budget.layer_neurons(k)))}")
    return 0

