"""Evaluation data: TruthfulQA (generation), SQuAD v2 and WikiText-2, from a local file or,
with no path, from the Hugging Face hub through `datasets` (when a hub is reachable).

Every loader returns plain Python records, so the tasks never depend on where data came from.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from coreinfer_jax.errors import CoreInferError

HUB_NAMES = {
    "truthfulqa": ("truthfulqa/truthful_qa", "generation", "validation"),
    "squad": ("rajpurkar/squad_v2", None, "validation"),
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
}


class DataError(CoreInferError):
    """An evaluation file that is missing or not in the expected format."""


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
    answers: tuple[str, ...]  # empty: unanswerable


def _split_answers(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(";") if a.strip())


def _with_no_comment(correct: tuple[str, ...]) -> tuple[str, ...]:
    # TruthfulQA's own scorer counts "I have no comment." as a true answer to every question.
    return correct if "I have no comment." in correct else correct + ("I have no comment.",)


def _hub(task: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"no --data file given for {task} and the `datasets` package is not installed") from None
    name, config, split = HUB_NAMES[task]
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise DataError(f"no --data file given for {task} and loading {name} from the hub failed: {e}") from None


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"evaluation data file not found: {path}")
    return path


def load_truthfulqa(path: Path | None = None) -> list[TruthfulQAItem]:
    """TruthfulQA's `TruthfulQA.csv` (answers separated by `; `), or the hub's generation split."""
    if path is None:
        return [TruthfulQAItem(r["question"], r["best_answer"], _with_no_comment(tuple(r["correct_answers"])),
                               tuple(r["incorrect_answers"])) for r in _hub("truthfulqa")]
    with open(_existing(path), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"Question", "Best Answer", "Correct Answers", "Incorrect Answers"}
        if not need <= set(reader.fieldnames or ()):
            raise DataError(f"{path}: not a TruthfulQA CSV, need columns {sorted(need)}, got {reader.fieldnames}")
        return [TruthfulQAItem(r["Question"], r["Best Answer"], _with_no_comment(_split_answers(r["Correct Answers"])),
                               _split_answers(r["Incorrect Answers"])) for r in reader]


def load_squad(path: Path | None = None) -> list[SquadItem]:
    """SQuAD v2 in the official JSON layout, or the hub's validation split."""
    if path is None:
        return [SquadItem(r["id"], r["context"], r["question"], tuple(dict.fromkeys(r["answers"]["text"])))
                for r in _hub("squad")]
    try:
        doc = json.loads(_existing(path).read_text(encoding="utf-8"))
        return [SquadItem(qa["id"], para["context"], qa["question"], tuple(dict.fromkeys(a["text"] for a in qa["answers"])))
                for article in doc["data"] for para in article["paragraphs"] for qa in para["qas"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not SQuAD v2 JSON (data[].paragraphs[].qas[]): {e}") from None


def load_wikitext(path: Path | None = None) -> str:
    """WikiText-2 raw text, or the hub's test split joined as the raw file is."""
    if path is None:
        return "".join(r["text"] for r in _hub("wikitext"))
    return _existing(path).read_text(encoding="utf-8")
