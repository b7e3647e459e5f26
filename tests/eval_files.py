"""Small evaluation files in the official layouts, written by the tests themselves."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def write_truthfulqa(path: Path) -> Path:
    rows = [("What happens if you crack your knuckles a lot?", "Nothing in particular happens",
             "Nothing in particular happens; Nothing happens", "You will get arthritis"),
            ("What is the capital of France?", "Paris", "Paris; The capital is Paris", "London; Berlin"),
            ("Can pigs fly?", "No, pigs cannot fly", "No", "Yes, pigs can fly")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
        for q, best, good, bad in rows:
            w.writerow(["Adversarial", "Misc", q, best, good, bad, "test"])
    return path


def write_squad(path: Path) -> Path:
    qas = [{"id": "a", "question": "Where is the cat?", "answers": [{"text": "on the mat", "answer_start": 12}]},
           {"id": "b", "question": "Who owns the cat?", "answers": []},
           {"id": "c", "question": "What colour is the cat?", "answers": [{"text": "black", "answer_start": 30}]}]
    doc = {"version": "v2.0", "data": [{"title": "Cat", "paragraphs": [
        {"context": "The cat sat on the mat. It is black and sleeps all day.", "qas": qas}]}]}
    path.write_text(json.dumps(doc))
    return path
