"""Streaming conversion: map each source tensor through the key table, cast it, write one checkpoint."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from convert import keymap
from convert.errors import ConversionError
from convert.hub import is_hub_id
from convert.sources import BUNDLED_MODELS, Source, open_source
from coreinfer_jax.models.checkpoint import (CHECKPOINT_MARKS, DEFAULT_CHECKPOINT, DTYPES, check_checkpoint_dir,
                                             load_metadata, write_checkpoint)
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import flat_shapes, unflatten
from coreinfer_jax.paths import check_output, check_replaceable

# Special tokens that end a generation besides the config's end token. Transformers stops at
# every id of a checkpoint's generation_config.json, llama.cpp at special tokens with these
# texts; a GGUF names one end token (Qwen2.5's <|im_end|>, not the <|endoftext|> that ends
# its plain completions), and a config.json often names one of several.
END_TEXTS = frozenset({"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>"})


def convert_tensors(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]],
                    dtype: str) -> dict[str, np.ndarray]:
    """Map, check and cast every (HF name, array) into a flat {param path: array} dict.

    Raises ConversionError on an unmapped, duplicate, misshapen or missing tensor.
    """
    expected = flat_shapes(cfg)
    target_dtype = jnp.dtype(dtype)
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for name, array in tensors:
        target = keymap.lookup(cfg, name)
        if target is None:
            continue
        for path in target.paths:
            if path not in expected:
                raise ConversionError(f"unexpected tensor {name!r}: it would be {path}, "
                                      f"which this {cfg.architecture} config does not have")
            if path in out:
                raise ConversionError(f"duplicate tensor {name!r}: {path} was already read from {origin[path]!r}")
        pieces = keymap.transform(name, array, target, [expected[p] for p in target.paths])
        for path, piece in zip(target.paths, pieces):
            # A copy, so that nothing keeps the source tensor (or its memory-mapped file) alive.
            out[path] = np.array(piece, dtype=target_dtype, order="C", copy=True)
            origin[path] = name
    missing = list(dict.fromkeys(keymap.hf_name(cfg, path) for path in expected if path not in out))
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ConversionError(f"missing {len(missing)} tensor(s): {shown}")
    return out


def end_tokens(cfg: ModelConfig, tokenizer: Any, listed: Sequence[int] = ()) -> tuple[int, ...]:
    """`cfg`'s end tokens, then the `listed` ones (generation_config.json's) and the tokenizer's
    special tokens named in `END_TEXTS`, each once."""
    named = [i for i, t in sorted(tokenizer.added_tokens_decoder.items()) if t.special and t.content in END_TEXTS]
    return tuple(i for i in dict.fromkeys([*cfg.eos_token_ids, *listed, *named]) if 0 <= i < cfg.vocab_size)


def default_out(source: str | Path) -> Path:
    """The output directory when none is given: only bundled models have one, next to each other."""
    if str(source) not in BUNDLED_MODELS:
        raise ConversionError(f"--out is required when converting {source} "
                              f"(only the bundled {', '.join(BUNDLED_MODELS)} have a default)")
    return DEFAULT_CHECKPOINT.parent / str(source)


def is_converted(out: str | Path, source: str, dtype: str) -> bool:
    """Whether `out` is a complete checkpoint converted from `source` (its metadata label) to `dtype`."""
    try:
        meta = load_metadata(check_checkpoint_dir(out))
    except (ValueError, OSError):
        return False
    return meta.get("source") == source and meta.get("dtype") == dtype


def convert_checkpoint(source: str | Path, out: str | Path | None = None, dtype: str = "float32",
                       force: bool = False, revision: str | None = None) -> Path:
    """Convert `source` (HF directory, hub id ORG/NAME at `revision`, .gguf file, or a bundled
    model: "smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b") into a
    checkpoint at `out`.

    `out` defaults to `default_out(source)` for bundled models and is required otherwise; an
    existing `out` is replaced only with `force`. Returns the absolute output path.
    """
    check_source_exists(source)
    out = default_out(source) if out is None else out  # before any download
    return convert_source(open_source(source, revision), out, dtype, force)


def check_source_exists(source: str | Path) -> None:
    """A source that is no bundled name, no hub id and no path is the first thing to report."""
    text = str(source)
    if text in BUNDLED_MODELS or is_hub_id(text) or Path(source).exists():
        return
    raise ConversionError(f"source {Path(source).absolute()} does not exist (expected a Hugging Face checkpoint "
                          f"directory, a .gguf file, a hub id ORG/NAME or one of {', '.join(BUNDLED_MODELS)})")


def remove_stale_partials(out: Path) -> None:
    """Remove what interrupted conversions to `out` left: the hidden `.NAME.*.partial` folders the
    atomic writer uses (a process killed outright, e.g. by SIGKILL, cannot remove its own)."""
    for stale in out.parent.glob(f".{out.name}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def convert_source(src: Source, out: str | Path, dtype: str = "float32", force: bool = False) -> Path:
    """`convert_checkpoint` for an opened source (e.g. a GGUF whose Transformers model a caller also uses)."""
    if dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out).absolute()
    if str(out) == src.label:
        raise ConversionError(f"--out {out} is the source itself")
    # Before the conversion, not when it is written.
    check_replaceable(out, force, "checkpoint", CHECKPOINT_MARKS, ConversionError)
    check_output(out, "dir")
    remove_stale_partials(out)
    hf_config = src.hf_config()
    cfg = ModelConfig.from_hf(hf_config)
    tokenizer = src.tokenizer()
    cfg = dataclasses.replace(cfg, eos_token_ids=end_tokens(cfg, tokenizer, src.generation_end_tokens()))
    bar = tqdm(src.tensors(), total=src.tensor_count(), desc=f"converting {out.name}", unit="tensor",
               disable=None)  # None: no bar when stderr is not a terminal (logs, subprocesses)
    with bar:
        flat = convert_tensors(cfg, bar, dtype)
    src.release()
    metadata = {"source": src.label, "source_format": src.format}
    return write_checkpoint(out, cfg, unflatten(cfg, flat), tokenizer, hf_config, metadata, dtype,
                            overwrite=force)
