"""`python -m coreinfer_jax bench --compile-depths 8 16 32 48 80`: how long the compiled
programs take to build as a model gets deeper.

The layer loop of `forward` is unrolled (one copy of the layer per layer in the program), so
tracing, lowering and XLA's compile grow with depth. Each program is built ahead of time
(`jit(f).trace(...).lower().compile()`), timed stage by stage, and then run from that
executable, so the jit cache never serves a build this measures. Widths are tiny (the
`--shapes` family's `--tiny` config): depth is what varies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm

from coreinfer_jax.runtime import engine
from coreinfer_jax.runtime.batching import cache_length, cache_windows, prompt_bucket, stop_ids
from coreinfer_jax.runtime.sampling import Sampling
from coreinfer_jax.sparse.method import Dense, Method
from coreinfer_jax.tools.args import methods_from_args
from coreinfer_jax.tools.shapes import model_config, random_params, random_prompt

PROMPT_TOKENS, NEW_TOKENS = 47, 64


def _build(jitted: Any, *args: Any, **static: Any) -> tuple[Any, float, float]:
    """`(executable, trace + lower seconds, compile seconds)` of `jitted` for these arguments."""
    t0 = time.perf_counter()
    lowered = jitted.trace(*args, **static).lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def compile_seconds(shape: str, num_layers: int, method: Method, dtype: str = "float32") -> dict[str, Any]:
    """Build (and run once) pre-fill, the core-neuron gather and the decode loop of `shape`'s
    tiny config with `num_layers` layers; seconds per stage."""
    cfg, _ = model_config(shape, tiny=True, num_layers=num_layers)
    method = method.validate(cfg)
    params = random_params(cfg, dtype)
    prompt = random_prompt(cfg, PROMPT_TOKENS)
    bucket = prompt_bucket(len(prompt), cfg.max_position_embeddings)
    tokens = jnp.zeros((1, bucket), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt))  # [1, T]
    lengths = jnp.asarray([len(prompt)], jnp.int32)
    window = cache_windows(bucket, len(prompt), NEW_TOKENS)[0]
    tables = method.tables()
    row: dict[str, Any] = {"layers": num_layers, "method": method.label}

    prefill, row["prefill_lower_s"], row["prefill_compile_s"] = _build(
        engine.prefill, params, tokens, lengths, tables, cfg=cfg, method=method, cache_len=window)
    first_logits, cache, core = prefill(params, tokens, lengths, tables)
    # The gather is jitted inside `decode_weights`; timed whole (dense gathers nothing).
    t = time.perf_counter()
    weights = jax.block_until_ready(method.decode_weights(params, core))
    row["gather_s"] = time.perf_counter() - t
    static = dict(cfg=cfg, sampling=Sampling(), max_steps=cache_length(bucket, NEW_TOKENS) - bucket,
                  return_logits=False, ffn_fn=method.decode_ffn)
    args = (weights, first_logits, cache, lengths, jnp.full_like(lengths, NEW_TOKENS),
            stop_ids(cfg.eos_token_ids, cfg.vocab_size), jax.random.key(0))
    decode, row["decode_lower_s"], row["decode_compile_s"] = _build(engine.decode, *args, **static)
    jax.block_until_ready(decode(*args))
    return row


def markdown(shape: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"compile seconds vs depth: {shape} family at tiny width, {jax.devices()[0].device_kind}",
             "", "| layers | method | pre-fill trace+lower | pre-fill compile | gather (first call) "
             "| decode trace+lower | decode compile |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['method']} | {r['prefill_lower_s']:.2f} | {r['prefill_compile_s']:.2f} "
                     f"| {r['gather_s']:.2f} | {r['decode_lower_s']:.2f} | {r['decode_compile_s']:.2f} |")
    return "\n".join(lines)


def compile_main(args: argparse.Namespace) -> int:
    shape = args.shapes or "smollm2-135m"
    methods: list[Method] = [Dense(), *methods_from_args(args, args.keep or [0.4])]
    jobs = [(n, m) for n in args.compile_depths for m in methods]
    rows = [compile_seconds(shape, n, m, args.dtype or "float32")
            for n, m in tqdm(jobs, desc="compile vs depth", file=sys.stderr)]
    print(json.dumps(rows, indent=2) if args.json else markdown(shape, rows))
    return 0
