"""Evaluation data comes from the user's files (`--data`): without one, `eval` and `sweep` stop at
once, offline, in one line naming the flag and the format; `data fetch` writes the files in
the formats the loaders read, and offline says which files to pass instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_main
from coreinfer_jax.evaluation import data
from coreinfer_jax.evaluation.data import load_squad, load_truthfulqa, load_wikitext
from coreinfer_jax.tools.cli import main


@pytest.mark.parametrize("task,words", [("truthfulqa", "TruthfulQA.csv"), ("squad", "SQuAD v2 JSON"),
                                        ("wikitext", "WikiText-2 raw text")])
def test_eval_without_data_fails_at_once_in_one_line(tmp_path: Path, monkeypatch, task: str, words: str) -> None:
    # Any hub client would have to go through these; none may be called.
    import datasets
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    # A checkpoint that does not exist: the data is checked before any model is loaded.
    r = run_main(main, "eval", "--task", task, "--checkpoint", tmp_path / "no-model")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: {task} needs your copy of its data: give --data FILE, ")
    assert words in r.stderr and "data fetch" in r.stderr


def test_sweep_names_the_task_without_data(tmp_path: Path) -> None:
    wiki = tmp_path / "w.txt"
    wiki.write_text("text")
    r = run_main(main, "sweep", "--checkpoint", tmp_path / "no-model", "--tasks", "wikitext", "squad",
                 "--data", f"wikitext={wiki}", "--out", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "squad needs your copy of its data: give --data squad=FILE" in r.stderr
    assert not (tmp_path / "out").exists()


def test_the_loaders_do_not_reach_for_a_hub() -> None:
    for load in (load_truthfulqa, load_squad, load_wikitext):
        with pytest.raises(data.DataError, match="needs your copy of its data"):
            load(None)


def test_data_fetch_offline_lists_the_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run_main(main, "data", "fetch", "--out", tmp_path / "d")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "cannot be reached; pass your own copies with --data instead" in r.stderr
    assert all(data.FORMATS[t] in r.stderr for t in ("truthfulqa", "squad", "wikitext"))
    assert not (tmp_path / "d").exists()


# Rows as the hub's datasets hold them (their column names and nesting).
HUB_ROWS = {
    "truthfulqa": [{"question": "Can pigs fly?", "best_answer": "No, pigs cannot fly",
                    "correct_answers": ["No, pigs cannot fly", "No"], "incorrect_answers": ["Yes; they can"]},
                   {"question": 'What is "2, 3"?', "best_answer": "Two numbers", "correct_answers": ["Two numbers"],
                    "incorrect_answers": ["A word", "Nothing"]}],
    "squad": [{"id": "a", "title": "Cat", "context": "The cat sat on the mat.", "question": "Where is the cat?",
               "answers": {"text": ["on the mat", "the mat"], "answer_start": [12, 15]}},
              {"id": "b", "title": "Cat", "context": "The cat sat on the mat.", "question": "Who owns it?",
               "answers": {"text": [], "answer_start": []}},
              {"id": "c", "title": "Dog", "context": "A dog barks.", "question": "What barks?",
               "answers": {"text": ["A dog"], "answer_start": [0]}}],
    "wikitext": [{"text": ""}, {"text": " = Heading = \n"}, {"text": " Some text @-@ here . \n"}],
}


def test_data_fetch_writes_what_the_loaders_read(tmp_path: Path, monkeypatch) -> None:
    import datasets

    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, config, split: HUB_ROWS[next(t for t, h in data.HUB_NAMES.items() if h[0] == name)])
    r = run_main(main, "data", "fetch", "--out", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    files = {t: tmp_path / "d" / data.FILE_NAMES[t] for t in data.HUB_NAMES}
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(f.name for f in files.values())

    tqa = load_truthfulqa(files["truthfulqa"])
    assert [(i.question, i.best_answer) for i in tqa] == [("Can pigs fly?", "No, pigs cannot fly"),
                                                          ('What is "2, 3"?', "Two numbers")]
    assert tqa[0].correct == ("No, pigs cannot fly.", "No.", "I have no comment.")
    assert tqa[1].incorrect == ("A word.", "Nothing.")
    squad = load_squad(files["squad"])
    assert [(i.id, i.context, i.question, i.answers) for i in squad] == [
        ("a", "The cat sat on the mat.", "Where is the cat?", ("on the mat", "the mat")),
        ("b", "The cat sat on the mat.", "Who owns it?", ()),
        ("c", "A dog barks.", "What barks?", ("A dog",))]
    doc = json.loads(files["squad"].read_text())
    assert [a["title"] for a in doc["data"]] == ["Cat", "Dog"] and len(doc["data"][0]["paragraphs"]) == 1
    assert load_wikitext(files["wikitext"]) == " = Heading = \n Some text @-@ here . \n"
    assert f"eval --task squad --data {files['squad']}" in r.stdout
