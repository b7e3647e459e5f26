"""`python -m coreinfer_jax bench`: decode speed of Transformers PyTorch, this project dense,
this project sparse and, for the paper's own methods, the paper's PyTorch decoding of the same
core neurons, measured side by side in one run, next to the bytes-per-token bound.

Every row decodes the same prompt greedily for the same number of new tokens. Warm-up runs
(compilation) are excluded; repetitions are interleaved across rows so drift in machine
speed hits every row alike; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import jax
from tqdm import tqdm

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.runtime.distributed import is_main_process
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.sparse.method import Dense, Method
from coreinfer_jax.tools.args import methods_from_args
from coreinfer_jax.tools.profiling import maybe_profile
from coreinfer_jax.tools.roofline import bandwidth_probe, bytes_per_token, decode_kv_slots, median, padding_bytes
from coreinfer_jax.tools.shapes import HF_CONFIGS, ShapesError, model_config, random_params, random_prompt
from coreinfer_jax.tools.torch_baseline import TorchRunner, baseline_name, device_beside_jax, max_rss, paper_decodes

BENCH_PROMPT = (
    "The history of the Roman Empire spans many centuries, beginning with the founding of the city "
    "and continuing through the republic, the age of the emperors, and the eventual division of the "
    "empire into eastern and western halves. In this essay we describe"
)
RANDOM_PROMPT_TOKENS = 47  # as long as BENCH_PROMPT is in SmolLM2's tokenizer


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
    vs_paper: float | None = None  # a JAX row over the paper's PyTorch decoding of the same method,
    paper_row: str | None = None  # ... which is this row
    compile_s: float | None = None  # the first (warm-up) call's seconds minus the median timed call's
    peak_memory_bytes: int | None = None  # after the row's warm-up: see `peak_memory`
    peak_memory_kind: str | None = None


def peak_memory() -> tuple[int, str]:
    """`(bytes, kind)`: the default device's peak bytes in use where JAX reports it ("device
    peak"), else this process's maximum resident set ("process max RSS", e.g. on the CPU
    backend, where it includes Python, the libraries and any host copies). Both are peaks over
    the whole process so far, not per row."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak"
    return max_rss()


def check_run_settings(new_tokens: int, reps: int) -> None:
    if reps < 1:
        raise CoreInferError(f"--reps must be >= 1, got {reps}")
    if new_tokens < 2:
        raise CoreInferError(f"--new-tokens must be >= 2 (the first token comes from pre-fill, decode makes the "
                             f"rest), got {new_tokens}")


def run_bench(checkpoint: Path, methods: list[Method], new_tokens: int = 128, reps: int = 5,
              torch_baseline: bool = True, dtype: str | None = None, prompt: str = BENCH_PROMPT,
              torch_attention: str = "eager", mesh: str | None = None) -> dict[str, Any]:
    """The bench of a converted checkpoint: its tokenizer's `prompt`, Transformers on the same weights."""
    check_run_settings(new_tokens, reps)
    gen = Generator.load(checkpoint, dtype, mesh=mesh)
    baselines = transformers_row(torch_baseline, torch_attention,
                                 lambda device: TorchRunner.from_checkpoint(checkpoint, dtype, torch_attention, device))
    report = measure(gen, gen.encode(prompt)[0], methods, new_tokens, reps, baselines,
                     paper=next(iter(baselines), None))
    return {"checkpoint": str(checkpoint), "model": str(checkpoint), **report}


def run_random_bench(shape: str, methods: list[Method], new_tokens: int = 128, reps: int = 5,
                     torch_baseline: bool = False, dtype: str | None = None, tiny: bool = False,
                     torch_attention: str = "eager", mesh: str | None = None) -> dict[str, Any]:
    """The bench of a real model's shapes (`shapes.HF_CONFIGS`) with random weights made on the
    device, on a stand-in prompt of random ids; Transformers, where asked, on its own random
    initialisation of the same config (only speed is compared)."""
    check_run_settings(new_tokens, reps)
    dtype = dtype or "float32"
    cfg, hf = model_config(shape, tiny)
    gen = Generator(cfg, random_params(cfg, dtype), tokenizer=None, mesh=mesh)
    baselines = transformers_row(torch_baseline, torch_attention,
                                 lambda device: TorchRunner.from_hf_config(hf, dtype, torch_attention, device))
    report = measure(gen, random_prompt(cfg, RANDOM_PROMPT_TOKENS), methods, new_tokens, reps, baselines,
                     paper=next(iter(baselines), None))
    return {"model": f"{shape}{' (tiny)' if tiny else ''}, random weights", **report}


def transformers_row(wanted: bool, attention: str, make: Callable[[str], TorchRunner]) -> dict[str, TorchRunner]:
    """The Transformers row by name, made by `make(device)` on the device JAX runs on; none unless `wanted`."""
    if not wanted:
        return {}
    device = device_beside_jax()
    return {baseline_name(attention, device): make(device)}


def measure(gen: Generator, prompt_ids: list[int], methods: list[Method], new_tokens: int, reps: int,
            baselines: dict[str, TorchRunner], phase: Callable[[str], bool] = lambda name: True,
            probe: Callable[[], float] | None = None, paper: str | None = None) -> dict[str, Any]:
    """Every row decodes `prompt_ids` greedily for `new_tokens`: warm-up runs first, then
    `reps` repetitions interleaved across rows; medians. `baselines` are Transformers rows by
    name, the first the one `vs_torch` divides by. Where `paper` names one of them, each method
    the paper's code decodes (`paper_decodes`) adds a row of that model decoding as the paper's
    code does with the core neurons this project's pre-fill picks for the prompt
    (`TorchRunner.decoding_core_neurons`, after the JAX rows), and the JAX row its `vs_paper`.
    `phase` hears "warm:<row>" before each warm-up and "reps" before the timed repetitions (the
    device suite bounds each); a row whose warm-up it refuses (returns False) is left out.
    `probe` samples the read bandwidth (default: a new `bandwidth_probe()`)."""
    cfg, params = gen.cfg, gen.params
    methods = [gen.resolve(m) for m in methods]
    names: list[tuple[str, Method | None]] = [(n, None) for n in baselines]
    names += [(label(m), m) for m in methods]
    papers = {paper_label(paper, m): m for m in methods if paper in baselines and paper_decodes(m)}
    names += [(n, None) for n in papers]
    labels = [n for n, _ in names]
    repeated = [n for n in labels if labels.count(n) > 1]
    if repeated:  # its samples would merge into one row
        raise CoreInferError(f"row {repeated[0]} is given twice (a repeated --keep?)")

    def jax_run(m: Method) -> tuple[float, float]:
        r = gen.generate_ids([prompt_ids], new_tokens, method=m, stop_at_eos=False)
        return r.prefill_s, r.decode_tokens_per_s

    def paper_runner(m: Method) -> TorchRunner:
        """`paper`'s model decoding with the core neurons `m`'s pre-fill picks for the prompt."""
        core = gen.generate_ids([prompt_ids], new_tokens, method=m, stop_at_eos=False).core_neurons[0]  # [n_sparse, n]
        counts = m.layer_neurons(params["layers"][0]["ffn"]["w_up"].shape[0])
        return baselines[paper].decoding_core_neurons(
            {layer: ids[:count].tolist() for layer, ids, count in zip(m.sparse_layers(), core, counts)})

    def timed(n: str) -> tuple[float, float, float]:
        t = time.perf_counter()
        prefill_s, tps = runners[n]()
        return prefill_s, tps, time.perf_counter() - t

    torch_runners = dict(baselines)
    runners = {n: (lambda m=m: jax_run(m)) if m is not None
               else (lambda n=n: torch_runners[n].run(prompt_ids, new_tokens)) for n, m in names}
    samples: dict[str, list[tuple[float, float, float]]] = {n: [] for n, _ in names}
    first, memory = {}, {}
    for n, m in list(names):
        if not phase(f"warm:{n}"):
            names.remove((n, m))
            continue
        if n in papers:  # after its JAX row's warm-up, which compiled the programs this runs
            torch_runners[n] = paper_runner(papers[n])
        first[n] = timed(n)[2]  # warm-up: compilation, first-touch allocation
        memory[n] = peak_memory() if m is not None else torch_runners[n].peak_memory()
    # The host's bandwidth drifts by tens of percent within minutes, so it is sampled
    # between the rows of every repetition, like the rows themselves.
    probe, bandwidths = probe or bandwidth_probe(), []
    phase("reps")
    for _ in tqdm(range(reps), desc="bench", file=sys.stderr):
        for n, _ in names:
            samples[n].append(timed(n))
            bandwidths.append(probe())

    bandwidth = median(bandwidths) if bandwidths else math.nan  # nan: every row was left out
    kv_slots = decode_kv_slots(len(prompt_ids), new_tokens, cfg.max_position_embeddings)
    dense_bytes = bytes_per_token(cfg, params, Dense(), kv_slots)
    rows = []
    for n, m in names:
        tps = median([s[1] for s in samples[n]])
        prefill_ms = median([s[0] for s in samples[n]]) * 1e3
        if n in papers:  # the same neurons, without this project's padding rows
            b = bytes_per_token(cfg, params, papers[n], kv_slots) - padding_bytes(params, papers[n])
        else:
            b = bytes_per_token(cfg, params, m or Dense(), kv_slots)
        bound = bandwidth / b
        compile_s = max(0.0, first[n] - median([s[2] for s in samples[n]]))
        rows.append(Row(n, tps, prefill_ms, b, bound, tps / bound, compile_s=compile_s,
                        peak_memory_bytes=memory[n][0], peak_memory_kind=memory[n][1]))
    torch_row = next((r for r in rows if r.name in baselines), None)  # the first baseline measured
    torch_tps = torch_row.decode_tokens_per_s if torch_row else None
    dense_row = next((r for r in rows if r.name == "jax-dense"), None)
    for r in rows:
        if torch_tps:
            r.vs_torch = r.decode_tokens_per_s / torch_tps
        if dense_row and r.name.startswith("jax-"):
            r.vs_dense = r.decode_tokens_per_s / dense_row.decode_tokens_per_s
            r.speedup_bound = dense_bytes / r.bytes_per_token
            r.fraction_of_speedup_bound = r.vs_dense / r.speedup_bound
    by_name = {r.name: r for r in rows}
    for n, m in papers.items():
        if n in by_name and label(m) in by_name:
            ours = by_name[label(m)]
            ours.vs_paper, ours.paper_row = ours.decode_tokens_per_s / by_name[n].decode_tokens_per_s, n
    return {
        "dtype": str(params["embed"].dtype), "device": str(jax.devices()[0].device_kind),
        "prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "reps": reps, "bandwidth_gb_s": bandwidth / 1e9,
        "kv_slots_read": kv_slots, "rows": [asdict(r) for r in rows],
    }


def label(m: Method) -> str:
    """"jax-dense", "jax-stability-keep0.4", "jax-stability-keep0.4-magnitude+budget"."""
    return "jax-" + m.label.replace(" keep ", "-keep").replace(" ", "-")


def paper_label(baseline: str, m: Method) -> str:
    """"transformers-pytorch-eager-paper-stability-keep0.4": `baseline`'s model decoding `m` as
    the paper's code does."""
    return f"{baseline}-paper-{label(m).removeprefix('jax-')}"


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def _memory(r: dict[str, Any]) -> str:
    if r.get("peak_memory_bytes") is None:
        return ""
    return f"{r['peak_memory_bytes'] / 2**30:.2f} ({'RSS' if 'RSS' in r['peak_memory_kind'] else r['peak_memory_kind']})"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']} on {report['device']}: decode, batch 1, {report['prompt_tokens']}-token prompt, "
        f"{report['new_tokens']} new tokens, greedy, {report['dtype']}, median of {report['reps']}; "
        f"read bandwidth {report['bandwidth_gb_s']:.1f} GB/s; "
        f"{report['kv_slots_read']:.0f} KV-cache slots read per step (mean)",
        "",
        "| row | decode tok/s | vs torch | vs jax dense | speed-up bound | of bound | MB/token "
        "| tok/s bound | of bandwidth | pre-fill ms | compile s | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['decode_tokens_per_s']:.1f} | {_fmt(r['vs_torch'], '.2f')} "
            f"| {_fmt(r['vs_dense'], '.2f')} | {_fmt(r['speedup_bound'], '.2f')} "
            f"| {_fmt(r['fraction_of_speedup_bound'], '.0%')} | {r['bytes_per_token'] / 1e6:.1f} "
            f"| {r['bound_tokens_per_s']:.1f} | {r['fraction_of_bound']:.0%} | {r['prefill_ms']:.1f} "
            f"| {_fmt(r.get('compile_s'), '.1f')} | {_memory(r)} |"
        )
    against = [r for r in report["rows"] if r.get("vs_paper") is not None]
    if against:
        lines.append("")
    for r in against:
        lines.append(f"{r['name']} decodes {r['vs_paper']:.2f}x as fast as the paper's PyTorch code on the same core "
                     f"neurons ({r['paper_row']})")
    return "\n".join(lines)


def bench_main(args: argparse.Namespace) -> int:
    if not args.no_torch:  # Transformers may share a GPU with JAX (`device_beside_jax`): JAX takes
        # memory as it needs it, not most of the device (read when its first backend starts).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.random_weights and args.shapes is None:
        raise ShapesError(f"--random-weights needs --shapes NAME ({', '.join(HF_CONFIGS)})")
    if args.shapes is not None and not args.random_weights:
        raise ShapesError("--shapes needs --random-weights: no checkpoint of these models is read")
    if args.tiny and args.shapes is None:
        raise ShapesError("--tiny applies to --shapes, --suite and --compile-depths")
    if args.shapes is not None and args.method == "hybrid" and args.select_by == "predictor":
        raise ShapesError("--select-by predictor needs a predictor fitted to real weights; random weights have "
                          "none: use --select-by sketch (built from any weights) or oracle")
    methods: list[Method] = [Dense(), *methods_from_args(args, args.keep)]
    with maybe_profile(args.profile):
        if args.shapes is not None:
            report = run_random_bench(args.shapes, methods, args.new_tokens, args.reps, not args.no_torch,
                                      args.dtype, args.tiny, args.torch_attention, mesh=args.mesh)
        else:
            report = run_bench(args.checkpoint, methods, args.new_tokens, args.reps, not args.no_torch, args.dtype,
                               torch_attention=args.torch_attention, mesh=args.mesh)
    if is_main_process():  # a --coordinator job's processes measure together; one reports
        print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0
