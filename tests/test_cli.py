"""`python -m coreinfer_jax generate`: JSON output, profiling, one-line input errors, and tracebacks for bugs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_main
from coreinfer_jax import Generator, Stability
from coreinfer_jax.errors import InputError
from coreinfer_jax.tools.cli import empty_note, main, unescape


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_main(main, *args)


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


def test_generate_json_dense(ckpt: Path) -> None:
    # The one run through a real `python -m coreinfer_jax`; the others call `main` in this process.
    r = subprocess.run([sys.executable, "-m", "coreinfer_jax", "generate", "--checkpoint", str(ckpt), "--prompt",
                        "The cat sat on the", "--max-new-tokens", "12", "--json"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # No --task and a tokenizer with a chat template: the template is applied by default.
    want = Generator.load(ckpt).generate("The cat sat on the", max_new_tokens=12, chat=True)
    assert out["chat"] is True
    assert out["tokens"] == want.tokens[0] and out["text"] == want.texts[0]
    assert out["prompt_tokens"] == want.prompt_tokens[0]
    assert out["method"] == "dense" and out["core_neurons"] is None
    for key in ("compile_s", "prefill_s", "decode_s", "decode_tokens_per_s"):
        assert out[key] >= 0
    assert out["decode_tokens_per_s"] > 0 and out["prefill_s"] > 0


def test_generate_json_stability(ckpt: Path) -> None:
    r = cli("generate", "--checkpoint", str(ckpt), "--prompt", "Water boils at one hundred degrees",
            "--max-new-tokens", "8", "--method", "stability", "--keep", "0.5", "--token-keep", "0.3",
            "--layers", "1:2", "--raw", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    gen = Generator.load(ckpt)
    want = gen.generate("Water boils at one hundred degrees", max_new_tokens=8,
                        method=Stability(keep=0.5, token_keep=0.3, layers=(1, 2)))
    assert (out["method"], out["keep"], out["token_keep"], out["layers"]) == ("stability", 0.5, 0.3, [1, 2])
    assert out["tokens"] == want.tokens[0]
    assert out["core_neurons"] == want.core_neurons[0].tolist()
    assert len(out["core_neurons"]) == 1 and len(out["core_neurons"][0]) == int(gen.cfg.intermediate_size * 0.5)


def test_profile_writes_a_trace(ckpt: Path, tmp_path: Path) -> None:
    r = cli("generate", "--checkpoint", str(ckpt), "--prompt", "Hello there", "--max-new-tokens", "4",
            "--method", "stability", "--profile", str(tmp_path / "trace"))
    assert r.returncode == 0, r.stderr
    assert list((tmp_path / "trace").rglob("*.xplane.pb")), "no XProf trace written"


@pytest.mark.parametrize("args,words", [
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt", "word " * 200], "exceeds the model's context"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    (["--prompt", "hi", "--method", "stability", "--keep", "1.5"], "keep must be in (0, 1]"),
    (["--prompt", "hi", "--method", "stability", "--token-keep", "0"], "token_keep must be in (0, 1]"),
    (["--prompt", "hi", "--method", "stability", "--layers", "0:99"], "outside the model"),
    (["--prompt", "hi", "--method", "stability", "--layers", "three"], "START:END"),
    (["--prompt", "hi", "--method", "magic"], "invalid choice: 'magic'"),
    (["--prompt", "hi", "--profile", __file__], "is a file; a directory is written there"),
])
def test_bad_input_is_one_clear_line(ckpt: Path, args: list[str], words: str) -> None:
    r = cli("generate", "--checkpoint", str(ckpt), *args)
    assert r.returncode == 2
    assert words in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_checkpoint(tmp_path: Path) -> None:
    r = cli("generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_offload_gives_the_same_tokens(ckpt: Path) -> None:
    args = ["generate", "--checkpoint", str(ckpt), "--prompt", "The sun rises in the east", "--max-new-tokens", "8",
            "--method", "stability", "--keep", "0.5", "--layers", "0:2", "--json"]
    on_device, offloaded = json.loads(cli(*args).stdout), json.loads(cli(*args, "--offload").stdout)
    assert offloaded["offload"] and not on_device["offload"]
    assert offloaded["tokens"] == on_device["tokens"]
    assert offloaded["core_neurons"] == on_device["core_neurons"]
    r = cli("generate", "--checkpoint", str(ckpt), "--prompt", "hi", "--offload")
    assert r.returncode == 2 and "offload mode needs a sparse method" in r.stderr


def test_stop_at_newline_ends_the_answer(ckpt: Path) -> None:
    gen = Generator.load(ckpt)
    newline = gen.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert set(newline) <= gen.newline_tokens
    assert all("\n" in gen.tokenizer.decode([t]) for t in gen.newline_tokens)
    full = gen.generate("The cat sat on the", max_new_tokens=30, stop_at_eos=False)
    # The random tiny model rarely writes a newline: let its 6th token stand for one.
    stand_in = full.tokens[0][5]
    first = full.tokens[0].index(stand_in)
    gen.__dict__["newline_tokens"] = frozenset({stand_in})
    cut = gen.generate("The cat sat on the", max_new_tokens=30, stop_at_eos=False, stop_at_newline=True)
    assert cut.tokens[0] == full.tokens[0][:first]
    assert cut.texts[0] == gen.tokenizer.decode(full.tokens[0][:first], skip_special_tokens=True)


def broken(error: Exception):
    def load(*args, **kwargs):
        raise error
    return load


@pytest.mark.parametrize("error", [ValueError("an axis mismatch in NumPy"), RuntimeError("XLA failed")])
def test_a_bug_keeps_its_traceback(ckpt: Path, monkeypatch, error: Exception) -> None:
    # Not the user's input: `main` must not turn it into one `error:` line.
    monkeypatch.setattr(Generator, "load", broken(error))
    with pytest.raises(type(error), match=str(error)):
        main(["generate", "--checkpoint", str(ckpt), "--prompt", "hi"])


def test_a_project_error_is_one_line(ckpt: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(Generator, "load", broken(InputError("token id 999 is outside the vocabulary")))
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == "error: token id 999 is outside the vocabulary\n"


def test_chat_template_is_the_default_without_a_task(ckpt: Path) -> None:
    # The tiny tokenizer has a chat template: a plain prompt goes through it unless --no-chat/--raw.
    prompt = "What is the tallest mountain in the world?"
    gen = Generator.load(ckpt)
    templated = gen.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)
    plain = gen.tokenizer(prompt)["input_ids"]
    assert len(templated) > len(plain)
    base = ["generate", "--checkpoint", str(ckpt), "--prompt", prompt, "--max-new-tokens", "6"]
    default = cli(*base, "--json")
    assert default.returncode == 0, default.stderr
    out = json.loads(default.stdout)
    assert out["chat"] is True and out["prompt_tokens"] == len(templated)
    for off in ("--no-chat", "--raw"):
        raw = json.loads(cli(*base, off, "--json").stdout)
        assert raw["chat"] is False and raw["prompt_tokens"] == len(plain)
    # A task template shapes the prompt itself: no chat template unless asked for.
    task = json.loads(cli(*base, "--task", "question", "--json").stdout)
    assert task["chat"] is False
    assert json.loads(cli(*base, "--task", "question", "--chat", "--json").stdout)["chat"] is True
    # The stats line says which was used.
    assert "chat template]" in cli(*base).stderr and "raw prompt]" in cli(*base, "--raw").stderr


def test_chat_without_a_template_is_one_line(ckpt: Path, monkeypatch) -> None:
    load = Generator.load

    def without_template(*args, **kwargs):
        gen = load(*args, **kwargs)
        gen.tokenizer.chat_template = None
        return gen

    monkeypatch.setattr(Generator, "load", without_template)
    base = ["generate", "--checkpoint", str(ckpt), "--prompt", "Hello there", "--max-new-tokens", "4"]
    assert json.loads(cli(*base, "--json").stdout)["chat"] is False  # no template: the prompt as written
    r = cli(*base, "--chat")
    assert r.returncode == 2 and "has no chat template" in r.stderr and r.stderr.count("\n") == 1


def ends_at_once(monkeypatch) -> None:
    """The real generation, with the model's first token made its end token (as an instruct
    model given a bare question does)."""
    generate = Generator.generate

    def first_token_eos(self, prompts, *args, **kwargs):
        out = generate(self, prompts, *args, **kwargs)
        out.tokens, out.texts = [[self.cfg.eos_token_ids[0]]], [""]
        return out

    monkeypatch.setattr(Generator, "generate", first_token_eos)


@pytest.mark.parametrize("flags,hint", [([], "try --no-chat or --task qa"), (["--no-chat"], "try --chat")])
def test_an_empty_generation_says_so(ckpt: Path, monkeypatch, flags: list[str], hint: str) -> None:
    ends_at_once(monkeypatch)
    for json_flag in ([], ["--json"]):
        r = cli("generate", "--checkpoint", str(ckpt), "--prompt", "Hello there", "--max-new-tokens", "4",
                *flags, *json_flag)
        assert r.returncode == 0, r.stderr
        assert f"note: finished at once: the model produced its end token first; {hint}\n" in r.stderr


def test_a_generation_with_text_has_no_note(ckpt: Path) -> None:
    r = cli("generate", "--checkpoint", str(ckpt), "--prompt", "The cat sat on the", "--max-new-tokens", "6", "--raw",
            "--stop-at-newline")
    assert r.stdout.strip() and "note:" not in r.stderr


def test_stop_ends_the_answer_before_the_text(ckpt: Path) -> None:
    base = ["generate", "--checkpoint", str(ckpt), "--prompt", "The cat sat on the", "--max-new-tokens", "24", "--raw"]
    full = cli(*base, "--json")
    out = json.loads(full.stdout)
    text = out["text"]
    # The random model writes stray bytes too; a stop string of two ASCII letters after the first few.
    stop = next(text[i: i + 2] for i in range(4, len(text)) if text[i: i + 2].isascii() and text[i: i + 2].isalpha())
    assert len(out["tokens"]) == 24
    r = cli(*base, "--stop", "zzz", "--stop", stop, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["text"] == text[: text.index(stop)]
    assert len(got["tokens"]) < 24 and got["tokens"] == out["tokens"][: len(got["tokens"])]


def test_stop_text_escapes_and_an_answer_cut_to_nothing(ckpt: Path) -> None:
    assert unescape("a\\nb\\tc") == "a\nb\tc"  # as a shell passes '--stop "a\nb\tc"'
    gen = Generator.load(ckpt)
    out = gen.generate("The cat sat on the", max_new_tokens=6)
    out.texts = [""]  # what a --stop text at the very start leaves
    assert empty_note(out, gen, chat=False) == "no text before the first --stop text"


def test_prompt_file_and_the_hint_for_a_path(ckpt: Path, tmp_path: Path) -> None:
    text = "The sun rises in the east"
    path = tmp_path / "prompt.txt"
    path.write_text(text + "\n")
    base = ["generate", "--checkpoint", str(ckpt), "--max-new-tokens", "5", "--raw", "--json"]
    from_file = cli(*base, "--prompt-file", str(path))
    from_text = cli(*base, "--prompt", text)
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout)["tokens"] == json.loads(from_text.stdout)["tokens"]
    assert "note:" not in from_file.stderr + from_text.stderr
    # A --prompt that names an existing file still generates from the text, with a one-line hint.
    named = cli(*base, "--prompt", str(path))
    assert named.returncode == 0
    assert json.loads(named.stdout)["prompt_tokens"] != json.loads(from_file.stdout)["prompt_tokens"]
    assert f"note: --prompt is the text itself; to read the file {path}, use --prompt-file\n" == named.stderr
    missing = cli(*base, "--prompt-file", str(tmp_path / "nope.txt"))
    assert missing.returncode == 2 and "prompt file" in missing.stderr and "does not exist" in missing.stderr
    both = cli(*base, "--prompt", "hi", "--prompt-file", str(path))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


@pytest.mark.parametrize("layers", ["10:5", "1:1"])
def test_an_empty_layer_range_has_its_own_message(ckpt: Path, layers: str) -> None:
    for command in (["generate", "--prompt", "hi", "--method", "stability"], ["predictor", "--data", "x"],
                    ["budget", "--data", "x", "--out", "b.json"], ["sweep", "--out", "s"]):
        r = cli(command[0], "--checkpoint", str(ckpt), *command[1:], "--layers", layers)
        assert r.returncode == 2
        assert f"{layers} is an empty range: END must be greater than START" in r.stderr
        assert "outside" not in r.stderr


def test_compile_time_in_the_api(ckpt: Path) -> None:
    import jax

    gen = Generator.load(ckpt)
    jax.clear_caches()
    first = gen.generate("A journey of a thousand miles", max_new_tokens=5, method=Stability(keep=0.5, layers=(0, 2)))
    again = gen.generate("A journey of a thousand miles", max_new_tokens=5, method=Stability(keep=0.5, layers=(0, 2)))
    assert first.compile_s > 0 and again.compile_s == 0
    # Compiling happens inside the first call's timed sections.
    assert first.compile_s < first.prefill_s + first.decode_s
    jax.clear_caches()
    warmed = gen.generate("A journey of a thousand miles", max_new_tokens=5, warmup=True)
    assert warmed.compile_s > 0 and warmed.tokens == gen.generate("A journey of a thousand miles",
                                                                   max_new_tokens=5).tokens
    assert warmed.prefill_s + warmed.decode_s < warmed.compile_s


def test_convert_reports_a_missing_source_before_asking_for_out(tmp_path: Path) -> None:
    from convert.__main__ import main as convert_main

    r = run_main(convert_main, tmp_path / "no-such-model")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"source {tmp_path / 'no-such-model'} does not exist" in r.stderr and "--out" not in r.stderr
    # An existing source without --out: now --out is what is missing.
    (tmp_path / "model").mkdir()
    r = run_main(convert_main, tmp_path / "model")
    assert r.returncode == 2 and "--out is required" in r.stderr


def test_top_level_help_says_what_to_do_first() -> None:
    r = cli("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # argparse wraps at the terminal's width
    assert "Convert a model first (`python -m convert`" in text
    assert "generate --prompt TEXT" in text and "`COMMAND --help`" in text
    assert "{generate,bench,eval,calibrate,budget,predictor,sweep,data}" in text
