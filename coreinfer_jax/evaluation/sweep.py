"""`python -m coreinfer_jax sweep`: selection rules x keeps (+ a per-layer budget, + dense) on
each task, as one table and one quality-vs-bytes plot.

For every task the same examples are evaluated with dense decoding and with stability-guided
core neurons for every (rule, keep), plus the per-layer budget's rule at every keep when a
budget is given. Each row reports the task's headline metric (`evaluate.HEADLINE`), the FFN
bytes a decoded token reads, and the difference from the paper's rule at the same keep (so
at equal FFN bytes), with the standard error of the per-example paired differences
(TruthfulQA: ROUGE-L max per question; SQuAD: F1 per question; WikiText: NLL per token per
window): a difference within two standard errors is reported as noise (with one example
there is no standard error: n/a).

Writes `DIR/sweep.json` (every row and setting), `DIR/sweep.md`, `DIR/pareto.png` and
`DIR/records.jsonl` (every example's answer and scores, per row).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.evaluation.humaneval import PROMPT_FORMATS, check_code_execution
from coreinfer_jax.evaluation.evaluate import HEADLINE, PER_EXAMPLE, TASKS, Settings, evaluate, fmt_metric, paired
from coreinfer_jax.paths import output_dir, write_atomically, write_text_atomically
from coreinfer_jax.runtime.distributed import is_main_process
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.calibrate.predictor import default_predictor_dir
from coreinfer_jax.sparse.budget import Budget
from coreinfer_jax.sparse.hybrid import Hybrid
from coreinfer_jax.sparse.method import Dense, Method
from coreinfer_jax.sparse.predictor import Predictor
from coreinfer_jax.sparse.rules import RULES
from coreinfer_jax.sparse.stability import Stability
from coreinfer_jax.tools.args import hybrid_arg, layers_arg
from coreinfer_jax.tools.roofline import ffn_bytes_per_token

# A second metric shown in the table: TruthfulQA's "closer to a true than a false answer".
SECONDARY = {"truthfulqa": "rougeL_acc", "squad": "exact_match", "wikitext": "nll_per_token", "humaneval": "pass@1"}


def sweep_methods(rules: Sequence[str], keeps: Sequence[float], token_keep: float = 0.2,
                  layers: tuple[int, int] | None = None, budget: Budget | None = None,
                  hybrids: Sequence[Hybrid] = (), compensate: bool = False) -> list[Method]:
    """Dense, every (rule, keep) (with `compensate`, each also with FLAP-style compensation),
    then the budget's rule with its per-layer budget at every keep, then the `hybrids` (on
    `layers` too when given; else on their family's recommended layers).
    With a budget, every row uses the budget's sparse layers, so rows of one keep read the same
    bytes."""
    if budget is not None:
        if layers is not None and tuple(layers) != budget.layers:
            raise CoreInferError(f"--layers {layers[0]}:{layers[1]} but the budget is for "
                             f"{budget.layers[0]}:{budget.layers[1]}")
        layers = budget.layers
    methods: list[Method] = [Dense()]
    methods += [Stability(keep=k, token_keep=token_keep, layers=layers, rule=r, compensate=c)
                for r in rules for k in keeps for c in ((False, True) if compensate else (False,))]
    if budget is not None:
        methods += [dataclasses.replace(budget.method(k), token_keep=token_keep) for k in keeps]
    return methods + [dataclasses.replace(h, layers=layers or h.layers, token_keep=token_keep) for h in hybrids]


def task_rows(task: str, methods: Sequence[Method], results: Sequence[Any], records: Sequence[dict[str, Any]],
              ffn_bytes: Sequence[int]) -> list[dict[str, Any]]:
    """One row per method: headline metric, FFN bytes, and paired differences from the paper
    rule at the same keep (and, for a per-layer budget, from its own rule's uniform keep)."""
    metric, higher_is_better = HEADLINE[task]
    unit, score = PER_EXAMPLE[task]
    labels = [m.label for m in methods]
    scores = {lab: np.array([score(r) for r in records if r["label"] == lab]) for lab in labels}
    rows = []
    for m, lab, res, nbytes in zip(methods, labels, results, ffn_bytes):
        d = m.describe()
        row = {"task": task, "label": lab, "rule": d["rule"], "keep": d["keep"], "budget": d["layer_neurons"],
               "n": res.n, "metric": metric, "higher_is_better": higher_is_better, "value": res.metrics[metric],
               "secondary": SECONDARY[task], "secondary_value": res.metrics[SECONDARY[task]],
               "ffn_bytes_per_token": nbytes, "per_example_unit": unit, "metrics": res.metrics,
               "seconds": res.seconds}
        # Rule rows are compared with the paper's rule at the same keep, a budget with its uniform keep.
        references = {"paper": Stability(keep=d["keep"]).label} if d["method"] == "stability" else {}
        if d["layer_neurons"]:
            references["uniform"] = dataclasses.replace(m, layer_keep=None).label
        for name, ref in references.items():
            ref_res = next((r for r, lab2 in zip(results, labels) if lab2 == ref), None)
            if ref_res is None or ref == lab:
                continue
            mean, se = paired(scores[lab], scores[ref])
            row[f"delta_vs_{name}"] = res.metrics[metric] - ref_res.metrics[metric]
            row[f"paired_vs_{name}"] = {"mean": mean, "se": se, "z": mean / se if se else None}
        rows.append(row)
    return rows


def run_sweep(gen: Generator, tasks: Sequence[str], methods: Sequence[Method], data: dict[str, Path],
              limits: dict[str, int | None], settings: Settings, out: Path) -> dict[str, Any]:
    """Evaluate `methods` on every task and return the report. The outputs in `out` are
    rewritten after each task, so a long sweep that stops keeps the tasks it finished; in a
    `--coordinator` job only process 0 writes them (every process has the same report)."""
    methods = [gen.resolve(m) for m in methods]
    ffn_bytes = [ffn_bytes_per_token(gen.cfg, gen.params, m) for m in methods]
    report: dict[str, Any] = {"tasks": [], "settings": dataclasses.asdict(settings), "limits": limits,
                              "data": {k: str(v) for k, v in data.items()}, "rows": []}
    all_records: list[dict[str, Any]] = []
    writes = is_main_process()
    if writes:
        out.mkdir(parents=True, exist_ok=True)
    for task in tqdm(tasks, desc="sweep", unit="task"):
        records: list[dict[str, Any]] = []
        results = evaluate(gen, task, methods, data.get(task), limits.get(task), settings, records)
        report["tasks"].append(task)
        report["rows"] += task_rows(task, methods, results, records, ffn_bytes)
        all_records += records
        if writes:
            write_outputs(report, all_records, out)
    return report


def write_outputs(report: dict[str, Any], records: Sequence[dict[str, Any]], out: Path) -> None:
    """`sweep.json`, `sweep.md`, `pareto.png` and `records.jsonl` in `out`."""
    texts = {"sweep.json": json.dumps(report, indent=1) + "\n", "sweep.md": markdown(report),
             "records.jsonl": "".join(json.dumps(r) + "\n" for r in records)}
    for name, text in texts.items():
        write_text_atomically(out / name, text)
    write_atomically(out / "pareto.png", lambda tmp: plot(report, tmp))


def _noise(p: dict[str, float] | None, higher_is_better: bool) -> str:
    if p is None:
        return ""
    if p["se"] is None:
        return "n/a (n = 1)"
    if not abs(p["mean"]) > 2 * p["se"]:
        return "within noise"
    # The per-example score runs the same way as the headline (wikitext: NLL, lower is better).
    better = (p["mean"] > 0) == higher_is_better
    return "better" if better else "worse"


def markdown(report: dict[str, Any]) -> str:
    out = []
    for task in report["tasks"]:
        rows = [r for r in report["rows"] if r["task"] == task]
        r0 = rows[0]
        unit = r0["per_example_unit"]
        direction = "higher" if r0["higher_is_better"] else "lower"
        out += [f"### {task} (n = {r0['n']}; {r0['metric']}, {direction} is better)", "",
                f"| row | keep | FFN MB/token | {r0['metric']} | {r0['secondary']} | Δ vs paper rule "
                f"| paired Δ {unit} vs paper ± SE | vs paper |",
                "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            p = r.get("paired_vs_paper")
            delta = "" if "delta_vs_paper" not in r else f"{r['delta_vs_paper']:+.3g}"
            pair = "" if p is None else f"{p['mean']:+.4f} ± " + ("n/a" if p["se"] is None else f"{p['se']:.4f}")
            out.append(f"| {r['label']} | {r['keep']:g} | {r['ffn_bytes_per_token'] / 1e6:.1f} | {fmt_metric(r['value'])} "
                       f"| {fmt_metric(r['secondary_value'])} | {delta} | {pair} | {_noise(p, r0['higher_is_better'])} |")
        out.append("")
    return "\n".join(out)


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points `(bytes, quality)` no other point beats in both (fewer or equal
    bytes and better or equal quality, one strictly), sorted by bytes."""
    sign = 1.0 if higher_is_better else -1.0
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(x2 <= x and sign * y2 >= sign * y and (x2 < x or sign * y2 > sign * y)
                        for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot(report: dict[str, Any], path: Path) -> None:
    """One panel per task: headline metric against FFN MB read per decoded token, a line per
    rule (and per budgeted rule), dense as a reference, the Pareto front circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in report["rows"] if r["task"] == task]
        r0 = rows[0]
        series: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["rule"] is not None:
                series.setdefault(r["rule"] + (" + per-layer budget" if r["budget"] else ""), []).append(r)
        for name, rs in series.items():
            rs = sorted(rs, key=lambda r: r["ffn_bytes_per_token"])
            ax.plot([r["ffn_bytes_per_token"] / 1e6 for r in rs], [r["value"] for r in rs], marker="o", label=name,
                    linestyle="--" if "budget" in name else "-")
        dense = next((r for r in rows if r["rule"] is None), None)
        if dense is not None:
            ax.axhline(dense["value"], color="gray", linestyle=":", linewidth=1)
            ax.plot([dense["ffn_bytes_per_token"] / 1e6], [dense["value"]], "*", color="black", markersize=11,
                    label="dense")
        points = [(r["ffn_bytes_per_token"] / 1e6, r["value"]) for r in rows]
        front = pareto_front(points, r0["higher_is_better"])
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "o", markersize=14,
                markerfacecolor="none", markeredgecolor="crimson", label="Pareto front")
        ax.set_title(f"{task} (n = {r0['n']})")
        ax.set_xlabel("FFN MB read per decoded token")
        ax.set_ylabel(f"{r0['metric']} ({'higher' if r0['higher_is_better'] else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # `path` may be a temporary name
    plt.close(fig)


def data_arg(text: str) -> tuple[str, Path]:
    task, sep, path = text.partition("=")
    if not sep or task not in TASKS:
        raise argparse.ArgumentTypeError(f"--data takes TASK=FILE with TASK one of {', '.join(TASKS)}, got {text!r}")
    return task, Path(path)


def add_parser(sub: argparse._SubParsersAction, add_model_args: Callable) -> None:
    s = sub.add_parser("sweep", help="selection rules x keeps on each task: JSON + markdown table + Pareto plot")
    add_model_args(s)
    # HumanEval runs the model's code: only when named, with --allow-code-execution.
    s.add_argument("--tasks", nargs="+", choices=TASKS, default=[t for t in TASKS if t != "humaneval"])
    s.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES))
    s.add_argument("--keep", type=float, nargs="+", default=[0.4, 0.6])
    s.add_argument("--token-keep", type=float, default=0.2)
    s.add_argument("--layers", type=layers_arg, default=None,
                   help="sparse layers START:END (default: the paper's; with --budget the budget's; hybrid rows "
                        "without either: their family's recommended ones)")
    s.add_argument("--budget", type=Path, default=None,
                   help="also run the budget's rule with its per-layer budget (made by the budget command)")
    s.add_argument("--compensate", action="store_true",
                   help="also run each (rule, keep) row with FLAP-style compensation")
    s.add_argument("--hybrid", type=hybrid_arg, nargs="+", default=[], metavar="KEEP+DYNAMIC[:WORD]...",
                   help="also run hybrid rows: static core + per-token neurons (e.g. 0.25+0.25 0+0.5 "
                        "0.2+0.2:oracle 0.2+0.2:predictor 0.25+0.25:compensate; words: a rule, sketch, "
                        "predictor, oracle, compensate, down, rest=zero|sketch)")
    s.add_argument("--predictor", type=Path, default=None,
                   help="the low-rank predictor of the :predictor hybrid rows (default: CHECKPOINT/predictor)")
    s.add_argument("--data", type=data_arg, nargs="+", default=[], metavar="TASK=FILE",
                   help="a data file for each of --tasks (`python -m coreinfer_jax data fetch` writes "
                        "truthfulqa's, squad's and wikitext's)")
    s.add_argument("--limit", type=int, default=None, help="first N questions of truthfulqa and squad, problems of humaneval")
    s.add_argument("--windows", type=int, default=20, help="wikitext windows")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--max-new-tokens", type=int, default=None)
    s.add_argument("--zero-shot", action="store_true", help="no six-shot QA primer (truthfulqa), no one-shot example (squad)")
    s.add_argument("--context-tokens", type=int, default=256)
    s.add_argument("--scored-tokens", type=int, default=128)
    s.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="completion", help="humaneval's prompt format")
    s.add_argument("--allow-code-execution", action="store_true",
                   help="humaneval: run the model's code in the sandbox (docs/code_generation.md)")
    s.add_argument("--out", type=output_dir, required=True,
                   help="directory for sweep.json, sweep.md, pareto.png, records.jsonl")
    s.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    settings = Settings(args.batch_size, not args.zero_shot, args.max_new_tokens, args.context_tokens,
                        args.scored_tokens, args.prompt_format, args.allow_code_execution)
    if "humaneval" in args.tasks:  # before loading the model
        check_code_execution(args.allow_code_execution)
    budget = Budget.load(args.budget) if args.budget else None
    predictor = None
    if args.predictor is not None or any(h.get("select_by") == "predictor" for h in args.hybrid):
        predictor = Predictor.load(args.predictor or default_predictor_dir(args.checkpoint))
    hybrids = [Hybrid(predictor=predictor if h.get("select_by") == "predictor" else None, **h) for h in args.hybrid]
    methods = sweep_methods(args.rules, args.keep, args.token_keep, args.layers, budget, hybrids, args.compensate)
    gen = Generator.load(args.checkpoint, args.dtype, mesh=args.mesh)
    limits = {"truthfulqa": args.limit, "squad": args.limit, "wikitext": args.windows, "humaneval": args.limit}
    report = run_sweep(gen, args.tasks, methods, dict(args.data), limits, settings, args.out)
    if not is_main_process():
        return 0
    print(markdown(report))
    print(f"wrote {args.out / 'sweep.json'}, {args.out / 'sweep.md'}, {args.out / 'pareto.png'}, "
          f"{args.out / 'records.jsonl'}")
    return 0
