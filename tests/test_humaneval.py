"""HumanEval: stop sequences against a plain restatement, scoring of known-good and known-bad
solutions, the refusal to run code without --allow-code-execution, keep 1.0 = dense, and one BOS
in each prompt format."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import processors

from coreinfer_jax import Dense, Generator, Stability
from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.evaluation.evaluate import Settings, evaluate
from coreinfer_jax.evaluation.humaneval import Problem, humaneval, load_humaneval, program, prompt_text, truncate
from coreinfer_jax.evaluation.sandbox import run_program
from coreinfer_jax.tools.cli import main
from conftest import build_tiny_tokenizer, run_main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval_part.jsonl.gz"

# Three problems in HumanEval's layout, written for these tests, with a right and a wrong body.
PROBLEMS = [
    {"task_id": "Test/0", "entry_point": "add",
     "prompt": 'def add(a: int, b: int) -> int:\n    """Sum of a and b.\n    >>> add(2, 3)\n    5\n    """\n',
     "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "Test/1", "entry_point": "evens",
     "prompt": "from typing import List\n\n\ndef evens(xs: List[int]) -> List[int]:\n    \"\"\"The even numbers of xs.\"\"\"\n",
     "canonical_solution": "    return [x for x in xs if x % 2 == 0]\n",
     "test": "METADATA = {}\n\n\ndef check(candidate):\n    assert candidate([1, 2, 3, 4]) == [2, 4]\n    assert candidate([]) == []\n"},
    {"task_id": "Test/2", "entry_point": "shout",
     "prompt": 'def shout(s: str) -> str:\n    """s in capitals, with "!" appended."""\n',
     "canonical_solution": "    return s.upper() + '!'\n",
     "test": "def check(candidate):\n    assert candidate('hi') == 'HI!'\n"},
]


def write_problems(path: Path, rows: list[dict] = PROBLEMS) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_cut(text: str, stops: list[str]) -> str:
    """The stop rule restated: the text before the earliest occurrence of any stop sequence."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1 and at < cut:
            cut = at
    return text[:cut]


CODEX_STOPS = ["\ndef", "\nclass", "\nif", "\nprint", "\n#"]


def test_stop_sequences_cut_at_the_first_new_top_level_statement() -> None:
    body = "    if x:\n        return 1\n    # indented comments and ifs stay\n    return 2\n"
    assert truncate(body) == body
    assert truncate(body + "\n\ndef other():\n    pass\n") == body + "\n"
    assert truncate(body + "\nif __name__ == '__main__':\n    main()") == body
    assert truncate(body + "\nprint(f(1))\n") == body
    assert truncate(body + "\n# tests\nassert f(1)\n") == body
    assert truncate(body + "\nclass A:\n    pass\n") == body
    # The chat format also ends at its closing code fence, the completion format does not.
    assert truncate(body + "```\nThis function...") == body + "```\nThis function..."
    assert truncate(body + "\n```\nThis function...", chat=True) == body


def test_stop_sequences_match_a_plain_restatement_on_random_texts() -> None:
    rng = random.Random(0)
    pieces = ["\n", "def", "class", "if", "print", "#", "```", " ", "    ", "x", "(", ")", ":", "return", "\n\n"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert truncate(text) == reference_cut(text, CODEX_STOPS), repr(text)
        assert truncate(text, chat=True) == reference_cut(text, CODEX_STOPS + ["\n```"]), repr(text)


def _outcome(problem: Problem, body: str) -> str:
    return run_program(program(problem, body)).reason


def test_right_solutions_pass_and_wrong_ones_fail(tmp_path: Path) -> None:
    problems = load_humaneval(write_problems(tmp_path / "p.jsonl.gz"))
    assert [p.task_id for p in problems] == ["Test/0", "Test/1", "Test/2"]
    for p in problems:
        assert _outcome(p, p.canonical_solution) == "passed"
        assert _outcome(p, "    return None\n") == "failed: AssertionError"
        assert _outcome(p, "    return undefined\n") == "error: NameError"


@pytest.mark.skipif(not SHARED.is_file(), reason=f"HumanEval part not at {SHARED}")
def test_the_first_20_canonical_solutions_pass_and_wrong_ones_fail() -> None:
    problems = load_humaneval(SHARED)[:20]
    assert len(problems) == 20 and problems[0].task_id == "HumanEval/0"
    for p in problems:
        assert _outcome(p, p.canonical_solution) == "passed", p.task_id
        # A wrong but running body: a constant of the wrong type fails an assertion or raises.
        assert _outcome(p, "    return None\n") != "passed", p.task_id


def test_bad_files_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CoreInferError, match="does not exist"):
        load_humaneval(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"task_id": "x", "prompt": "p"}) + "\n")
    with pytest.raises(CoreInferError, match=r"bad.jsonl:1: not a HumanEval problem, no entry_point, test"):
        load_humaneval(tmp_path / "bad.jsonl")
    (tmp_path / "text.jsonl").write_text("not json\n")
    with pytest.raises(CoreInferError, match="not HumanEval JSONL"):
        load_humaneval(tmp_path / "text.jsonl")


def test_code_runs_only_with_allow_code_execution(tmp_path: Path) -> None:
    data = write_problems(tmp_path / "p.jsonl.gz")
    # Refused before the (here missing) checkpoint is even loaded.
    proc = run_main(main, "eval", "--task", "humaneval", "--data", data, "--checkpoint", tmp_path / "none")
    assert proc.returncode != 0 and "--allow-code-execution" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(CoreInferError, match="--allow-code-execution"):
        humaneval(None, load_humaneval(data), Dense())
    proc = run_main(main, "sweep", "--tasks", "humaneval", "--data", f"humaneval={data}", "--checkpoint",
                    tmp_path / "none", "--out", tmp_path / "out")
    assert proc.returncode != 0 and "--allow-code-execution" in proc.stderr and not (tmp_path / "out").exists()


def test_keep_one_equals_dense_problem_by_problem(tiny_checkpoint, tmp_path: Path) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    data = write_problems(tmp_path / "p.jsonl.gz")
    records: list[dict] = []
    settings = Settings(batch_size=2, max_new_tokens=12, allow_code_execution=True)
    results = evaluate(gen, "humaneval", [Dense(), Stability(keep=1.0)], data, settings=settings, records=records)
    assert [r.n for r in results] == [3, 3]
    assert results[0].metrics == results[1].metrics
    dense = [r for r in records if r["method"] == "dense"]
    sparse = [r for r in records if r["method"] != "dense"]
    assert [(r["completion"], r["passed"], r["reason"]) for r in dense] == \
           [(r["completion"], r["passed"], r["reason"]) for r in sparse]
    assert all(r["tokens"] <= 12 for r in records)
    assert results[0].metrics["pass@1"] == sum(r["passed"] for r in dense) / 3


def test_eval_cli_runs_humaneval(tiny_checkpoint, tmp_path: Path) -> None:
    data = write_problems(tmp_path / "p.jsonl.gz")
    proc = run_main(main, "eval", "--task", "humaneval", "--data", data, "--checkpoint", tiny_checkpoint("llama"),
                    "--allow-code-execution", "--method", "stability", "--keep", "0.5", "--max-new-tokens", "8",
                    "--records", tmp_path / "r.jsonl", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["task"], r["method"], r["n"]) for r in rows] == [("humaneval", "dense", 3), ("humaneval", "stability", 3)]
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(records) == 6 and {"completion", "passed", "reason", "output"} <= set(records[0])
    for row in rows:
        mine = [r["passed"] for r in records if r["method"] == row["method"]]
        assert row["metrics"]["pass@1"] == sum(mine) / 3
    dense = [r["passed"] for r in records if r["method"] == "dense"]
    sparse = [r["passed"] for r in records if r["method"] == "stability"]
    differences = [float(a) - float(b) for a, b in zip(sparse, dense)]
    mean = sum(differences) / 3
    se = (sum((d - mean) ** 2 for d in differences) / 2) ** 0.5 / 3 ** 0.5
    assert rows[0]["paired_vs_dense"] is None
    assert rows[1]["paired_vs_dense"] == {"mean": pytest.approx(mean), "se": pytest.approx(se)}


def test_the_chat_format_continues_the_prompt_in_an_open_code_fence(tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    p = Problem(**{k: PROBLEMS[0][k] for k in ("task_id", "prompt", "entry_point", "test")})
    assert prompt_text(gen, p, "completion") == p.prompt
    if gen.tokenizer.chat_template:
        assert prompt_text(gen, p, "chat").endswith("```python\n" + p.prompt)
    with pytest.raises(CoreInferError, match="unknown prompt format"):
        prompt_text(gen, p, "fim")


class RecordingGenerator:
    """Stands in for a Generator: records the prompt ids it is asked to continue, and completes
    each with the tokens of `completion`."""

    def __init__(self, tokenizer, completion: str = "") -> None:
        self.tokenizer, self.prompts, self.completion = tokenizer, [], completion

    def generate_ids(self, ids: list[list[int]], *args, **kwargs) -> SimpleNamespace:
        self.prompts += ids
        return SimpleNamespace(tokens=[self.tokenizer(self.completion, add_special_tokens=False)["input_ids"]
                                       for _ in ids])


def test_a_completion_runs_cut_at_its_first_stop_sequence(tmp_path: Path) -> None:
    # Decoding ends once a stop sequence is written, so the decoded text holds it and whatever
    # else its last token brought: here a line that does not parse.
    gen = RecordingGenerator(build_tiny_tokenizer(), completion="    return a + b\n\ndef extra(:")
    problems = load_humaneval(write_problems(tmp_path / "p.jsonl.gz"))[:1]
    metrics, (record,) = humaneval(gen, problems, Dense(), allow_code_execution=True)
    assert record["completion"] == "    return a + b\n" and record["passed"] and metrics["pass@1"] == 1.0


def test_each_prompt_format_starts_with_one_bos(tmp_path: Path) -> None:
    # A tokenizer that adds a BOS, as Gemma's and Llama's do, and a chat template that writes
    # one itself: the chat prompt must not get a second.
    tok = build_tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    problems = load_humaneval(write_problems(tmp_path / "p.jsonl.gz"))[:1]
    for prompt_format in ("completion", "chat"):
        gen = RecordingGenerator(tok)
        humaneval(gen, problems, Dense(), prompt_format=prompt_format, allow_code_execution=True)
        (ids,) = gen.prompts
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id, prompt_format
        assert tok.decode(ids[1:]) == prompt_text(gen, problems[0], prompt_format).removeprefix("<s>"), prompt_format
