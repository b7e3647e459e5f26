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
from coreinfer_jax.tools.cli import main


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
    want = Generator.load(ckpt).generate("The cat sat on the", max_new_tokens=12)
    assert out["tokens"] == want.tokens[0] and out["text"] == want.texts[0]
    assert out["prompt_tokens"] == want.prompt_tokens[0]
    assert out["method"] == "dense" and out["core_neurons"] is None
    for key in ("compile_s", "prefill_s", "decode_s", "decode_tokens_per_s"):
        assert out[key] >= 0
    assert out["decode_tokens_per_s"] > 0 and out["prefill_s"] > 0


def test_generate_json_stability(ckpt: Path) -> None:
    r = cli("generate", "--checkpoint", str(ckpt), "--prompt", "Water boils at one hundred degrees",
            "--max-new-tokens", "8", "--method", "stability", "--keep", "0.5", "--token-keep", "0.3",
            "--layers", "1:2", "--json")
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
    (["--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (["--prompt", "hi", "--method", "stability", "--keep", "1.5"], "keep must be in (0, 1]"),
    (["--prompt", "hi", "--method", "stability", "--token-keep", "0"], "token_keep must be in (0, 1]"),
    (["--prompt", "hi", "--method", "stability", "--layers", "0:99"], "outside the model"),
    (["--prompt", "hi", "--method", "stability", "--layers", "three"], "START:END"),
    (["--prompt", "hi", "--method", "magic"], "invalid choice: 'magic'"),
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
