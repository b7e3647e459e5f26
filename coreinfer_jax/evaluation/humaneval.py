"""HumanEval (Chen et al. 2021): greedy code completion, executed against the problem's tests.

Each problem's prompt (a signature and docstring) is pre-filled, so it chooses the core
neurons; the completion is decoded greedily until it contains a stop sequence (a new
top-level `def`, `class`, `if`, `print` or `#` line, as the Codex paper does; the chat format
also stops at the closing code fence), a special token or `max_new_tokens` (default 384), and
cut before its first stop sequence. The
program `prompt + completion + test + check(entry_point)` runs in the sandbox
(`evaluation.sandbox`) and passes when it runs to its end: pass@1 over greedy completions.

Prompt formats (docs/code_generation.md has the measurement that chose the default):
- `completion`: the prompt as it is; the model continues the function body.
- `chat`: the model's chat template, a user turn asking for the function, and the assistant
  turn opened with a Python code fence and the prompt, so the model still continues the body.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.evaluation.sandbox import Limits, isolation, run_program
from coreinfer_jax.paths import check_input
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.runtime.stop_strings import cut
from coreinfer_jax.sparse.method import Method

STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
CHAT_STOP = "\n```"
PROMPT_FORMATS = ("completion", "chat")
DEFAULT_MAX_NEW_TOKENS = 384
CHAT_REQUEST = "Complete the following Python function. Reply with the whole function in one code block."
_FIELDS = ("task_id", "prompt", "entry_point", "test")


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str = ""


def load_humaneval(path: Path | None) -> list[Problem]:
    """Problems from HumanEval's JSONL (gzipped or not), in the original field names."""
    if path is None:
        raise CoreInferError("humaneval needs --data FILE (HumanEval's JSONL, e.g. HumanEval.jsonl.gz)")
    check_input(path, "file", "evaluation data file")
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    problems = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                missing = [k for k in _FIELDS if not isinstance(row.get(k), str)]
                if missing:
                    raise CoreInferError(f"{path}:{number}: not a HumanEval problem, no {', '.join(missing)}")
                problems.append(Problem(*(row[k] for k in _FIELDS), row.get("canonical_solution", "")))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CoreInferError(f"{path}: not HumanEval JSONL: {e}") from None
    return problems


def stop_sequences(chat: bool) -> tuple[str, ...]:
    return STOP_SEQUENCES + ((CHAT_STOP,) if chat else ())


def truncate(completion: str, chat: bool = False) -> str:
    """`completion` up to (not including) its first stop sequence."""
    return cut(completion, stop_sequences(chat))


def prompt_text(gen: Generator, problem: Problem, prompt_format: str) -> str:
    """What is pre-filled for `problem`; the completion continues `problem.prompt` in both formats."""
    if prompt_format == "completion":
        return problem.prompt
    if prompt_format == "chat":
        if not gen.tokenizer.chat_template:
            raise CoreInferError("--prompt-format chat needs a tokenizer with a chat template")
        turn = gen.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{CHAT_REQUEST}\n```python\n{problem.prompt}```"}],
            tokenize=False, add_generation_prompt=True)
        return f"{turn}```python\n{problem.prompt}"
    raise CoreInferError(f"unknown prompt format {prompt_format!r}; choose one of: {', '.join(PROMPT_FORMATS)}")


def program(problem: Problem, completion: str) -> str:
    """The program HumanEval executes: the function and its tests, then the check itself."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def check_code_execution(allowed: bool) -> None:
    if not allowed:
        raise CoreInferError("humaneval executes the model's code: pass --allow-code-execution to run it in "
                             "the sandbox (what it does and does not contain: docs/code_generation.md)")


def humaneval(gen: Generator, problems: Sequence[Problem], method: Method, batch_size: int = 8,
              max_new_tokens: int | None = None, prompt_format: str = "completion", allow_code_execution: bool = False,
              limits: Limits = Limits(), progress: Callable[[int], None] = lambda n: None
              ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """pass@1 of greedy completions of `problems`, and each problem's completion and outcome."""
    check_code_execution(allowed=allow_code_execution)
    isolation()  # fails before any decoding when no interpreter can run the programs
    # Special tokens end a completion: GGUF-converted configs may name only one of a model's
    # end tokens (Qwen's <|im_end|>, not <|endoftext|>), and code never contains one.
    stops = tuple(gen.tokenizer.all_special_ids)
    chat = prompt_format == "chat"
    records = []
    for i in range(0, len(problems), batch_size):
        batch = problems[i: i + batch_size]
        ids = [gen.tokenizer(prompt_text(gen, p, prompt_format), add_special_tokens=not chat)["input_ids"]
               for p in batch]
        out = gen.generate_ids(ids, max_new_tokens or DEFAULT_MAX_NEW_TOKENS, method, stop_tokens=stops,
                               stop_strings=stop_sequences(chat))
        for p, tokens in zip(batch, out.tokens):
            raw = gen.tokenizer.decode(tokens, skip_special_tokens=True)
            completion = truncate(raw, chat)
            result = run_program(program(p, completion), limits)
            records.append({"task_id": p.task_id, "completion": completion, "passed": result.passed,
                            "reason": result.reason, "output": result.output[-1000:],
                            "tokens": len(tokens), "seconds": result.seconds})
        progress(len(batch))
    return {"pass@1": sum(r["passed"] for r in records) / len(records)}, records
