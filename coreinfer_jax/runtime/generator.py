"""The Python API: load a converted checkpoint, generate from strings or token ids.

    from coreinfer_jax import Generator, Stability
    gen = Generator.load()                       # the default SmolLM2 checkpoint
    out = gen.generate("The capital of France is", max_new_tokens=32, method=Stability(keep=0.4))
    out.texts[0], out.tokens[0], out.decode_tokens_per_s

The first call of a new shape or method compiles, inside its `prefill_s` and `decode_s`
(`compile_s` says how long); `warmup=True` runs the request once first, so the timings exclude it.

It is long because `Generator` is the one object a user holds: loading, meshes and offload,
text and token-id requests with their stops, and scoring all meet the compiled programs here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from coreinfer_jax.errors import InputError, MethodError
from coreinfer_jax.models.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import Params
from coreinfer_jax.models.sharding import DATA, TENSOR, MeshError, make_mesh, place_params
from coreinfer_jax.runtime import engine
from coreinfer_jax.runtime.batching import cache_length, cache_windows, check_ids, prompt_bucket, stop_ids
from coreinfer_jax.runtime.offload import place_core_weights, prefill_streamed, split_params
from coreinfer_jax.runtime.sampling import Sampling
from coreinfer_jax.runtime.stop_strings import cut, stop_table
from coreinfer_jax.sparse.method import Dense, Method

# Each compile's tracing, lowering and XLA time; a jit traced inside another is part of the
# outer's trace event, so the sum counts each second once.
_COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                             "/jax/core/compile/jaxpr_to_mlir_module_duration",
                             "/jax/core/compile/backend_compile_duration"})
_compiled = threading.local()  # .seconds: this thread's tracing and compiling since the import


def _on_event(name: str, seconds: float, **_: Any) -> None:
    if name in _COMPILE_EVENTS:
        _compiled.seconds = getattr(_compiled, "seconds", 0.0) + seconds


jax.monitoring.register_event_duration_secs_listener(_on_event)


@dataclasses.dataclass
class GenerationResult:
    """Generated texts and ids, and honest timings (`block_until_ready` at each boundary):
    `prefill_s` covers pre-fill, core-neuron selection and gathering the core weights;
    `decode_s` the decode loop, which ran `decode_steps` forward passes. `compile_s` is the
    tracing and compiling inside those two (0.0 when every program was compiled before; with
    `warmup=True` the warm-up run's, which the timings then exclude)."""

    texts: list[str]
    tokens: list[list[int]]
    prompt_tokens: list[int]
    prefill_s: float
    decode_s: float
    decode_steps: int
    method: Method
    core_neurons: np.ndarray | None = None  # [B, n_sparse, n_keep]
    logits: np.ndarray | None = None  # [B, max_new_tokens, V] with return_logits
    compile_s: float = 0.0
    chat: bool = False  # whether the prompts went through the tokenizer's chat template

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by the decode loop per second, summed over the batch."""
        return len(self.tokens) * self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


def _is_integer(x: Any) -> bool:
    """An int or NumPy integer, not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


class Generator:
    """Generation from one model.

    With `offload=True` (memory-limited mode, see `offload`) only the non-FFN weights live on
    the accelerator; FFN weights stay in host memory (`host_memory`: "auto", "numpy" or
    "pinned_host"), pre-fill streams them layer by layer and decoding uses the core neurons
    placed on the device. It needs a sparse method.
    """

    def __init__(self, cfg: ModelConfig, params: Params, tokenizer: Any, offload: bool = False,
                 host_memory: str = "auto", mesh: str | tuple[int, int] | Mesh | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.mesh = None if mesh is None else make_mesh(mesh)
        if self.mesh is not None:
            if offload:
                raise MeshError("offload mode runs on one device; it cannot be combined with a mesh")
            params = place_params(params, cfg, self.mesh)
        self.params = params
        self.offloaded = split_params(params, cfg, host_memory) if offload else None
        self.derived: dict = {}  # what methods build from the weights once (`Method.prepare`)
        self.stop_tables: dict[tuple[str, ...], jnp.ndarray] = {}  # per set of stop strings

    @classmethod
    def load(cls, checkpoint: str | Path = DEFAULT_CHECKPOINT, dtype: str | None = None, offload: bool = False,
             host_memory: str = "auto", mesh: str | tuple[int, int] | Mesh | None = None) -> Generator:
        """`mesh` ("DATAxTENSOR", e.g. "1x4", or a `(data, tensor)` Mesh) splits the model over
        devices (`models.sharding`): each device restores only its own shard of every weight."""
        mesh = None if mesh is None else make_mesh(mesh)
        # Offloaded: restore to host memory, so the full model never has to fit the device.
        return cls(*load_checkpoint(checkpoint, dtype, on_device=not offload, mesh=mesh), offload=offload,
                   host_memory=host_memory, mesh=mesh)

    def on_mesh(self) -> contextlib.AbstractContextManager:
        """The context the compiled programs run in: the model's mesh, if it has one."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def resolve(self, method: Method) -> Method:
        """`method` validated for this model, with shard-local selection over the mesh's tensor axis."""
        if not isinstance(method, Method):  # e.g. the class `Stability` for `Stability()`
            raise MethodError(f"method must be a decoding method such as Dense() or Stability(keep=0.4), "
                              f"got {method!r}")
        if self.mesh is not None and self.mesh.shape[TENSOR] > 1:
            method = method.sharded(self.mesh.shape[TENSOR])
        return method.validate(self.cfg).prepare(self.params, self.derived)

    @functools.cached_property
    def newline_tokens(self) -> frozenset[int]:
        """Ids of every token whose text contains a newline."""
        return frozenset(i for i in self.tokenizer.get_vocab().values() if "\n" in self.tokenizer.decode([i]))

    def encode(self, prompts: str | Sequence[str], chat: bool = False) -> list[list[int]]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InputError("no prompt given")
        ids = []
        for p in prompts:
            if not p.strip():
                raise InputError("prompt is empty")
            if chat:
                ids.append(list(self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                    return_dict=False)))
            else:
                ids.append(self.tokenizer(p)["input_ids"])
        return ids

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, method: Method = Dense(),
                 sampling: Sampling = Sampling(), seed: int = 0, chat: bool = False,
                 stop_at_eos: bool = True, stop_at_newline: bool = False, stop_strings: Sequence[str] = (),
                 warmup: bool = False) -> GenerationResult:
        """Generate from text. `chat` makes each prompt a user turn of the tokenizer's chat template
        (off by default here, so scripted and evaluation prompts stay as written; the `generate`
        command turns it on for a model that has one). `stop_at_newline` ends a row at the first
        token containing a newline (one-line answers, as in the paper's QA runs), which is dropped.
        A row also ends once its text contains one of `stop_strings`; its text is cut before the
        first one (its tokens keep the one that completed it)."""
        stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        ids = self.encode(prompts, chat)
        stops = self.newline_tokens if stop_at_newline else ()
        result = self.generate_ids(ids, max_new_tokens, method, sampling, seed, stop_at_eos, stop_tokens=stops,
                                   stop_strings=stop_strings, warmup=warmup)
        result.chat = chat
        if stop_at_newline:
            result.tokens = [t[:-1] if t and t[-1] in stops else t for t in result.tokens]
        result.texts = [cut(self.tokenizer.decode(t, skip_special_tokens=True), stop_strings) for t in result.tokens]
        return result

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                     method: Method = Dense(), sampling: Sampling = Sampling(), seed: int = 0,
                     stop_at_eos: bool = True, return_logits: bool = False,
                     stop_tokens: Sequence[int] = (), stop_strings: Sequence[str] = (),
                     warmup: bool = False) -> GenerationResult:
        """Generate from token-id prompts of any lengths (batched, right-padded to a bucket).

        A row ends at EOS (with `stop_at_eos`), at any of `stop_tokens`, once the text of its
        new tokens contains one of `stop_strings` (`runtime.stop_strings`), or after
        `max_new_tokens`; the stopping token is part of `tokens`. `warmup` runs the request once
        first, so that the timings exclude compiling (the result's `compile_s`).
        """
        request = (prompts, max_new_tokens, method, sampling, seed, stop_at_eos, return_logits, stop_tokens,
                   self.stop_table(stop_strings))
        warm_compile_s = self._generate_ids(*request).compile_s if warmup else 0.0
        result = self._generate_ids(*request)
        result.compile_s += warm_compile_s
        return result

    def _generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, method: Method,
                      sampling: Sampling, seed: int, stop_at_eos: bool, return_logits: bool,
                      stop_tokens: Sequence[int], stops: jnp.ndarray | None) -> GenerationResult:
        cfg = self.cfg
        if not _is_integer(seed):
            raise InputError(f"seed must be an integer, got {seed!r}")
        if sampling.top_k > cfg.vocab_size:
            raise InputError(f"top_k={sampling.top_k} exceeds the model's vocabulary of {cfg.vocab_size} tokens")
        check_ids(prompts, cfg.vocab_size, "prompt")
        method = self.resolve(method)
        rows = len(prompts)
        prompts = self._fill_data_shards(prompts)
        tokens, lengths, cache_len = self._pack(prompts, max_new_tokens)
        windows = cache_windows(tokens.shape[1], max(len(p) for p in prompts), max_new_tokens)
        eos = stop_ids((cfg.eos_token_ids if stop_at_eos else ()) + tuple(stop_tokens), cfg.vocab_size)
        # Rows that only fill the mesh's data axis want no tokens: done at once, they cannot keep
        # the decode loop running after the prompts have stopped (a sampled copy draws its own).
        limit = jnp.asarray(np.where(np.arange(len(prompts)) < rows, max_new_tokens, 0), jnp.int32)  # [B]

        with self.on_mesh():
            compiled_before = getattr(_compiled, "seconds", 0.0)
            t0 = time.perf_counter()
            first_logits, cache, core, weights = self._prefill(tokens, lengths, windows[0], method, rows)
            jax.block_until_ready((first_logits, cache, core, weights))
            t1 = time.perf_counter()
            out = engine.decode(weights, first_logits, cache, lengths, limit, eos, jax.random.key(seed), stops, cfg=cfg,
                                sampling=sampling, max_steps=cache_len - tokens.shape[1],
                                return_logits=return_logits, ffn_fn=method.decode_ffn)
            for slots in windows[1:]:
                if not out["more"]:  # one host sync per segment
                    break
                cache = engine.grow_cache(out.pop("cache"), slots=slots)
                out = engine.resume(weights, {k: out[k] for k in engine.STATE if k in out}, cache, limit, eos, stops,
                                    cfg=cfg, sampling=sampling, ffn_fn=method.decode_ffn)
            out = jax.block_until_ready(out)
            t2 = time.perf_counter()
            compile_s = getattr(_compiled, "seconds", 0.0) - compiled_before

        steps = int(out["steps"])
        generated = np.asarray(out["tokens"])[:rows, :max_new_tokens]
        token_lists = [[int(t) for t in row if t >= 0] for row in generated]
        return GenerationResult(
            texts=[], tokens=token_lists, prompt_tokens=[len(p) for p in prompts[:rows]],
            prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=steps, method=method,
            core_neurons=None if core is None else np.asarray(method.neuron_ids(core))[:rows],
            logits=np.asarray(out["logits"])[:rows, :max_new_tokens] if return_logits else None, compile_s=compile_s,
        )

    def stop_table(self, stop_strings: Sequence[str]) -> jnp.ndarray | None:
        """The decode loop's table for `stop_strings` (None for none), built once per set."""
        key = tuple(sorted({stop_strings} if isinstance(stop_strings, str) else set(stop_strings)))
        if key and key not in self.stop_tables:
            self.stop_tables[key] = jnp.asarray(stop_table(self.tokenizer, key, self.cfg.vocab_size))
        return self.stop_tables.get(key)

    def score_ids(self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                  method: Method = Dense()) -> list[tuple[np.ndarray, np.ndarray]]:
        """Teacher-forced log-probabilities of each continuation after its context.

        The context is pre-filled densely and chooses the core neurons (as in generation);
        the continuation is then run as one jitted chunk through the decode-time weights
        (sparse FFN in the sparse layers), which is exactly teacher-forced sparse decoding.
        Returns, per row, the log-probability of each continuation token `[C]` and whether
        it was the greedy choice `[C]`.
        """
        method = self.resolve(method)
        check_ids(contexts, self.cfg.vocab_size, "context")
        check_ids(continuations, self.cfg.vocab_size, "continuation")
        if len(contexts) != len(continuations):
            raise InputError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        if any(len(c) == 0 for c in continuations):
            raise InputError("continuation is empty")
        longest = max(len(c) for c in continuations)
        rows = len(contexts)
        contexts, continuations = self._fill_data_shards(contexts), self._fill_data_shards(continuations)
        tokens, lengths, _ = self._pack(contexts, longest)
        # Padded to a bucket so nearby continuation lengths share a compile.
        chunk = prompt_bucket(longest, self.cfg.max_position_embeddings)
        targets = np.zeros((len(contexts), chunk), np.int32)
        for row, c in zip(targets, continuations):
            row[: len(c)] = c
        with self.on_mesh():
            first_logits, cache, _, weights = self._prefill(tokens, lengths, cache_length(tokens.shape[1], chunk),
                                                            method, rows)
            logprobs, greedy = engine.score_continuation(weights, first_logits, cache, lengths,
                                                         jnp.asarray(targets), cfg=self.cfg, ffn_fn=method.decode_ffn)
        logprobs, greedy = np.asarray(logprobs), np.asarray(greedy)
        return [(logprobs[i, : len(c)], greedy[i, : len(c)]) for i, c in enumerate(continuations[:rows])]

    def _fill_data_shards(self, rows: Sequence[Sequence[int]]) -> list[Sequence[int]]:
        """`rows` with copies of the last appended until they split evenly over the mesh's data
        axis (the copies' results are dropped, and `_prefill` keeps them out of a batch-shared
        core set)."""
        rows = list(rows)
        data = 1 if self.mesh is None else self.mesh.shape[DATA]
        return rows + rows[-1:] * (-len(rows) % data)

    @staticmethod
    def _check_offload(method: Method) -> None:
        if not method.sparse_layers():
            raise MethodError("offload mode needs a sparse method (stability or similarity): a dense decode would "
                              "stream every FFN weight for every token")
        refusal = method.offload_refusal()
        if refusal is not None:
            raise MethodError(f"offload mode cannot serve the {method.name} method: {refusal}")

    def _prefill(self, tokens: jnp.ndarray, lengths: jnp.ndarray, cache_len: int, method: Method,
                 rows: int | None = None):
        """Pre-fill (streamed in offload mode) of `tokens` whose first `rows` rows (default: all)
        are prompts, the rest filling the mesh's data axis: first logits, cache, core neurons
        (None for dense) and the decode-time weights (core neurons gathered in the sparse layers)."""
        tables = method.tables()
        B = tokens.shape[0]
        counted = None if rows in (None, B) else jnp.arange(B) < rows  # [B]
        if self.offloaded is None:
            first_logits, cache, core = engine.prefill(self.params, tokens, lengths, tables, counted, cfg=self.cfg,
                                                       method=method, cache_len=cache_len)
            weights = method.decode_weights(self.params, core)
        else:
            self._check_offload(method)
            device_params, host_ffn = self.offloaded
            first_logits, cache, core = prefill_streamed(device_params, host_ffn, tokens, lengths, tables,
                                                         cfg=self.cfg, method=method, cache_len=cache_len)
            weights = place_core_weights(device_params, host_ffn, core, method)
        return first_logits, cache, core, weights

    def _pack(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[jnp.ndarray, jnp.ndarray, int]:
        context = self.cfg.max_position_embeddings
        if not _is_integer(max_new_tokens) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not len(prompts) or any(len(p) == 0 for p in prompts):
            raise InputError("prompt is empty")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > context:
            raise InputError(
                f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                f"context of {context} tokens"
            )
        bucket = prompt_bucket(longest, context)
        tokens = np.zeros((len(prompts), bucket), np.int32)
        for row, p in zip(tokens, prompts):
            row[: len(p)] = p
        lengths = np.array([len(p) for p in prompts], np.int32)
        return jnp.asarray(tokens), jnp.asarray(lengths), cache_length(bucket, max_new_tokens)
