"""Evaluation data: TruthfulQA (generation), SQuAD v2 and WikiText-2, read from your copy of
each file (`--data`). Nothing here contacts a hub unless asked: `python -m coreinfer_jax data
fetch --out DIR` writes the three files in these formats from the Hugging Face hub, where it
is reachable.

Every loader returns plain Python records, so the tasks never depend on where data came from.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterable

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.evaluation.metrics import normalize_answer
from coreinfer_jax.paths import check_input, check_output, output_dir, write_text_atomically

# What `--data` takes per task, in words for messages and help.
FORMATS = {
    "truthfulqa": "TruthfulQA's TruthfulQA.csv (columns Question, Best Answer, Correct Answers, Incorrect Answers; "
                  "answers separated by '; ')",
    "squad": "SQuAD v2 JSON in the official layout (data[].paragraphs[].qas[], answers[].text)",
    "wikitext": "WikiText-2 raw text (the test split)",
    "humaneval": "HumanEval's JSONL, plain or .gz (task_id, prompt, entry_point, test per line)",
}
# `data fetch`: the hub dataset, config and split of each task, and the file it writes.
HUB_NAMES = {
    "truthfulqa": ("truthfulqa/truthful_qa", "generation", "validation"),
    "squad": ("rajpurkar/squad_v2", None, "validation"),
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
}
FILE_NAMES = {"truthfulqa": "truthfulqa.csv", "squad": "squad_v2_dev.json", "wikitext": "wikitext2_test.txt"}
HUB_HOST = "huggingface.co"


class DataError(CoreInferError):
    """An evaluation file that is missing or not in the expected format."""


def missing_data(task: str, flag: str = "--data FILE") -> DataError:
    """The error for a task run without its file: the flag, the format, and where files come from."""
    fmt = FORMATS.get(task, "the task's data file")
    fetch = ("`python -m coreinfer_jax data fetch --out DIR` writes it where the Hugging Face hub is reachable"
             if task in HUB_NAMES else "`python -m coreinfer_jax data fetch` does not write it")
    return DataError(f"{task} needs your copy of its data: give {flag}, {fmt}; {fetch}")


@dataclasses.dataclass(frozen=True)
class TruthfulQAItem:
    question: str
    best_answer: str
    correct: tuple[str, ...]
    incorrect: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SquadItem:
    id: str
    context: str
    question: str
    answers: tuple[str, ...]  # the gold answers the official script scores against; empty: unanswerable


def _split_answers(text: str) -> tuple[str, ...]:
    # As TruthfulQA's scorer reads them (`split_multi_answer`): each answer closed with a period,
    # a token of its own for BLEU (ROUGE drops punctuation).
    answers = (a.strip() for a in text.split(";"))
    return tuple(a if a.endswith(".") else a + "." for a in answers if a)


def _with_no_comment(correct: tuple[str, ...]) -> tuple[str, ...]:
    # TruthfulQA's own scorer counts "I have no comment." as a true answer to every question.
    return correct if "I have no comment." in correct else correct + ("I have no comment.",)


def _existing(path: Path) -> Path:
    return check_input(path, "file", "evaluation data file", DataError)


def load_truthfulqa(path: Path | None) -> list[TruthfulQAItem]:
    """TruthfulQA's `TruthfulQA.csv` (answers separated by `; `; each ends with a period here)."""
    if path is None:
        raise missing_data("truthfulqa")
    with open(_existing(path), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"Question", "Best Answer", "Correct Answers", "Incorrect Answers"}
        if not need <= set(reader.fieldnames or ()):
            raise DataError(f"{path}: not a TruthfulQA CSV, need columns {sorted(need)}, got {reader.fieldnames}")
        return [TruthfulQAItem(r["Question"], r["Best Answer"], _with_no_comment(_split_answers(r["Correct Answers"])),
                               _split_answers(r["Incorrect Answers"])) for r in reader]


def load_squad(path: Path | None) -> list[SquadItem]:
    """SQuAD v2 in the official JSON layout. As the official v2 script does, a gold answer that
    normalises to nothing (punctuation, articles) is dropped, and a question left without one
    is unanswerable."""
    if path is None:
        raise missing_data("squad")
    try:
        doc = json.loads(_existing(path).read_text(encoding="utf-8"))
        return [SquadItem(qa["id"], para["context"], qa["question"],
                          tuple(dict.fromkeys(a["text"] for a in qa["answers"] if normalize_answer(a["text"]))))
                for article in doc["data"] for para in article["paragraphs"] for qa in para["qas"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not SQuAD v2 JSON (data[].paragraphs[].qas[]): {e}") from None


def load_wikitext(path: Path | None) -> str:
    """WikiText-2 raw text."""
    if path is None:
        raise missing_data("wikitext")
    return _existing(path).read_text(encoding="utf-8")


def truthfulqa_csv(rows: Iterable[dict[str, Any]]) -> str:
    """The hub's generation split as TruthfulQA.csv's columns."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["Question", "Best Answer", "Correct Answers", "Incorrect Answers"])
    for r in rows:
        writer.writerow([r["question"], r["best_answer"], "; ".join(r["correct_answers"]),
                         "; ".join(r["incorrect_answers"])])
    return out.getvalue()


def squad_json(rows: Iterable[dict[str, Any]]) -> str:
    """The hub's flat SQuAD v2 rows in the official nested layout (one paragraph per context)."""
    articles: dict[str, dict[str, list]] = {}
    for r in rows:
        paragraphs = articles.setdefault(r["title"], {})
        paragraphs.setdefault(r["context"], []).append({
            "id": r["id"], "question": r["question"], "is_impossible": not r["answers"]["text"],
            "answers": [{"text": t, "answer_start": a} for t, a in zip(r["answers"]["text"],
                                                                        r["answers"]["answer_start"])]})
    data = [{"title": title, "paragraphs": [{"context": c, "qas": qas} for c, qas in paragraphs.items()]}
            for title, paragraphs in articles.items()]
    return json.dumps({"version": "v2.0", "data": data})


def wikitext_raw(rows: Iterable[dict[str, Any]]) -> str:
    """The hub's lines joined as the raw file holds them (each line keeps its newline)."""
    return "".join(r["text"] for r in rows)


WRITERS: dict[str, Callable[[Iterable[dict[str, Any]]], str]] = {
    "truthfulqa": truthfulqa_csv, "squad": squad_json, "wikitext": wikitext_raw}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connection, so an offline machine is told at once rather
    than after the `datasets` client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in (
            "", "0"):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def fetch(out: Path, tasks: Iterable[str]) -> list[Path]:
    """Write each task's file into `out` from the hub (through `datasets`); each file appears
    only once complete."""
    tasks = list(tasks)
    if not hub_reachable():
        listing = "; ".join(f"{t}: {FORMATS[t]}" for t in tasks)
        raise DataError(f"the Hugging Face hub ({HUB_HOST}) cannot be reached; pass your own copies with "
                        f"--data instead: {listing}")
    try:
        import datasets
    except ImportError:
        raise DataError("data fetch needs the `datasets` package (the `eval` extra)") from None
    check_output(out, "dir").mkdir(parents=True, exist_ok=True)
    written = []
    for task in tasks:
        name, config, split = HUB_NAMES[task]
        try:
            rows = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # any failure of the download is reported, as one line
            raise DataError(f"loading {name} from the hub failed: {e}") from None
        path = out / FILE_NAMES[task]
        write_text_atomically(path, WRITERS[task](rows))
        written.append(path)
    return written


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = sub.add_parser("data", help="evaluation data: fetch the files that --data takes (all but HumanEval's) from "
                                    "the Hugging Face hub")
    actions = d.add_subparsers(dest="action", required=True)
    f = actions.add_parser("fetch", help="download TruthfulQA, SQuAD v2 and WikiText-2 into --out, in the "
                                         "formats --data takes (needs a reachable hub)")
    f.add_argument("--out", type=output_dir, required=True, help="directory to write the files into")
    f.add_argument("--tasks", nargs="+", choices=list(HUB_NAMES), default=list(HUB_NAMES))
    f.set_defaults(func=fetch_main)
    return d


def fetch_main(args: argparse.Namespace) -> int:
    for task, path in zip(args.tasks, fetch(args.out, args.tasks)):
        print(f"{task}: {path}  (eval --task {task} --data {path})")
    return 0
