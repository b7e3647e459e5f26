"""`python -m coreinfer_jax eval`: what sparse decoding costs in quality, on real tasks.

- `truthfulqa`: TruthfulQA generation as the paper runs it: the six-shot QA primer plus the
  question is pre-filled (so it chooses the core neurons), the answer is decoded greedily to
  the first newline and scored with BLEU and ROUGE-L against the true and false references.
- `squad`: SQuAD v2 reading comprehension: passage + question, a short greedy answer,
  normalised exact match and F1. Only answerable questions are scored: a 135M-class model
  with a free-form answer has no calibrated way to abstain, so unanswerable ones are
  counted (`skipped_unanswerable`) and left out.
- `wikitext`: perplexity where CoreInfer acts: consecutive non-overlapping windows; each
  window's first `context` tokens are pre-filled densely and choose the core neurons, the
  next `scored` tokens are scored teacher-forced with the sparse FFN (one jitted chunk per
  batch, `Generator.score_ids`). Every row scores the same tokens.
- `humaneval`: greedy code completion executed against the problem's tests in a sandbox
  (`evaluation.humaneval`, `evaluation.sandbox`): pass@1. Runs only with `--allow-code-execution`.

Each (method, keep) pair is one row: `{"task", "method", "keep", "n", "metrics"}`, and for the
sparse rows of a run with a dense row, the paired per-example difference from dense with its
standard error (`paired_vs_dense`).

It is long because the tasks share one loop over methods and rows, one record format and
one command line; each task's own prompts, stops and metrics live in their modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.evaluation import humaneval as he
from coreinfer_jax.evaluation.data import SquadItem, TruthfulQAItem, load_squad, load_truthfulqa, load_wikitext
from coreinfer_jax.evaluation.metrics import exact_match, f1_score, perplexity, truthfulqa_scores
from coreinfer_jax.evaluation.tasks import format_prompt, squad_prompt
from coreinfer_jax.paths import output_file, write_text_atomically
from coreinfer_jax.runtime.distributed import is_main_process
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.sparse.method import Dense, Method
from coreinfer_jax.tools.args import methods_from_args

TASKS = ("truthfulqa", "squad", "wikitext", "humaneval")
# The metric each task's "vs dense" column and the 5%-loss rule are judged by, and whether
# higher is better.
HEADLINE = {"truthfulqa": ("rougeL_max", True), "squad": ("f1", True), "wikitext": ("perplexity", False),
            "humaneval": ("pass@1", True)}
# The per-example score each task's paired differences are taken over, and the eval record
# fields it comes from.
PER_EXAMPLE: dict[str, tuple[str, Callable[[dict[str, Any]], float]]] = {
    "truthfulqa": ("rougeL_max", lambda r: r["rougeL_max"]),
    "squad": ("f1", lambda r: r["f1"]),
    "wikitext": ("nll/token", lambda r: r["nll"] / r["tokens"]),
    "humaneval": ("passed", lambda r: float(r["passed"])),
}


@dataclasses.dataclass
class EvalResult:
    task: str
    method: str
    keep: float
    n: int
    metrics: dict[str, float]
    token_keep: float | None = None
    layers: list[int] | None = None
    seconds: float = 0.0
    rule: str | None = None  # stability's selection rule
    layer_keep: list[int] | None = None  # stability's per-layer budget, neurons per sparse layer
    shards: int = 1  # shard-local selection over this many blocks (a tensor-parallel mesh's)
    share: str = "row"  # "batch": one core set per batch
    paired_vs_dense: dict[str, float | None] | None = None  # {"mean", "se"} of the per-example differences


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the per-example differences `a - b` (None for one example:
    one difference gives no estimate of its spread)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None


@dataclasses.dataclass(frozen=True)
class Settings:
    """How examples are turned into prompts and scored (the same for every row of a run)."""

    batch_size: int = 8
    few_shot: bool = True  # the six-shot QA primer (TruthfulQA), the one-shot example (SQuAD)
    max_new_tokens: int | None = None  # per-task default: 50 (truthfulqa), 24 (squad), 384 (humaneval)
    context_tokens: int = 256  # wikitext: pre-filled densely, chooses the core neurons
    scored_tokens: int = 128  # wikitext: scored with the sparse FFN
    prompt_format: str = "completion"  # humaneval: `completion` or `chat`
    allow_code_execution: bool = False  # humaneval runs the model's code (in a sandbox) only with this

    def __post_init__(self) -> None:
        for name in ("batch_size", "context_tokens", "scored_tokens"):
            if getattr(self, name) < 1:
                raise CoreInferError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise CoreInferError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.prompt_format not in he.PROMPT_FORMATS:
            raise CoreInferError(f"unknown prompt format {self.prompt_format!r}; "
                                 f"choose one of: {', '.join(he.PROMPT_FORMATS)}")


Progress = Callable[[int], None]


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def truthfulqa(gen: Generator, items: Sequence[TruthfulQAItem], method: Method, settings: Settings = Settings(),
               progress: Progress = lambda n: None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Mean `{bleu,rougeL}_{max,acc,diff}` over `items`, and each item's answer and scores."""
    records = []
    template = (lambda q: format_prompt("qa", q)) if settings.few_shot else (lambda q: f"Q: {q}\nA:")
    for batch in _batches(items, settings.batch_size):
        out = gen.generate([template(it.question) for it in batch], settings.max_new_tokens or 50, method=method,
                           stop_at_newline=True)
        for it, text in zip(batch, out.texts):
            answer = text.strip()
            records.append({"question": it.question, "answer": answer,
                            **truthfulqa_scores(answer, it.correct, it.incorrect)})
        progress(len(batch))
    return _mean([{k: v for k, v in r.items() if k not in ("question", "answer")} for r in records]), records


def squad(gen: Generator, items: Sequence[SquadItem], method: Method, settings: Settings = Settings(),
          progress: Progress = lambda n: None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Mean exact match and F1 (0..1) over the answerable `items`."""
    records = []
    for batch in _batches(items, settings.batch_size):
        prompts = [squad_prompt(it.context, it.question, settings.few_shot) for it in batch]
        out = gen.generate(prompts, settings.max_new_tokens or 24, method=method, stop_at_newline=True)
        for it, text in zip(batch, out.texts):
            answer = text.strip()
            records.append({"id": it.id, "answer": answer, "exact_match": exact_match(answer, it.answers),
                            "f1": f1_score(answer, it.answers)})
        progress(len(batch))
    return _mean([{"exact_match": r["exact_match"], "f1": r["f1"]} for r in records]), records


def wikitext_windows(gen: Generator, text: str, context: int = 256, scored: int = 128,
                     limit: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Consecutive non-overlapping `(context, scored)` token windows from the start of `text`."""
    ids = gen.tokenizer(text, add_special_tokens=False)["input_ids"]
    size = context + scored
    count = len(ids) // size if limit is None else min(limit, len(ids) // size)
    if count < 1:
        raise CoreInferError(f"text has {len(ids)} tokens, fewer than one window of {size}")
    return [(ids[i * size: i * size + context], ids[i * size + context: (i + 1) * size]) for i in range(count)]


def wikitext(gen: Generator, windows: Sequence[tuple[list[int], list[int]]], method: Method,
             settings: Settings = Settings(batch_size=4), progress: Progress = lambda n: None
             ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Perplexity of every window's scored tokens, given its densely pre-filled context."""
    records = []
    for batch in _batches(windows, settings.batch_size):
        scores = gen.score_ids([c for c, _ in batch], [s for _, s in batch], method)
        records += [{"nll": float(-lp.sum()), "tokens": len(lp)} for lp, _ in scores]
        progress(len(batch))
    nll, tokens = sum(r["nll"] for r in records), sum(r["tokens"] for r in records)
    return {"perplexity": perplexity(nll, tokens), "nll_per_token": nll / tokens, "tokens": float(tokens)}, records


def humaneval(gen: Generator, problems: Sequence[he.Problem], method: Method, settings: Settings = Settings(),
              progress: Progress = lambda n: None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """pass@1 of greedy completions, each executed with the problem's tests in the sandbox."""
    return he.humaneval(gen, problems, method, settings.batch_size, settings.max_new_tokens, settings.prompt_format,
                        settings.allow_code_execution, progress=progress)


def load_task(gen: Generator, task: str, data: Path | None, limit: int | None,
              settings: Settings = Settings()) -> tuple[Sequence[Any], dict[str, float]]:
    """The task's examples (first `limit`) and facts about the selection worth reporting."""
    if limit is not None and limit < 1:
        raise CoreInferError(f"limit must be >= 1, got {limit}")
    if task == "truthfulqa":
        return load_truthfulqa(data)[:limit], {}
    if task == "squad":
        items = load_squad(data)
        answerable = [it for it in items if it.answers]
        return answerable[:limit], {"skipped_unanswerable": float(len(items) - len(answerable))}
    if task == "wikitext":
        return wikitext_windows(gen, load_wikitext(data), settings.context_tokens, settings.scored_tokens, limit), {}
    if task == "humaneval":
        return he.load_humaneval(data)[:limit], {}
    raise CoreInferError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")


def evaluate(gen: Generator, task: str, methods: Sequence[Method], data: Path | None = None,
             limit: int | None = None, settings: Settings = Settings(),
             records: list[dict[str, Any]] | None = None) -> list[EvalResult]:
    """One `EvalResult` per method on the same examples; per-example records (answers,
    scores) are appended to `records` when given."""
    methods = [gen.resolve(m) for m in methods]
    labels = [m.label for m in methods]
    repeated = [lab for lab in labels if labels.count(lab) > 1]
    if repeated:  # its records would merge into one row's
        raise CoreInferError(f"row {repeated[0]!r} is given twice (a repeated --keep?)")
    examples, extra = load_task(gen, task, data, limit, settings)
    if not examples:
        skipped = f" ({extra['skipped_unanswerable']:.0f} unanswerable questions are not scored)" if extra else ""
        raise CoreInferError(f"no {task} example to score in {data or 'the dataset'}{skipped}")
    run = {"truthfulqa": truthfulqa, "squad": squad, "wikitext": wikitext, "humaneval": humaneval}[task]
    results = []
    _, score = PER_EXAMPLE[task]
    scores = []
    with tqdm(total=len(examples) * len(methods), desc=f"eval {task}", unit="ex") as bar:
        for m in methods:
            bar.set_postfix_str(m.label)
            t0 = time.perf_counter()
            metrics, rows = run(gen, examples, m, settings, bar.update)
            d = m.describe()
            results.append(EvalResult(task, d["method"], d["keep"], len(examples), {**metrics, **extra},
                                      d["token_keep"], d["layers"], time.perf_counter() - t0, d["rule"],
                                      d["layer_neurons"], d.get("shards", 1), d.get("share", "row")))
            scores.append([score(r) for r in rows])
            if records is not None:
                records += [{"task": task, "method": m.name, "keep": results[-1].keep, "label": m.label, **r}
                            for r in rows]
    dense = next((s for m, s in zip(methods, scores) if m.name == "dense"), None)
    for m, r, s in zip(methods, results, scores):
        if dense is not None and m.name != "dense":
            mean, se = paired(s, dense)
            r.paired_vs_dense = {"mean": mean, "se": se}
    return results


def relative_to_dense(results: Sequence[EvalResult]) -> list[float | None]:
    """Each row's headline metric relative to the dense row's (1.0 = no loss); None without a
    dense row or when the dense metric is 0 (`markdown` says which)."""
    dense = next((r for r in results if r.method == "dense"), None)
    out: list[float | None] = []
    for r in results:
        name, _ = HEADLINE[r.task]
        base = dense.metrics[name] if dense else None
        out.append(r.metrics[name] / base if base else None)
    return out


def within_loss(results: Sequence[EvalResult], tolerance: float = 0.05) -> float | None:
    """The smallest `keep` whose headline metric stays within `tolerance` (relative) of dense:
    at least `(1 - tolerance)` times dense's (at most `(1 + tolerance)` times, lower is better),
    which a row equal to a dense metric of 0 also meets. None without a dense row or a row within."""
    dense = next((r for r in results if r.method == "dense"), None)
    if dense is None:
        return None
    ok = []
    for r in results:
        name, higher_is_better = HEADLINE[r.task]
        value, base = r.metrics[name], dense.metrics[name]
        if r.method != "dense" and (value >= base * (1 - tolerance) if higher_is_better
                                    else value <= base * (1 + tolerance)):
            ok.append(r.keep)
    return min(ok) if ok else None


def markdown(results: Sequence[EvalResult]) -> str:
    names = [k for k in results[0].metrics if k not in ("tokens", "skipped_unanswerable")]
    headline, _ = HEADLINE[results[0].task]
    dense = next((r for r in results if r.method == "dense"), None)
    with_pairs = any(r.paired_vs_dense for r in results)
    pair_head = f" paired Δ {PER_EXAMPLE[results[0].task][0]} vs dense ± SE |" if with_pairs else ""
    lines = [f"| task | method | keep | n | {' | '.join(names)} | {headline} vs dense |{pair_head}",
             "|---|---|---:|---:|" + "---:|" * (len(names) + 1 + with_pairs)]
    for r, rel in zip(results, relative_to_dense(results)):
        cells = " | ".join(fmt_metric(r.metrics[k]) for k in names)
        if rel is not None:
            versus = f"{rel:.1%}"
        else:  # a ratio to 0 says nothing; without a dense row there is none
            versus = "n/a (dense 0)" if dense else ""
        pair = ""
        if with_pairs:
            p = r.paired_vs_dense
            pair = "" if p is None else f"{p['mean']:+.4f} ± " + ("n/a" if p["se"] is None else f"{p['se']:.4f}")
            pair = f" {pair} |"
        lines.append(f"| {r.task} | {r.method}{_variant(r)} | {r.keep:g} | {r.n} | {cells} | {versus} |{pair}")
    keep = within_loss(results)
    lines.append("")
    if dense is None:
        summary = "n/a (no dense row)"
    else:
        summary = "none" if keep is None else f"{keep:g}"
        if not dense.metrics[headline]:
            summary += f" (dense {headline} is 0: a row within is one that is not below it)"
    lines.append(f"smallest keep within 5% of dense {headline}: {summary}")
    return "\n".join(lines)


def _variant(r: EvalResult) -> str:
    sharing = (" shared" if r.share == "batch" else "") + (f" {r.shards} shards" if r.shards > 1 else "")
    if r.rule in (None, "paper") and not r.layer_keep:
        return sharing
    return f" {r.rule}" + (" +budget" if r.layer_keep else "") + sharing


def fmt_metric(x: float) -> str:
    return f"{x:.2f}" if abs(x) >= 10 or math.isinf(x) else f"{x:.3f}"


def add_parser(sub: argparse._SubParsersAction, add_model_args: Callable, add_method_args: Callable) -> None:
    e = sub.add_parser("eval", help="task quality of dense and sparse decoding (TruthfulQA, SQuAD, WikiText-2, "
                                    "HumanEval)")
    add_model_args(e)
    add_method_args(e, default="stability", several_keeps=True)
    e.add_argument("--task", choices=TASKS, required=True)
    e.add_argument("--data", type=Path, default=None,
                   help="the task's data file (TruthfulQA CSV, SQuAD v2 JSON, WikiText raw text, HumanEval "
                        "JSONL[.gz]); required: `python -m coreinfer_jax data fetch --out DIR` writes the first "
                        "three where the Hugging Face hub is reachable")
    e.add_argument("--limit", type=int, default=None,
                   help="first N examples (answerable questions for squad, windows for wikitext)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length cap (default: 50 for truthfulqa, 24 for squad, 384 for humaneval)")
    e.add_argument("--zero-shot", action="store_true",
                   help="no six-shot QA primer (truthfulqa), no one-shot example (squad)")
    e.add_argument("--context-tokens", type=int, default=256,
                   help="wikitext: tokens per window pre-filled densely (they choose the core neurons)")
    e.add_argument("--scored-tokens", type=int, default=128, help="wikitext: tokens per window scored sparse")
    e.add_argument("--prompt-format", choices=he.PROMPT_FORMATS, default="completion",
                   help="humaneval: the prompt as it is (completion) or in the chat template (chat)")
    e.add_argument("--allow-code-execution", action="store_true",
                   help="humaneval: run the model's code with the problem's tests in a sandbox (a separate "
                        "unprivileged, resource-limited process; not a container: docs/code_generation.md)")
    e.add_argument("--records", type=output_file, default=None,
                   help="also write every example's answer and scores (JSONL)")
    e.add_argument("--no-dense", action="store_true", help="skip the dense row (measured by default)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    e.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    settings = Settings(args.batch_size, not args.zero_shot, args.max_new_tokens, args.context_tokens,
                        args.scored_tokens, args.prompt_format, args.allow_code_execution)
    if args.task == "humaneval":  # before loading the model
        he.check_code_execution(args.allow_code_execution)
    sparse = methods_from_args(args, args.keep)
    methods: list[Method] = sparse if args.no_dense and sparse else [Dense(), *sparse]
    gen = Generator.load(args.checkpoint, args.dtype, mesh=args.mesh)
    records: list[dict[str, Any]] = []
    results = evaluate(gen, args.task, methods, args.data, args.limit, settings, records)
    if not is_main_process():  # every process of a --coordinator job has the same results; one reports them
        return 0
    if args.records:
        write_text_atomically(args.records, "".join(json.dumps(r) + "\n" for r in records))
    if args.json:
        rows = [dataclasses.asdict(r) for r in results]
        print(json.dumps(rows[0] if len(rows) == 1 else rows))
    else:
        print(markdown(results))
    return 0
