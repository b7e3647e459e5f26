"""Qwen2.5-Coder as bundled sources: assembling a GGUF from byte-split part packages (fake parts
here: a wrong order or a truncated part is one clear line and writes nothing), and the real
0.5B against Transformers (slow)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import kept_source, run_main
from convert import ConversionError
from convert import sources
from convert.__main__ import main as convert_main
from convert.core import convert_source
from convert.sources import QWEN_CODER_05B, SplitGGUF, assemble_parts
from coreinfer_jax import Generator

# Like the real ones: every part but the last of one size, so swapped parts keep the total.
PARTS = [b"GGUF" + bytes(range(252)) * 3, (b"second part " * 64)[:760], b"tail"]
WHOLE = b"".join(PARTS)
SHA = hashlib.sha256(WHOLE).hexdigest()


@pytest.fixture
def fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SplitGGUF:
    """Three part packages laid out as the real ones (`NAME_partN/data/partNN.bin`), importable
    from tmp_path, and a split GGUF made of them assembled under tmp_path/home."""
    for n, data in enumerate(PARTS, 1):
        (tmp_path / "site" / f"fake_model_part{n}" / "data").mkdir(parents=True)
        (tmp_path / "site" / f"fake_model_part{n}" / "data" / f"part{n:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setattr(sources, "DEFAULT_CHECKPOINT", tmp_path / "home" / "smollm2-135m")
    return SplitGGUF("fake-model", "fake-model-part{n}", "1.0", len(PARTS), len(WHOLE), SHA)


def _part(split: SplitGGUF, n: int) -> Path:
    return split.part_paths()[n - 1]


def test_parts_assemble_into_the_pinned_bytes_once(fake_parts: SplitGGUF) -> None:
    path = fake_parts.path()
    assert path == fake_parts.part_paths()[0].parents[3] / "home" / "gguf" / "fake-model.gguf"
    assert path.read_bytes() == WHOLE
    stamp = path.stat().st_mtime_ns
    assert fake_parts.path() == path and path.stat().st_mtime_ns == stamp  # reused, not rewritten
    path.write_bytes(WHOLE[:-1] + b"X")  # a damaged assembled file is assembled again
    assert fake_parts.path().read_bytes() == WHOLE


def _nothing_written(split: SplitGGUF) -> None:
    gguf_dir = sources.DEFAULT_CHECKPOINT.parent / "gguf"
    assert not gguf_dir.exists() or list(gguf_dir.iterdir()) == []


def test_parts_in_the_wrong_order_are_refused(fake_parts: SplitGGUF) -> None:
    first, second = _part(fake_parts, 1), _part(fake_parts, 2)
    a, b = first.read_bytes(), second.read_bytes()
    assert len(a) == len(b)
    first.write_bytes(b)
    second.write_bytes(a)
    with pytest.raises(ConversionError, match=r"concatenate to sha256 [0-9a-f]{64}, expected " + SHA +
                       r": a part is corrupt, out of order or from another version; reinstall them: pip install"):
        fake_parts.path()
    _nothing_written(fake_parts)


def test_a_truncated_part_is_refused_before_copying(fake_parts: SplitGGUF) -> None:
    part = _part(fake_parts, 2)
    part.write_bytes(part.read_bytes()[:-7])
    with pytest.raises(ConversionError, match=rf"the 3 parts of fake-model.gguf hold {len(WHOLE) - 7:,} bytes, "
                                              rf"expected {len(WHOLE):,}: a part is truncated"):
        fake_parts.path()
    _nothing_written(fake_parts)


def test_a_missing_part_package_names_the_install(fake_parts: SplitGGUF) -> None:
    missing = SplitGGUF("fake-model", "fake-model-part{n}", "1.0", 4, len(WHOLE), SHA)
    with pytest.raises(ConversionError, match=r"fake-model needs 4 packages and fake-model-part4 is not installed: "
                                              r"pip install"):
        missing.path()


def test_the_converter_reports_a_bad_part_in_one_line(fake_parts: SplitGGUF, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _part(fake_parts, 3).write_bytes(b"")
    monkeypatch.setitem(sources.BUNDLED_MODELS, "qwen2.5-coder-0.5b", fake_parts.path)
    proc = run_main(convert_main, "qwen2.5-coder-0.5b", "--out", tmp_path / "out")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: the 3 parts of fake-model.gguf hold")
    assert not (tmp_path / "out").exists()
    _nothing_written(fake_parts)


def test_assembly_leaves_no_temporary_file_on_failure(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"ab")
    with pytest.raises(ConversionError, match="sha256"):
        assemble_parts([tmp_path / "a"], 2, "0" * 64, tmp_path / "out" / "x.gguf")
    assert list((tmp_path / "out").iterdir()) == []


# --- the real Qwen2.5-Coder-0.5B-Instruct (slow) ---

PROMPTS = [
    "def fibonacci(n):\n",
    "# Return the sum of the squares of a list of numbers\ndef sum_of_squares(xs):\n",
    "The capital of France is",
    "import numpy as np\n\ndef normalize(v):\n    \"\"\"Scale v to unit length.\"\"\"\n",
    "class Stack:\n    def __init__(self):\n",
]


def _installed() -> bool:
    return all(importlib.util.find_spec(QWEN_CODER_05B.package.format(n=n).replace("-", "_"))
               for n in range(1, QWEN_CODER_05B.parts + 1))


@pytest.fixture(scope="module")
def qwen_source():
    if not _installed():
        pytest.skip("the qwen2.5-coder-0.5b part packages are not installed (pip install 'coreinfer-jax[qwen]')")
    return kept_source("qwen2.5-coder-0.5b")  # converted, then compared with the same dequantisation


@pytest.fixture(scope="module")
def qwen(qwen_source, tmp_path_factory: pytest.TempPathFactory) -> Generator:
    return Generator.load(convert_source(qwen_source, tmp_path_factory.mktemp("qwen") / "ckpt"))


@pytest.mark.slow
def test_qwen_coder_05b_converts_as_qwen2(qwen: Generator) -> None:
    cfg = qwen.cfg
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("Qwen2ForCausalLM", 24, 896, 4864)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.qkv_bias, cfg.o_bias, cfg.tie_word_embeddings) == (14, 2, True, False, False)
    # The GGUF names <|im_end|> only; <|endoftext|> ends a plain completion (as in Qwen's
    # generation_config.json and llama.cpp).
    assert cfg.eos_token_ids == (151645, 151643)
    assert qwen.tokenizer.convert_ids_to_tokens(list(cfg.eos_token_ids)) == ["<|im_end|>", "<|endoftext|>"]


@pytest.mark.slow
def test_qwen_coder_05b_greedy_continuations_match_transformers(qwen: Generator, qwen_source) -> None:
    """Our 32 greedy tokens for each prompt are Transformers' argmax after the prompt and our
    tokens before it (Transformers' greedy continuation), checked with one teacher-forced
    forward per prompt, and our logits within 1e-3 of Transformers' at every step."""
    model = qwen_source.model().eval()
    ids = qwen.encode(PROMPTS)
    ours = qwen.generate_ids(ids, max_new_tokens=32, stop_at_eos=False, return_logits=True)
    for b, p in enumerate(ids):
        with torch.no_grad():
            theirs = model(torch.tensor([p + ours.tokens[b]])).logits[0, len(p) - 1: -1].numpy()
        assert theirs.argmax(-1).tolist() == ours.tokens[b], PROMPTS[b]
        assert np.abs(ours.logits[b] - theirs).max() < 1e-3, PROMPTS[b]
