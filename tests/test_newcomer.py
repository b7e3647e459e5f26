"""The recipes the docs chain together, each run with default options on a tiny random model,
as a newcomer runs them: convert -> generate; calibrate -> --method similarity; budget ->
--budget; predictor -> --method hybrid; sweep -> its plot. A chain fails when the defaults of
its two commands drift apart.

The model has 8 layers, so that the paper's default sparse range (2:7, what stability and
budget use) and the hybrid method's (1:8) differ: a predictor fitted for the wrong one does
not serve `--method hybrid`. Its 1024-token context holds the default window sizes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from conftest import SENTENCES, TINY_CONFIGS, randomise, run_main
from convert.__main__ import main as convert_main
from coreinfer_jax.sparse.budget import Budget
from coreinfer_jax.sparse.calibration import Calibration
from coreinfer_jax.sparse.predictor import Predictor
from coreinfer_jax.tools.cli import main
from eval_files import write_squad

QUESTION = "What is the tallest mountain in the world?"


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    return run_main(main, *args)


@pytest.fixture(scope="module")
def deep_hf_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    cls, kwargs = TINY_CONFIGS["llama"]
    config = cls(**{**kwargs, "num_hidden_layers": 8, "max_position_embeddings": 1024}, vocab_size=len(tiny_tokenizer),
                 pad_token_id=tiny_tokenizer.pad_token_id, bos_token_id=tiny_tokenizer.bos_token_id,
                 eos_token_id=tiny_tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    randomise(model, seed=0)
    path = tmp_path_factory.mktemp("hf_deep")
    model.eval().save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpt(deep_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Chain 1's first half: `python -m convert SOURCE --out DIR` (the one option a non-bundled source needs)."""
    out = tmp_path_factory.mktemp("deep") / "ckpt"
    done = run_main(convert_main, deep_hf_dir, "--out", out)
    assert done.returncode == 0 and done.stdout == f"wrote {out}\n", done.stderr
    return out


@pytest.fixture(scope="module")
def wikitext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Enough text for the predictor's defaults (32768 tokens skipped, 16384 fitted) and the
    # budget's (windows 20..27 of 256 + 128 tokens).
    lines = [f" = Section {i} =\n" + " ".join(SENTENCES[i % len(SENTENCES):] + SENTENCES[:i % len(SENTENCES)]) + "\n"
             for i in range(200)]
    path = tmp_path_factory.mktemp("data") / "wikitext.txt"
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def truthfulqa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Twelve questions: `calibrate --clusters auto` (the default) needs at least four sentences.
    import csv

    path = tmp_path_factory.mktemp("data") / "truthfulqa.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
        for i, sentence in enumerate(SENTENCES[:12]):
            w.writerow(["Adversarial", "Misc", f"What does sentence {i} say?", sentence, sentence, "Nothing", "test"])
    return path


def generated(*args: str | Path) -> dict:
    run = cli("generate", *args, "--max-new-tokens", "4", "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_convert_then_generate(ckpt: Path) -> None:
    run = cli("generate", "--checkpoint", ckpt, "--prompt", QUESTION, "--max-new-tokens", "4")
    assert run.returncode == 0, run.stderr
    assert "[dense, chat template]" in run.stderr
    assert run.stdout.strip() or "note: finished at once" in run.stderr


def test_calibrate_then_similarity(ckpt: Path, truthfulqa: Path, tmp_path: Path) -> None:
    done = cli("calibrate", "--checkpoint", ckpt, "--data", truthfulqa, "--out", tmp_path / "calib")
    assert done.returncode == 0, done.stderr
    row = generated("--checkpoint", ckpt, "--method", "similarity", "--calibration", tmp_path / "calib",
                    "--task", "question", "--prompt", QUESTION)
    assert row["method"] == "similarity" and row["layers"] == [2, 7] and len(row["core_neurons"]) == 5
    # The prompt's core neurons in the first sparse layer are one cluster's list, cut to keep 0.4.
    cal = Calibration.load(tmp_path / "calib")
    assert row["core_neurons"][0] in cal.neurons[:, 2, :int(128 * 0.4)].tolist()


def test_budget_then_generate_with_it(ckpt: Path, wikitext: Path, tmp_path: Path) -> None:
    out = tmp_path / "budget.json"
    done = cli("budget", "--checkpoint", ckpt, "--data", wikitext, "--out", out)
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob(".*partial"))
    budget = Budget.load(out)
    row = generated("--checkpoint", ckpt, "--method", "stability", "--budget", out, "--prompt", QUESTION)
    assert row["layers"] == list(budget.layers) == [2, 7]
    assert row["layer_neurons"] == list(budget.layer_neurons(0.4))


def test_predictor_then_hybrid(ckpt: Path, wikitext: Path, tmp_path: Path) -> None:
    done = cli("predictor", "--checkpoint", ckpt, "--data", wikitext)
    assert done.returncode == 0, done.stderr
    fitted = ckpt / "predictor"
    assert Predictor.load(fitted).layers == (1, 8)  # what --method hybrid makes sparse by default
    for select in ([], ["--select-by", "predictor"]):  # docs/hybrid.md's recipe, and the default directory
        row = generated("--checkpoint", ckpt, "--method", "hybrid", "--predictor", fitted, *select,
                        "--prompt", QUESTION)
        assert row["select_by"] == "predictor" and row["layers"] == [1, 8]
    assert generated("--checkpoint", ckpt, "--method", "hybrid", "--select-by", "predictor",
                     "--prompt", QUESTION)["rank"] == 64

    # A predictor for other layers: the error names both fixes.
    other = tmp_path / "other"
    assert cli("predictor", "--checkpoint", ckpt, "--data", wikitext, "--layers", "2:7", "--rank", "8",
               "--out", other).returncode == 0
    run = cli("generate", "--checkpoint", ckpt, "--method", "hybrid", "--predictor", other, "--prompt", QUESTION)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "has factors for layers 2:7, not for the sparse layers 1:8" in run.stderr
    assert "--layers 1:8 --out DIR`" in run.stderr and "give --predictor DIR" in run.stderr
    assert "or add --layers 2:7 here" in run.stderr
    assert generated("--checkpoint", ckpt, "--method", "hybrid", "--predictor", other, "--layers", "2:7",
                     "--prompt", QUESTION)["layers"] == [2, 7]


@pytest.mark.slow
def test_sweep_then_its_plot(ckpt: Path, wikitext: Path, truthfulqa: Path, tmp_path: Path) -> None:
    squad = write_squad(tmp_path / "squad.json")
    out = tmp_path / "sweep"
    # The tasks docs/hybrid.md's and docs/results.md's sweeps name; every other option its default
    # but `--limit`: two questions a task join the chain as twelve do, in three quarters the time.
    done = cli("sweep", "--checkpoint", ckpt, "--tasks", "wikitext", "truthfulqa", "squad", "--data",
               f"truthfulqa={truthfulqa}", f"squad={squad}", f"wikitext={wikitext}", "--out", out, "--limit", "2")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "sweep.json").read_text())
    assert report
    png = (out / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
