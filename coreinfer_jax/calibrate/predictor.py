"""Fitting the hybrid method's low-rank predictor: an activation-whitened truncated SVD of each
sparse layer's up (and gate) projection (`sparse.predictor.Predictor` holds the result).

    python -m coreinfer_jax predictor --data wikitext2_test_part.txt --rank 64 [--out DIR]

Per layer, from FFN inputs `x` (after the pre-FFN norm) collected on calibration text:
`S = X^T X / N` `[D, D]`, `L = cholesky(S + eps * mean(diag S) * I)`; for a projection `W`
`[F, D]`, the SVD `W L = U diag(s) V^T` truncated to rank `r` gives `A = L^-T V_r diag(s_r)`
`[D, r]` and `B = U_r^T` `[r, F]`, so that `x A B` is the rank-`r` map closest to `x W^T` in
expected squared error over inputs distributed like the calibration's (plain SVD: `L = I`).

With `--refine-steps N` (gated FFNs), optax then fits each layer's four factors to the FFN's
true hidden activations `act(x Wg^T) * (x Wu^T)` on calibration tokens (Adam, relative squared
error), starting from the SVD: the SVD fits gate and up separately, while the neurons are
ranked by their product. On SmolLM2 (12 WikiText-2 windows, static 0.2 + per-token 0.2,
rank 64) 300 steps took perplexity from 34.3 to 32.9 (dense 23.4). A ReLU FFN's predictor
scores the linear `fc1` output, for which the SVD is already the least-squares optimum.

The text is tokenised and cut into windows; by default the first `--skip-tokens` tokens are
left out, so a predictor fitted on WikiText-2 does not see the windows `eval --task wikitext`
scores (the first ones). Without `--layers` it covers the layers `--method hybrid` makes sparse
by default for the model, so that the two commands fit together with their defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import sys
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.forward import activation_fn, ffn, finished, forward, init_cache
from coreinfer_jax.models.checkpoint import load_metadata
from coreinfer_jax.models.params import Params
from coreinfer_jax.paths import check_input, check_output, check_replaceable, output_dir
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.sparse.artifact import ARTIFACT_MARKS, model_identity
from coreinfer_jax.sparse.hybrid import Hybrid
from coreinfer_jax.sparse.predictor import Predictor, PredictorError, projections

DEFAULT_EPS = 1e-3


def _ffn_input(p: Params, x: jnp.ndarray, cfg: ModelConfig,
               row_scale: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The layer's FFN output, and its input in place of the activation (what the hook sees)."""
    return ffn(p, x, cfg, row_scale)[0], finished(x, row_scale)


@functools.partial(jax.jit, static_argnames=("cfg", "layers"))
def ffn_inputs(params: Params, tokens: jnp.ndarray, *, cfg: ModelConfig, layers: tuple[int, int]) -> jnp.ndarray:
    """The FFN inputs `[L, B * T, D]` of layers `layers[0] .. layers[1]-1` for `tokens` `[B, T]`."""
    B, T = tokens.shape

    def take(layer: int, x: jnp.ndarray) -> jnp.ndarray | None:
        return x.reshape(B * T, -1) if layers[0] <= layer < layers[1] else None

    _, _, xs = forward(params, cfg, tokens, jnp.zeros((B,), jnp.int32), init_cache(cfg, B, T, params["embed"].dtype),
                       select=take, prefix=False, ffn_fn=_ffn_input)
    return jnp.stack(xs)


@functools.partial(jax.jit, static_argnames=("cfg", "layers"))
def input_moments(params: Params, tokens: jnp.ndarray, *, cfg: ModelConfig, layers: tuple[int, int]) -> jnp.ndarray:
    """`sum_t x_t x_t^T` `float32 [L, D, D]` of those FFN inputs, over every token of `tokens`
    (full windows: every position is real)."""
    xs = ffn_inputs(params, tokens, cfg=cfg, layers=layers).astype(jnp.float32)  # [L, N, D]
    return jnp.einsum("lnd,lne->lde", xs, xs)


def whitened_factors(w: np.ndarray, second_moment: np.ndarray, rank: int, eps: float = DEFAULT_EPS
                     ) -> tuple[np.ndarray, np.ndarray]:
    """`(A [D, r], B [r, F])` with `x A B` the best rank-`r` approximation of `x W^T` for inputs of
    second moment `S` (`w` `[F, D]`), in float64: see the module docstring."""
    w = np.asarray(w, np.float64)
    s = np.asarray(second_moment, np.float64)
    chol = np.linalg.cholesky(s + eps * np.mean(np.diag(s)) * np.eye(len(s)))  # L, S = L L^T
    u, sv, vt = np.linalg.svd(w @ chol, full_matrices=False)
    a = np.linalg.solve(chol.T, vt[:rank].T * sv[:rank])  # L^-T V_r diag(s_r), [D, r]
    return a.astype(np.float32), u[:, :rank].T.astype(np.float32)


def hybrid_layers(cfg: ModelConfig) -> tuple[int, int]:
    """The sparse layers `--method hybrid` uses for `cfg` when `--layers` is not given (its
    family's recommended range; how per-token neurons are chosen does not change it)."""
    return Hybrid(select_by="oracle").validate(cfg).layers


def fit_predictor(gen: Generator, token_ids: list[int], rank: int, layers: tuple[int, int] | None = None,
                  window: int = 256, batch_size: int = 4, eps: float = DEFAULT_EPS, data_sha256: str = "",
                  model_name: str | None = None, progress: bool = True) -> Predictor:
    """Fit a predictor of `rank` for `layers` (default: `hybrid_layers`, those the hybrid method
    makes sparse by default) on the calibration tokens `token_ids`, cut into full windows of
    `window` tokens."""
    cfg = gen.cfg
    first, end = layers or hybrid_layers(cfg)
    if not 0 <= first < end <= cfg.num_layers:
        raise PredictorError(f"layers {first}:{end} are outside the model's {cfg.num_layers} layers")
    if not 1 <= rank <= cfg.hidden_size:
        raise PredictorError(f"rank must be in 1..{cfg.hidden_size} (the model's hidden size), got {rank}")
    window = min(window, cfg.max_position_embeddings)
    # Whole batches of whole windows only: every forward pass has one shape (one compile).
    n_windows = len(token_ids) // (window * batch_size) * batch_size
    if n_windows * window < 4 * cfg.hidden_size:
        raise PredictorError(f"{len(token_ids)} calibration tokens are too few to whiten {cfg.hidden_size} "
                             f"dimensions; give at least {4 * cfg.hidden_size} tokens in windows of {window}")
    windows = np.asarray(token_ids[: n_windows * window], np.int32).reshape(n_windows, window)  # [W, T]
    moments = np.zeros((end - first, cfg.hidden_size, cfg.hidden_size), np.float64)
    with tqdm(total=n_windows, desc="FFN inputs", unit="window", disable=not progress, file=sys.stderr) as bar:
        for i in range(0, n_windows, batch_size):
            moments += np.asarray(input_moments(gen.params, jnp.asarray(windows[i: i + batch_size]), cfg=cfg,
                                                layers=(first, end)), np.float64)
            bar.update(batch_size)
    tokens = n_windows * window
    factors: dict[str, list[np.ndarray]] = {f"{k}_{p}": [] for p in projections(cfg.family) for k in "ab"}
    for j in tqdm(range(end - first), desc="whitened SVD", unit="layer", disable=not progress, file=sys.stderr):
        layer_ffn = gen.params["layers"][first + j]["ffn"]
        for proj in projections(cfg.family):
            a, b = whitened_factors(np.asarray(layer_ffn[f"w_{proj}"]), moments[j] / tokens, rank, eps)
            factors[f"a_{proj}"].append(a)
            factors[f"b_{proj}"].append(b)
    return Predictor(model=model_identity(cfg, model_name), rank=rank, layers=(first, end), data_sha256=data_sha256,
                     tokens=tokens, eps=eps, refine_steps=0,
                     factors={name: np.stack(f) for name, f in factors.items()})


def _relative_error(factors: Params, x: jnp.ndarray, hidden: jnp.ndarray, act) -> jnp.ndarray:
    predicted = act((x @ factors["a_gate"]) @ factors["b_gate"]) * ((x @ factors["a_up"]) @ factors["b_up"])
    return jnp.mean((predicted - hidden) ** 2) / jnp.mean(hidden ** 2)


def refine(gen: Generator, predictor: Predictor, token_ids: list[int], steps: int, lr: float = 3e-3,
           window: int = 256, batch_tokens: int = 1024, seed: int = 0, progress: bool = True) -> Predictor:
    """`predictor` with each layer's factors fitted by `steps` Adam steps (minibatches of
    `batch_tokens`) to the true hidden activations of the FFN inputs of `token_ids`."""
    cfg = gen.cfg
    if cfg.family == "opt":
        raise PredictorError("refinement is for gated FFNs; a ReLU FFN's SVD predictor is already least-squares")
    first, end = predictor.layers
    window = min(window, cfg.max_position_embeddings)
    n = len(token_ids) // window
    if n < 1:
        raise PredictorError(f"refinement needs at least one window of {window} tokens")
    windows = np.asarray(token_ids[: n * window], np.int32).reshape(n, window)
    xs = np.concatenate([np.asarray(ffn_inputs(gen.params, jnp.asarray(w[None]), cfg=cfg, layers=(first, end)))
                         for w in windows], axis=1)  # [L, N, D]
    act, tx = activation_fn(cfg), optax.adam(lr)

    @jax.jit
    def step(factors: Params, state: optax.OptState, x: jnp.ndarray, hidden: jnp.ndarray):
        loss, grads = jax.value_and_grad(_relative_error)(factors, x, hidden, act)
        updates, state = tx.update(grads, state, factors)
        return optax.apply_updates(factors, updates), state, loss

    rng = np.random.default_rng(seed)
    fitted = {name: f.copy() for name, f in predictor.factors.items()}
    for j in tqdm(range(end - first), desc="refine predictor", unit="layer", disable=not progress, file=sys.stderr):
        w = gen.params["layers"][first + j]["ffn"]
        x = jnp.asarray(xs[j])  # [N, D]
        hidden = act(x @ w["w_gate"].T) * (x @ w["w_up"].T)  # [N, F]
        factors = {name: jnp.asarray(f[j]) for name, f in predictor.factors.items()}
        state = tx.init(factors)
        for _ in range(steps):
            rows = rng.integers(0, x.shape[0], batch_tokens)
            factors, state, _ = step(factors, state, x[rows], hidden[rows])
        for name in fitted:
            fitted[name][j] = np.asarray(factors[name])
    return dataclasses.replace(predictor, factors=fitted, refine_steps=steps)


def default_predictor_dir(checkpoint: Path) -> Path:
    """Where `predictor` writes, and `--method hybrid` looks, by default: inside the checkpoint."""
    return Path(checkpoint) / "predictor"


def add_parser(sub: argparse._SubParsersAction, layers_arg: Callable[[str], tuple[int, int]]
               ) -> argparse.ArgumentParser:
    """The `predictor` subcommand; `layers_arg` parses `--layers` (the command line's parser)."""
    p = sub.add_parser("predictor", help="fit the hybrid method's low-rank neuron predictor (whitened SVD)")
    p.add_argument("--data", type=Path, required=True, help="calibration text (e.g. WikiText-2 raw)")
    p.add_argument("--out", type=output_dir, default=None, help="predictor directory (default: CHECKPOINT/predictor)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--layers", type=layers_arg, default=None,
                   help="layers START:END (default: those --method hybrid makes sparse for this model)")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens to use")
    p.add_argument("--skip-tokens", type=int, default=32768,
                   help="leave out the text's first tokens (the default: the first 85 windows of 256 + 128 tokens "
                        "that `eval --task wikitext` scores; eval without --limit scores the whole text)")
    p.add_argument("--window", type=int, default=256, help="tokens per forward pass")
    p.add_argument("--eps", type=float, default=DEFAULT_EPS, help="ridge, relative to the mean input power")
    p.add_argument("--refine-steps", type=int, default=0,
                   help="gated FFNs: optax steps fitting the factors to the true hidden activations (e.g. 300)")
    p.add_argument("--refine-tokens", type=int, default=8192, help="calibration tokens the refinement fits on")
    p.add_argument("--force", action="store_true", help="replace an earlier predictor at --out")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    out = args.out or check_output(default_predictor_dir(args.checkpoint), "dir")
    check_replaceable(out, args.force, "predictor", ARTIFACT_MARKS, PredictorError)
    if args.tokens < 1 or args.skip_tokens < 0 or args.refine_steps < 0 or args.refine_tokens < 1:
        raise CoreInferError("--tokens and --refine-tokens must be >= 1, --skip-tokens and --refine-steps >= 0")
    raw = check_input(args.data, "file", "calibration data").read_bytes()
    gen = Generator.load(args.checkpoint, args.dtype)
    ids = gen.tokenizer(raw.decode("utf-8"))["input_ids"]
    if len(ids) <= args.skip_tokens:
        raise PredictorError(f"{args.data} has {len(ids)} tokens, not more than --skip-tokens {args.skip_tokens}")
    predictor = fit_predictor(gen, ids[args.skip_tokens: args.skip_tokens + args.tokens], args.rank,
                              args.layers, args.window,
                              eps=args.eps, data_sha256=hashlib.sha256(raw).hexdigest(),
                              model_name=load_metadata(args.checkpoint).get("source"))
    if args.refine_steps:
        predictor = refine(gen, predictor, ids[args.skip_tokens: args.skip_tokens + args.refine_tokens],
                           args.refine_steps, window=args.window)
    predictor.save(out, overwrite=args.force)
    refined = f", refined by {predictor.refine_steps} optax steps" if predictor.refine_steps else ""
    print(f"rank {predictor.rank} predictor for layers {predictor.layers[0]}:{predictor.layers[1]} from "
          f"{predictor.tokens} tokens{refined} -> {out}")
    return 0
