"""`python -m coreinfer_jax bench`: decode speed of Transformers PyTorch, this project dense,
and this project sparse, measured side by side in one run, next to the bytes-per-token bound.

Every row decodes the same prompt greedily for the same number of new tokens. Warm-up runs
(compilation) are excluded; repetitions are interleaved across rows so drift in machine
speed hits every row alike; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.sparse.method import Dense, Method
from coreinfer_jax.tools.args import methods_from_args
from coreinfer_jax.tools.profiling import maybe_profile
from coreinfer_jax.tools.roofline import bandwidth_probe, bytes_per_token, decode_kv_slots, median

BENCH_PROMPT = (
    "The history of the Roman Empire spans many centuries, beginning with the founding of the city "
    "and continuing through the republic, the age of the emperors, and the eventual division of the "
    "empire into eastern and western halves. In this essay we describe"
)


@dataclass
class Row:
    name: str
    decode_tokens_per_s: float
    prefill_ms: float | None
    bytes_per_token: int | None
    bound_tokens_per_s: float | None
    fraction_of_bound: float | None
    vs_torch: float | None = None
    vs_dense: float | None = None
    speedup_bound: float | None = None
    fraction_of_speedup_bound: float | None = None


class TorchRunner:
    """Transformers `generate` (greedy, eager-mode PyTorch) on the checkpoint's exact weights,
    with Transformers' `attention` implementation ("eager" or "sdpa")."""

    def __init__(self, checkpoint: Path, dtype: str | None, attention: str):
        import torch

        from convert import torch_model_from_checkpoint

        self.torch = torch
        self.model = torch_model_from_checkpoint(checkpoint, dtype, attention)

    def run(self, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
        """(pre-fill seconds, decode tokens/s), from timestamps Transformers' own loop gives us
        after each generated token (a stopping criterion that never stops): pre-fill ends with
        the first token, decode covers the remaining `new_tokens - 1`."""
        torch = self.torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stamps: list[float] = []

        class Clock(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        x = torch.tensor([prompt_ids])
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=0, eos_token_id=None, stopping_criteria=StoppingCriteriaList([Clock()]))
        assert len(stamps) == new_tokens, (len(stamps), new_tokens)
        return stamps[0] - t0, (new_tokens - 1) / (stamps[-1] - stamps[0])


def run_bench(checkpoint: Path, methods: list[Method], new_tokens: int = 128, reps: int = 5,
              torch_baseline: bool = True, dtype: str | None = None, prompt: str = BENCH_PROMPT,
              torch_attention: str = "eager") -> dict[str, Any]:
    if reps < 1:
        raise CoreInferError(f"--reps must be >= 1, got {reps}")
    if new_tokens < 2:
        raise CoreInferError(f"--new-tokens must be >= 2 (the first token comes from pre-fill, decode makes the "
                             f"rest), got {new_tokens}")
    gen = Generator.load(checkpoint, dtype)
    cfg, params = gen.cfg, gen.params
    prompt_ids = gen.encode(prompt)[0]
    methods = [m.validate(cfg) for m in methods]
    names = [(f"transformers-pytorch-{torch_attention}", None)] if torch_baseline else []
    names += [(label(m), m) for m in methods]
    labels = [n for n, _ in names]
    repeated = [n for n in labels if labels.count(n) > 1]
    if repeated:  # its samples would merge into one row
        raise CoreInferError(f"row {repeated[0]} is given twice (a repeated --keep?)")
    torch_runner = TorchRunner(checkpoint, dtype, torch_attention) if torch_baseline else None

    def jax_run(m: Method) -> tuple[float, float]:
        r = gen.generate_ids([prompt_ids], new_tokens, method=m, stop_at_eos=False)
        return r.prefill_s, r.decode_tokens_per_s

    runners = {n: (lambda m=m: jax_run(m)) if m is not None else (lambda: torch_runner.run(prompt_ids, new_tokens))
               for n, m in names}
    samples: dict[str, list[tuple[float, float]]] = {n: [] for n, _ in names}
    for n, _ in names:
        runners[n]()  # warm-up: compilation, first-touch allocation
    # The host's bandwidth drifts by tens of percent within minutes, so it is sampled
    # between the rows of every repetition, like the rows themselves.
    probe, bandwidths = bandwidth_probe(), []
    for _ in tqdm(range(reps), desc="bench", file=sys.stderr):
        for n, _ in names:
            samples[n].append(runners[n]())
            bandwidths.append(probe())

    bandwidth = median(bandwidths)
    kv_slots = decode_kv_slots(len(prompt_ids), new_tokens, cfg.max_position_embeddings)
    dense_bytes = bytes_per_token(cfg, params, Dense(), kv_slots)
    rows = []
    for n, m in names:
        tps = median([s[1] for s in samples[n]])
        prefill_ms = median([s[0] for s in samples[n]]) * 1e3
        b = bytes_per_token(cfg, params, m or Dense(), kv_slots)
        bound = bandwidth / b
        rows.append(Row(n, tps, prefill_ms, b, bound, tps / bound))
    torch_tps = rows[0].decode_tokens_per_s if torch_runner else None
    dense_row = next((r for r in rows if r.name == "jax-dense"), None)
    for r in rows:
        if torch_tps:
            r.vs_torch = r.decode_tokens_per_s / torch_tps
        if dense_row and r.name.startswith("jax-"):
            r.vs_dense = r.decode_tokens_per_s / dense_row.decode_tokens_per_s
            r.speedup_bound = dense_bytes / r.bytes_per_token
            r.fraction_of_speedup_bound = r.vs_dense / r.speedup_bound
    return {
        "checkpoint": str(checkpoint), "dtype": str(params["embed"].dtype), "prompt_tokens": len(prompt_ids),
        "new_tokens": new_tokens, "reps": reps, "bandwidth_gb_s": bandwidth / 1e9, "kv_slots_read": kv_slots,
        "rows": [asdict(r) for r in rows],
    }


def label(m: Method) -> str:
    """"jax-dense", "jax-stability-keep0.4", "jax-stability-keep0.4-magnitude+budget"."""
    return "jax-" + m.label.replace(" keep ", "-keep").replace(" ", "-")


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"decode, batch 1, {report['prompt_tokens']}-token prompt, {report['new_tokens']} new tokens, greedy, "
        f"{report['dtype']}, median of {report['reps']}; read bandwidth {report['bandwidth_gb_s']:.1f} GB/s; "
        f"{report['kv_slots_read']:.0f} KV-cache slots read per step (mean)",
        "",
        "| row | decode tok/s | vs torch | vs jax dense | speed-up bound | of bound | MB/token "
        "| tok/s bound | of bandwidth | pre-fill ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['decode_tokens_per_s']:.1f} | {_fmt(r['vs_torch'], '.2f')} "
            f"| {_fmt(r['vs_dense'], '.2f')} | {_fmt(r['speedup_bound'], '.2f')} "
            f"| {_fmt(r['fraction_of_speedup_bound'], '.0%')} | {r['bytes_per_token'] / 1e6:.1f} "
            f"| {r['bound_tokens_per_s']:.1f} | {r['fraction_of_bound']:.0%} | {r['prefill_ms']:.1f} |"
        )
    return "\n".join(lines)


def bench_main(args: argparse.Namespace) -> int:
    methods: list[Method] = [Dense()]
    if args.method != "dense":
        methods += methods_from_args(args, args.keep)
    with maybe_profile(args.profile):
        report = run_bench(args.checkpoint, methods, args.new_tokens, args.reps, not args.no_torch, args.dtype,
                           torch_attention=args.torch_attention)
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0
