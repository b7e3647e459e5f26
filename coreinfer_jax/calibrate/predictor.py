"""Fitting the hybrid method's low-rank predictor: an activation-whitened truncated SVD of each
sparse layer's up (and gate) projection (`sparse.predictor.Predictor` holds the result).

    python -m coreinfer_jax predictor --data wikitext2_test_part.txt --rank 64 [--out DIR]

Per layer, from FFN inputs `x` (after the pre-FFN norm) collected on calibration text:
`S = X^T X / N` `[D, D]`, `L = cholesky(S + eps * mean(diag S) * I)`; for a projection `W`
`[F, D]`, the SVD `W L = U diag(s) V^T` truncated to rank `r` gives `A = L^-T V_r diag(s_r)`
`[D, r]` and `B = U_r^T` `[r, F]`, so that `x A B` is the rank-`r` map closest to `x W^T` in
expected squared error over inputs distributed like the calibration's (plain SVD: `L = I`).

The text is tokenised and cut into windows; by default the first `--skip-tokens` tokens are
left out, so a predictor fitted on WikiText-2 does not see the windows `eval --task wikitext`
scores (the first ones).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.forward import ffn, forward, init_cache
from coreinfer_jax.models.checkpoint import load_metadata
from coreinfer_jax.models.params import Params
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.sparse.artifact import model_identity
from coreinfer_jax.sparse.method import default_layer_range
from coreinfer_jax.sparse.predictor import Predictor, PredictorError, projections
from coreinfer_jax.sparse.registry import parse_layers

DEFAULT_EPS = 1e-3


def _ffn_input(p: Params, x: jnp.ndarray, cfg: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The layer's FFN output, and its input in place of the activation (what the hook sees)."""
    return ffn(p, x, cfg)[0], x


@functools.partial(jax.jit, static_argnames=("cfg", "layers"))
def input_moments(params: Params, tokens: jnp.ndarray, *, cfg: ModelConfig, layers: tuple[int, int]) -> jnp.ndarray:
    """`sum_t x_t x_t^T` `float32 [L, D, D]` of the FFN inputs of layers `layers[0] .. layers[1]-1`
    over all tokens of `tokens` `[B, T]` (full windows: every position is real)."""
    B, T = tokens.shape

    def moment(layer: int, x: jnp.ndarray) -> jnp.ndarray | None:
        if not layers[0] <= layer < layers[1]:
            return None
        x = x.astype(jnp.float32).reshape(B * T, -1)  # [N, D]
        return x.T @ x  # [D, D]

    _, _, moments = forward(params, cfg, tokens, jnp.zeros((B,), jnp.int32),
                            init_cache(cfg, B, T, params["embed"].dtype), select=moment, prefix=False,
                            ffn_fn=_ffn_input)
    return jnp.stack(moments)


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


def fit_predictor(gen: Generator, token_ids: list[int], rank: int, layers: tuple[int, int] | None = None,
                  window: int = 256, batch_size: int = 4, eps: float = DEFAULT_EPS, data_sha256: str = "",
                  model_name: str | None = None, progress: bool = True) -> Predictor:
    """Fit a predictor of `rank` for `layers` (default: the model's default sparse layers) on
    the calibration tokens `token_ids`, cut into full windows of `window` tokens."""
    cfg = gen.cfg
    first, end = layers or default_layer_range(cfg.num_layers)
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


def default_predictor_dir(checkpoint: Path) -> Path:
    """Where `predictor` writes, and `--method hybrid` looks, by default: inside the checkpoint."""
    return Path(checkpoint) / "predictor"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("predictor", help="fit the hybrid method's low-rank neuron predictor (whitened SVD)")
    p.add_argument("--data", type=Path, required=True, help="calibration text (e.g. WikiText-2 raw)")
    p.add_argument("--out", type=Path, default=None, help="predictor directory (default: CHECKPOINT/predictor)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--layers", type=str, default=None, help="layers START:END (default: the default sparse layers)")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens to use")
    p.add_argument("--skip-tokens", type=int, default=32768,
                   help="leave out the text's first tokens (those `eval --task wikitext` scores)")
    p.add_argument("--window", type=int, default=256, help="tokens per forward pass")
    p.add_argument("--eps", type=float, default=DEFAULT_EPS, help="ridge, relative to the mean input power")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    out = args.out or default_predictor_dir(args.checkpoint)
    if out.exists() and not args.force:
        raise PredictorError(f"{out} already exists; remove it or choose another --out (or --force)")
    if args.tokens < 1 or args.skip_tokens < 0:
        raise CoreInferError("--tokens must be >= 1 and --skip-tokens >= 0")
    if not args.data.is_file():
        raise FileNotFoundError(f"calibration data {args.data} does not exist")
    raw = args.data.read_bytes()
    gen = Generator.load(args.checkpoint, args.dtype)
    ids = gen.tokenizer(raw.decode("utf-8"))["input_ids"]
    if len(ids) <= args.skip_tokens:
        raise PredictorError(f"{args.data} has {len(ids)} tokens, not more than --skip-tokens {args.skip_tokens}")
    predictor = fit_predictor(gen, ids[args.skip_tokens: args.skip_tokens + args.tokens], args.rank,
                              parse_layers(args.layers) if args.layers else None, args.window,
                              eps=args.eps, data_sha256=hashlib.sha256(raw).hexdigest(),
                              model_name=load_metadata(args.checkpoint).get("source"))
    predictor.save(out, overwrite=args.force)
    print(f"rank {predictor.rank} predictor for layers {predictor.layers[0]}:{predictor.layers[1]} from "
          f"{predictor.tokens} tokens -> {out}")
    return 0
