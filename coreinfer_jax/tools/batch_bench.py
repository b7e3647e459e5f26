"""`python -m coreinfer_jax bench --batch 1 2 4 8 16 32`: decode throughput at batch sizes, for
dense, per-row core neurons and one core set shared by the batch, next to the bytes each
decode step reads.

Per-row core sets are gathered per row (`[B, K, D]`): a step reads each row's copy, so the
FFN bytes grow with the batch and sparse decoding loses to dense (whose weights serve every
row) beyond a few rows. A batch-shared set (`share="batch"`) is gathered once (`[K, D]`) and
read once per step, as dense's are. Rows of a batch are different prompts (`BATCH_PROMPTS`,
cycled), as in a server; all rows decode the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tqdm import tqdm

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import Params
from coreinfer_jax.runtime.distributed import is_main_process
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.sparse.method import Dense, Method
from coreinfer_jax.tools.args import methods_from_args
from coreinfer_jax.tools.roofline import bandwidth_probe, bytes_per_token, decode_kv_slots, median
from coreinfer_jax.tools.shapes import model_config, random_params, random_prompt

BATCH_PROMPTS = [
    "The history of the Roman Empire spans many centuries, beginning with the founding of the city",
    "To bake a loaf of bread at home you need flour, water, salt and yeast, and a warm place where",
    "The stock market fell sharply on Monday after the central bank announced that interest rates",
    "Photosynthesis is the process by which green plants use sunlight to turn carbon dioxide and",
    "In the final minutes of the match the home team scored twice, and the crowd rose to its feet as",
    "def merge_sort(values):\n    if len(values) <= 1:\n        return values\n    middle = len(values) // 2\n",
    "The patient was admitted with a fever and a persistent cough, and the doctors ordered a chest",
    "Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker who",
]


def step_bytes(cfg: ModelConfig, params: Params, method: Method, kv_slots: float, batch: int) -> int:
    """Bytes one decode step of `batch` rows reads: the weights once, except the gathered core
    rows of a per-row method (once per row), and each row's KV cache."""
    one = bytes_per_token(cfg, params, method, kv_slots * batch)
    if not method.per_row_weights:
        return one
    sparse = method.ffn_bytes(params)
    per_row = sum(sparse[i] for i in method.sparse_layers())
    return one + (batch - 1) * per_row


def run_batch_bench(gen: Generator, methods: list[Method], batches: list[int], new_tokens: int = 64,
                    reps: int = 3) -> dict[str, Any]:
    """Decode tokens/s of all rows at each batch size, for dense and each of `methods`, with the
    bytes per step and the bound they imply; repetitions interleaved across rows, medians."""
    if reps < 1 or new_tokens < 2 or not batches or min(batches) < 1:
        raise CoreInferError(f"need --reps >= 1, --new-tokens >= 2 and batch sizes >= 1; got {reps}, {new_tokens}, "
                             f"{batches}")
    methods = [gen.resolve(m) for m in [Dense(), *methods]]
    if gen.tokenizer is None:  # random weights: random ids, as long as the prompts' ~20 tokens
        encoded = [random_prompt(gen.cfg, 20, seed=i) for i in range(len(BATCH_PROMPTS))]
    else:
        encoded = [gen.encode(p)[0] for p in BATCH_PROMPTS]
    cases = [(b, m) for b in batches for m in methods]

    def run(batch: int, m: Method) -> float:
        prompts = [encoded[i % len(encoded)] for i in range(batch)]
        return gen.generate_ids(prompts, new_tokens, method=m, stop_at_eos=False).decode_tokens_per_s

    for case in tqdm(cases, desc="compile", file=sys.stderr):
        run(*case)
    probe, bandwidths = bandwidth_probe(), []
    samples: dict[tuple[int, Method], list[float]] = {case: [] for case in cases}
    for _ in tqdm(range(reps), desc="bench --batch", file=sys.stderr):
        for case in cases:
            samples[case].append(run(*case))
        bandwidths.append(probe())
    bandwidth = median(bandwidths)
    kv = decode_kv_slots(max(map(len, encoded)), new_tokens, gen.cfg.max_position_embeddings)
    rows, dense_tps = [], {}
    for batch, m in cases:
        tps = median(samples[(batch, m)])
        nbytes = step_bytes(gen.cfg, gen.params, m, kv, batch)
        dense_tps.setdefault(batch, tps)  # dense is each batch's first case
        rows.append({"batch": batch, "method": m.label, "decode_tokens_per_s": tps,
                     "vs_dense": tps / dense_tps[batch], "bytes_per_step": nbytes,
                     "bound_tokens_per_s": bandwidth / nbytes * batch})
    return {"new_tokens": new_tokens, "reps": reps, "bandwidth_gb_s": bandwidth / 1e9, "rows": rows}


def batch_markdown(report: dict[str, Any]) -> str:
    lines = [f"decode throughput (all rows), {report['new_tokens']} new tokens per row, greedy, median of "
             f"{report['reps']}; read bandwidth {report['bandwidth_gb_s']:.1f} GB/s", "",
             "| batch | method | decode tok/s | vs dense | MB/step | tok/s bound |", "|---:|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch']} | {r['method']} | {r['decode_tokens_per_s']:.1f} | {r['vs_dense']:.2f} "
                     f"| {r['bytes_per_step'] / 1e6:.1f} | {r['bound_tokens_per_s']:.1f} |")
    return "\n".join(lines)


def shared_variants(methods: list[Method]) -> list[Method]:
    """Each method and, where it has one, its batch-shared twin."""
    out = []
    for m in methods:
        shared = m.batch_shared()
        out += [m] if shared is None else [m, shared]
    return out


def batch_main(args: argparse.Namespace) -> int:
    """`bench --batch`: the checkpoint (or `--shapes` with random weights), dense plus each sparse
    method per row and batch-shared."""
    methods = shared_variants(methods_from_args(args, args.keep or [0.4]))
    if args.shapes is not None:
        cfg, _ = model_config(args.shapes, args.tiny)
        gen = Generator(cfg, random_params(cfg, args.dtype or "float32"), tokenizer=None, mesh=args.mesh)
    else:
        gen = Generator.load(args.checkpoint, args.dtype, mesh=args.mesh)
    report = run_batch_bench(gen, methods, args.batch, args.new_tokens, args.reps)
    if is_main_process():  # a --coordinator job's processes measure together; one reports
        print(json.dumps(report, indent=2) if args.json else batch_markdown(report))
    return 0
