"""Shared fixtures: a tiny in-process tokenizer and tiny random Hugging Face models of every family.

Nothing here touches a model hub. Each tiny model is built from `TINY_CONFIGS` with a fixed
seed, saved with `save_pretrained` (safetensors) plus the tiny tokenizer, and converted with
our converter on demand; every factory caches per name for the whole session.

    tiny_tokenizer                  PreTrainedTokenizerFast (ByteLevel BPE, ~320 tokens)
    tiny_hf_dir(name) -> Path       HF checkpoint directory
    tiny_checkpoint(name) -> Path   converted checkpoint directory (float32)
    tiny_torch_model(name)          the HF torch model, float32, eval mode, eager attention
    smollm2_checkpoint, gemma3_checkpoint, coreinfer_home   the two real models converted (slow tests),
                                    once per run: xdist workers share them (`converted_once`)
    run_main(main, *args)           a command line's `main` run in this process, captured like subprocess.run
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import io
import os
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator


def _jaxlib_version() -> tuple[int, ...]:
    # Read without importing jax: XLA reads XLA_FLAGS once, when the first backend starts.
    return tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2])


# The suite runs on the CPU. With the `cuda12` extra installed (its GPU compiler serves the
# deviceless sm_90 check) JAX would otherwise try a CUDA backend first and, finding no GPU,
# print a plugin traceback in every process; subprocesses inherit this. A run that sets
# JAX_PLATFORMS itself (the device suite's GPU tests) keeps its own.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The commands keep compiled programs in a persistent cache (`runtime.compile_cache`). Tests must
# not write into the user's, and several count or time compiles: off, unless a test turns it on.
os.environ["COREINFER_COMPILE_CACHE"] = "off"
# The suite compiles far more than it runs (tiny models, every family, method and form), and
# most of an XLA CPU compile is LLVM optimising the generated kernels: without it the tests
# take a third less time (3635 -> 2394 s summed on 2 cores). XLA's older elementwise emitter
# compiles faster still than its MLIR fusion emitters (a fifth less on the sparse, gather and
# hybrid tests); jaxlib 0.11 dropped that emitter and aborts the process on its flag. Products
# call libraries (Eigen, oneDNN) either way, and no test times anything. Subprocesses inherit
# the flags; a GPU run of the tests keeps its own.
if os.environ["JAX_PLATFORMS"] == "cpu" and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    _older_emitter = ["--xla_cpu_use_fusion_emitters=false"] if _jaxlib_version() < (0, 11) else []
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0",
                                                     *_older_emitter]))

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, OPTConfig, Phi3Config,
                          PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

from convert import convert_checkpoint
from convert.__main__ import main as convert_main
from convert.core import convert_source
from convert.sources import GGUFSource, open_source
from coreinfer_jax.models import products


def run_main(main: Callable[[list[str]], int], *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`main(args)` in this process, its exit code and printed output captured as `subprocess.run` would.

    No interpreter start and no recompiling: the programs a test compiled are reused. A traceback is
    not captured but raised, which fails the test as a traceback in a subprocess's stderr would.
    """
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


# The slowest modules, slowest first (`pytest --durations=0`, 2026-12-06: 284 to 120 s each, a
# third of the suite). The two workers take whole modules (`--dist loadfile`) and xdist would
# hand out the modules with the most tests first, leaving these to the end, where one worker
# ran the notebooks alone (1161 s wall against 1036 s of work per worker). Started first, they
# even out (1133 s against 1109); the rest follow in collection order.
SLOWEST_MODULES = ("test_notebooks.py", "test_mesh.py", "test_newcomer.py", "test_gemma.py", "test_qwen.py",
                   "test_smollm2.py", "test_gpu_compile.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOWEST_MODULES.index(name) if name in SLOWEST_MODULES else len(SLOWEST_MODULES)

    items.sort(key=rank)  # stable: tests keep their order within a module


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every compiled program after each test module. Each XLA CPU executable holds a few
    memory mappings; the whole suite in one process compiles enough of them to pass Linux's
    `vm.max_map_count` (65530), after which mmap fails and XLA segfaults inside a later compile."""
    yield
    jax.clear_caches()
    gc.collect()


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The cat sat on the mat and looked out of the window.",
    "She sells sea shells by the sea shore.",
    "Machine learning models learn patterns from data.",
    "Large language models predict the next token in a sequence.",
    "The sun rises in the east and sets in the west.",
    "Reading books is a good way to learn new words.",
    "He walked to the market to buy apples, bread and milk.",
    "The train leaves the station at seven o'clock every morning.",
    "Mountains are covered with snow during the winter months.",
    "Please write a short story about a friendly robot.",
    "What is the tallest mountain in the world?",
    "How many legs does a spider have?",
    "The answer to the question is forty two.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "The library opens at nine and closes at five.",
    "Birds build nests in the spring to lay their eggs.",
    "The ocean is deep, blue and full of life.",
    "Translate the following sentence into French.",
    "Summarize the main idea of the paragraph in one sentence.",
    "The meeting was moved from Monday to Wednesday afternoon.",
    "Numbers like 1, 2, 3 and 100 appear in many texts.",
    "Once upon a time there was a little girl who lived in a village.",
    "The scientist measured the temperature of the liquid twice.",
    "Children played football in the park until it got dark.",
    "Good morning! How are you today?",
    "Thank you very much for your help yesterday.",
    "The computer program printed hello world on the screen.",
    "Rain is expected tomorrow, so bring an umbrella.",
]

# A plain-text chat template, so that `apply_chat_template` works with the tiny tokenizer.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A ByteLevel BPE trained on `SENTENCES`: ids 0, 1, 2 are <pad>, <s>, </s>; no BOS is added."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE)


_LLAMA: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
# Gemma 3 with both layer types, each with its own RoPE (the full layers' scaled, as in the
# 4B+ models), head_dim != hidden/heads and a query scale != head_dim, so that swapping any
# of them changes the logits.
_GEMMA3: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, query_pre_attn_scalar=24, max_position_embeddings=128, rms_norm_eps=1e-6, sliding_window=8,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})
_OPT: dict[str, Any] = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=128, dropout=0.0, attention_dropout=0.0)

# name -> (HF config class, kwargs); vocab size and special token ids come from the tiny tokenizer.
TINY_CONFIGS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama": (LlamaConfig, dict(_LLAMA, tie_word_embeddings=False)),
    "llama_tied": (LlamaConfig, dict(_LLAMA, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3_rope": (LlamaConfig, dict(_LLAMA, tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),  # wavelengths 6.3 kept (< 16), 32 interpolated, 167+ divided (> 64)
    # head_dim 32 != hidden/heads, and a window shorter than the test sequences.
    "mistral": (MistralConfig, dict(_LLAMA, head_dim=32, sliding_window=16, tie_word_embeddings=False)),
    "qwen2": (Qwen2Config, dict(_LLAMA, tie_word_embeddings=False)),
    # The window on from layer 1 (`max_window_layers`), shorter than the test prompts.
    "qwen2_window": (Qwen2Config, dict(_LLAMA, tie_word_embeddings=False, use_sliding_window=True, sliding_window=8,
                                       max_window_layers=1)),
    "qwen3": (Qwen3Config, dict(_LLAMA, head_dim=32, tie_word_embeddings=False)),
    # Fused qkv_proj and gate_up_proj; Phi-3-mini's window on every layer.
    "phi3": (Phi3Config, dict(_LLAMA, sliding_window=16, tie_word_embeddings=False)),
    "gemma3": (Gemma3TextConfig, _GEMMA3),
    "gemma3_softcap": (Gemma3TextConfig, dict(_GEMMA3, attn_logit_softcapping=1.5, final_logit_softcapping=3.0,
                                              tie_word_embeddings=False)),
    "opt": (OPTConfig, dict(_OPT, word_embed_proj_dim=64, do_layer_norm_before=True, tie_word_embeddings=True)),
    # Like facebook/opt-350m: embeddings narrower than the model (project_in/out), post-LN.
    "opt_350m_like": (OPTConfig, dict(_OPT, word_embed_proj_dim=32, do_layer_norm_before=False,
                                      tie_word_embeddings=True)),
}


def tiny_hf_config(name: str, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    cls, kwargs = TINY_CONFIGS[name]
    return cls(**kwargs, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


@torch.no_grad()
def randomise(model: PreTrainedModel, seed: int) -> None:
    # HF init leaves norm scales at 1 and biases at 0, which would hide a swapped or dropped
    # tensor, and its 0.02 weights give near-uniform logits: draw every parameter afresh.
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith(".bias"):
            p.copy_(0.1 * noise)
        elif "norm" in name:
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)


def build_tiny_model(name: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised float32 HF model for `TINY_CONFIGS[name]`, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(name, tokenizer), dtype=torch.float32)
    randomise(model, seed)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory,
                tiny_tokenizer: PreTrainedTokenizerFast) -> Callable[[str], Path]:
    """Factory: name in TINY_CONFIGS -> HF checkpoint directory (single safetensors file + tokenizer)."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            path = tmp_path_factory.mktemp(f"hf_{name}")
            build_tiny_model(name, tiny_tokenizer).save_pretrained(path, safe_serialization=True)
            tiny_tokenizer.save_pretrained(path)
            cache[name] = path
        return cache[name]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory,
                    tiny_hf_dir: Callable[[str], Path]) -> Callable[[str], Path]:
    """Factory: name in TINY_CONFIGS -> checkpoint directory converted by `convert` (float32)."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            cache[name] = convert_checkpoint(tiny_hf_dir(name), tmp_path_factory.mktemp("ckpt") / name)
        return cache[name]

    return make


@pytest.fixture(scope="session")
def tiny_torch_model(tiny_hf_dir: Callable[[str], Path]) -> Callable[[str], PreTrainedModel]:
    """Factory: name in TINY_CONFIGS -> the saved HF model loaded back (float32, eval, eager attention)."""
    cache: dict[str, PreTrainedModel] = {}

    def make(name: str) -> PreTrainedModel:
        if name not in cache:
            cache[name] = AutoModelForCausalLM.from_pretrained(
                tiny_hf_dir(name), dtype=torch.float32, attn_implementation="eager").eval()
        return cache[name]

    return make


class KeptGGUF(GGUFSource):
    """A bundled GGUF whose Transformers model outlives its conversion (`release` keeps it), so
    that a parity test compares against the very weights converted without parsing the file
    again (Gemma's 262k-token vocabulary alone takes the GGUF reader ~20 s a parse)."""

    def release(self) -> None:
        pass


def kept_source(name: str) -> KeptGGUF:
    source = open_source(name)
    assert isinstance(source, GGUFSource)
    return KeptGGUF(source.path, label=name)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory every xdist worker of this run shares (the session's own without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def converted_once(out: Path, convert: Callable[[Path], object]) -> Path:
    """`convert(out)` by the first worker of the run to ask; the others wait for it and reuse its
    checkpoint (the converter writes it atomically, so one that exists is whole)."""
    with FileLock(f"{out}.lock"):
        if not out.exists():
            convert(out)
    return out


@pytest.fixture(scope="session")
def smollm2_checkpoint(run_dir: Path) -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF converted to float32 by `python -m convert` (slow tests only)."""
    def convert(out: Path) -> None:
        done = run_main(convert_main, "smollm2-135m", "--out", out)
        assert done.returncode == 0 and done.stdout == f"wrote {out}\n", done.stderr

    return converted_once(run_dir / "smollm2", convert)


@pytest.fixture(scope="session")
def smollm2_torch_model() -> PreTrainedModel:
    """Transformers' own dequantisation of the same GGUF, float32, eval mode."""
    from convert.sources import bundled_gguf

    gguf = bundled_gguf()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def gemma3_source() -> KeptGGUF:
    """The bundled Gemma-3-270M GGUF; Transformers dequantises it once for both sides (slow tests only)."""
    return kept_source("gemma3-270m")


@pytest.fixture(scope="session")
def gemma3_checkpoint(run_dir: Path, gemma3_source: KeptGGUF) -> Path:
    """Gemma-3-270M converted to float32 from Transformers' dequantisation of the GGUF."""
    return converted_once(run_dir / "gemma3", lambda out: convert_source(gemma3_source, out))


@pytest.fixture(scope="session")
def coreinfer_home(tmp_path_factory: pytest.TempPathFactory, smollm2_checkpoint: Path, gemma3_checkpoint: Path) -> Path:
    """A COREINFER_HOME where both bundled models are already converted, as `python -m convert NAME` leaves them."""
    home = tmp_path_factory.mktemp("coreinfer_home")
    (home / "smollm2-135m").symlink_to(smollm2_checkpoint, target_is_directory=True)
    (home / "gemma3-270m").symlink_to(gemma3_checkpoint, target_is_directory=True)
    return home


@pytest.fixture(scope="session")
def gemma3_torch_model(gemma3_source: KeptGGUF) -> PreTrainedModel:
    """Transformers' Gemma-3-270M on the same dequantised weights, float32, eval mode."""
    return gemma3_source.model().eval()


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """`forced("cpu" | "gpu")` runs the backend-specific forms (`products.by_platform`: one
    token's products, decode attention) in the form given, on this CPU, with no compile
    reused across forms."""
    def use(form: str) -> None:
        jax.clear_caches()
        monkeypatch.setattr(products, "FORCE", form)
    yield use
    jax.clear_caches()
