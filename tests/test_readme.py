"""The README and the docs against the parsers: every `python -m coreinfer_jax ...` and
`python -m convert ...` command in their shell blocks names a command and flags that exist;
the README's runnable commands (no placeholders) parse as written. And the README stays a
short guide that sends people to their own copy of the data.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from convert.__main__ import build_parser as convert_parser
from coreinfer_jax.tools.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
PLACEHOLDER = re.compile(r"[\[\]{}|$]|\.\.\.|^[A-Z][A-Z_]+$")
SEPARATORS = {"&&", "||", ";", "|"}


def shell_commands(text: str) -> list[list[str]]:
    """The commands of the ```bash blocks: lines joined where a backslash or an indented line
    continues them, split at `&&`, `;` and pipes, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines: list[str] = []
        for line in block.splitlines():
            if lines and (lines[-1].endswith("\\") or (line.startswith((" ", "\t")) and line.strip())):
                lines[-1] = lines[-1].rstrip("\\") + " " + line.strip()
            else:
                lines.append(line)
        for line in lines:
            tokens = shlex.split(line, comments=True)
            command: list[str] = []
            for token in tokens + [";"]:
                if token in SEPARATORS:
                    if command:
                        commands.append(command)
                    command = []
                else:
                    command.append(token)
    return commands


def ours(commands: list[list[str]]) -> list[tuple[str, list[str]]]:
    """`("coreinfer_jax" | "convert", arguments)` of the commands that run this project."""
    return [(c[2], c[3:]) for c in commands
            if len(c) >= 3 and c[0] in ("python", "python3") and c[1] == "-m" and c[2] in ("coreinfer_jax", "convert")]


def subparser(parser: argparse.ArgumentParser, args: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The (sub)parser `args` select, and the arguments after its name."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or not args or args[0] not in subs[0].choices:
            return parser, args
        parser, args = subs[0].choices[args[0]], args[1:]


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def check_flags(path: Path) -> list[str]:
    problems = []
    for program, args in ours(shell_commands(path.read_text())):
        parser, rest = subparser(build_parser() if program == "coreinfer_jax" else convert_parser(), args)
        if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            problems.append(f"{path.name}: `{program} {' '.join(args)}`: no such command")
            continue
        known = options(parser)
        problems += [f"{path.name}: `{program} {' '.join(args)}`: {flag} is not an option of {parser.prog}"
                     for token in rest for flag in FLAG.findall(token) if flag not in known]
    return problems


def test_shell_commands_are_extracted_from_bash_blocks() -> None:
    text = ("```bash\npython -m coreinfer_jax generate --prompt \"a # b\" --json  # a comment --nope\n"
            "python -m convert x --out y && python -m coreinfer_jax bench \\\n  --reps 3\n"
            "python -m coreinfer_jax eval --task wikitext\n    [--keep 0.4]\n```\n"
            "```python\npython -m coreinfer_jax generate --not-shell\n```\n")
    assert ours(shell_commands(text)) == [("coreinfer_jax", ["generate", "--prompt", "a # b", "--json"]),
                                          ("convert", ["x", "--out", "y"]),
                                          ("coreinfer_jax", ["bench", "--reps", "3"]),
                                          ("coreinfer_jax", ["eval", "--task", "wikitext", "[--keep", "0.4]"])]


def test_a_misspelt_flag_is_found(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("```bash\npython -m coreinfer_jax generate --prompt hi --max-tokens 3\n"
                   "python -m convert --output x\npython -m coreinfer_jax data fetch --out d --task squad\n"
                   "python -m coreinfer_jax evaluate --task squad\n```\n")
    assert check_flags(doc) == [
        "doc.md: `coreinfer_jax generate --prompt hi --max-tokens 3`: --max-tokens is not an option of "
        "python -m coreinfer_jax generate",
        "doc.md: `convert --output x`: --output is not an option of python -m convert",
        "doc.md: `coreinfer_jax data fetch --out d --task squad`: --task is not an option of "
        "python -m coreinfer_jax data fetch",
        "doc.md: `coreinfer_jax evaluate --task squad`: no such command"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_documented_flag_exists(path: Path) -> None:
    assert check_flags(path) == []


def test_the_readme_commands_parse_as_written() -> None:
    commands = ours(shell_commands((ROOT / "README.md").read_text()))
    assert len(commands) >= 6 and {c[1][0] for c in commands if c[0] == "coreinfer_jax"} >= {
        "generate", "eval", "bench"}
    for program, args in commands:
        if any(PLACEHOLDER.search(a) for a in args):
            continue
        (convert_parser() if program == "convert" else build_parser()).parse_args(args)


def test_the_readme_is_a_short_guide() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    order = ["## Two commands", "## A five-minute tour", "## Python API", "## Commands", "## Results"]
    positions = [next(i for i, h in enumerate(headings) if h.startswith(name)) for name in order]
    assert positions == sorted(positions)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_docs_send_people_to_their_own_data(path: Path) -> None:
    assert "shared/data" not in path.read_text(), f"{path.name} names a folder a user does not have; say --data"
