"""CoreInfer as an lm-evaluation-harness model, so every lm-eval task can score it.

The point is to measure CoreInfer's quality on the same benchmarks, prompts and metrics as
any other model: multiple-choice tasks through `loglikelihood` (the context is pre-filled
densely and picks the core neurons, the continuation is scored teacher-forced with the
sparse FFN, exactly as sparse decoding would see it) and generation tasks through
`generate_until` (the library's own batched sparse decoding).

Command line (lm-eval 0.4.13 discovers no out-of-tree models: no entry point, no plugin
import flag; so this module registers the model and then runs lm-eval's own CLI, which
takes its usual arguments):

    python -m coreinfer_jax.evaluation.lm_eval_adapter run --model coreinfer_jax \
        --model_args checkpoint=DIR,method=stability,keep=0.4,layers=6:25,batch_size=8 \
        --tasks arc_easy,hellaswag

Python:

    import lm_eval
    import coreinfer_jax.evaluation.lm_eval_adapter  # registers "coreinfer_jax"
    lm_eval.simple_evaluate(model="coreinfer_jax", tasks=["arc_easy"],
                            model_args="checkpoint=DIR,method=stability,keep=0.4")

Model args: `checkpoint` (default: the converted SmolLM2), `method`
(dense|stability|similarity|hybrid), `keep`, `token_keep`, `layers` (START:END, half-open; these
three are an error with method=dense, defaults as `make_method`), `rule` (stability, hybrid),
`calibration` (DIR from `python -m coreinfer_jax calibrate`, similarity only), `dynamic` and
`predictor` (hybrid: per-token fraction; a low-rank predictor DIR from `python -m coreinfer_jax
predictor` instead of the default 4-bit sketch), `batch_size` (wins over lm-eval's `--batch_size`, whose
default is 1), `dtype` (float32|bfloat16|float16), `max_gen_toks` (default for tasks that
set none), `mesh` (DATAxTENSOR, e.g. 1x4: the model split over devices), `share` (row|batch:
one core set per batch, stability and similarity), `compensate` (true|false: FLAP-style
compensation, stability and hybrid) and `rest` (zero|sketch, hybrid: what the neurons in
neither set add). Anything else is an error.

Choices:
- As in generation, the first continuation token is predicted by the dense pre-fill: tasks
  whose continuations are one token (MMLU-style letters) score exactly as dense, and
  sparsity shows from the second continuation token on.
- Requests longer than the model's context are left-truncated (the context keeps its last
  tokens) with a warning, as HFLM does; a continuation that alone fills the context is an
  error. Unlike HFLM, context + continuation must fit the window (HFLM allows one more).
- `loglikelihood_rolling` (perplexity tasks such as wikitext) raises NotImplementedError:
  CoreInfer picks core neurons from a prompt, and lm-eval's rolling windows have none (the
  first window starts from a lone BOS). `python -m coreinfer_jax eval --task wikitext`
  pre-fills a prefix densely and scores the rest sparsely.
- Sampled generation (`do_sample`) seeds each batch with its index, so runs repeat exactly.
  `do_sample=True` with temperature 0 is an error, as with lm-eval's `hf` model (Transformers
  refuses a temperature of 0 when sampling): a task asking for samples does not get greedy
  answers silently.

The module is long because lm-eval's model interface is one class (argument checking, three
request kinds, batching); split, one concept would be spread over several files.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.checkpoint import DEFAULT_CHECKPOINT, DTYPES
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.runtime.sampling import Sampling
from coreinfer_jax.runtime.stop_strings import cut
from coreinfer_jax.sparse.registry import make_method, parse_layers
from coreinfer_jax.sparse.rules import check_share

log = logging.getLogger(__name__)
# lm-eval registers its built-in models only into an empty registry: without this, importing
# this module first would hide "hf", "vllm", ... from the same process.
importlib.import_module("lm_eval.models")

# Generation kwargs `generate_until` understands (lm-eval's normalize_gen_kwargs maps the max aliases).
GEN_KWARGS = {"until", "do_sample", "temperature", "top_p", "top_k",
              "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"}
Request = tuple[tuple[str, str], list[int], list[int]]


def _number(name: str, value: Any, kind: type) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise CoreInferError(f"model arg {name} must be a number, got {value!r}") from None
    if kind is int and number != float(value):
        raise CoreInferError(f"model arg {name} must be an integer, got {value!r}")
    return number


def _flag(name: str, value: Any) -> bool:
    """A boolean model arg: lm-eval passes `compensate=true` as the string "true"."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise CoreInferError(f"model arg {name} must be true or false, got {value!r}")


@register_model("coreinfer_jax")
class CoreInferLM(TemplateLM):
    """lm-eval model backed by `Generator`: dense or CoreInfer sparse scoring and generation."""

    def __init__(self, checkpoint: str | Path = DEFAULT_CHECKPOINT, method: str = "dense", keep: float | None = None,
                 token_keep: float | None = None, layers: str | tuple[int, int] | None = None,
                 rule: str | None = None, calibration: str | Path | None = None, dynamic: float | None = None,
                 predictor: str | Path | None = None, batch_size: int = 8, dtype: str | None = None,
                 max_gen_toks: int = 256, mesh: str | None = None, share: str | None = None,
                 compensate: bool | str = False, rest: str | None = None) -> None:
        super().__init__()
        sparse: dict[str, Any] = {name: _number(name, value, float) for name, value in
                                  (("keep", keep), ("token_keep", token_keep), ("dynamic", dynamic)) if value is not None}
        if rule is not None:
            sparse["rule"] = str(rule)
        if layers is not None:
            sparse["layers"] = layers if isinstance(layers, tuple) else parse_layers(str(layers))
        if method == "dense" and sparse:
            # A dense run labelled keep=... in lm-eval's results would be misleading.
            raise CoreInferError(f"{', '.join(sparse)} only apply to sparse methods, not method=dense")
        method_obj = make_method(str(method), **sparse, calibration=calibration, predictor=predictor)
        if share is not None:
            if method not in ("stability", "similarity"):
                raise CoreInferError(f"share applies to the stability and similarity methods, not method={method}")
            method_obj = dataclasses.replace(method_obj, share=check_share(str(share)))
        if rest is not None:
            if method != "hybrid":
                raise CoreInferError(f"rest applies to the hybrid method, not method={method}")
            method_obj = dataclasses.replace(method_obj, rest=str(rest))
        if _flag("compensate", compensate):
            if method not in ("stability", "hybrid"):
                raise CoreInferError(f"compensate applies to the stability and hybrid methods, not method={method}")
            method_obj = dataclasses.replace(method_obj, compensate=True)
        self.batch_size = _number("batch_size", batch_size, int)
        self._max_gen_toks = _number("max_gen_toks", max_gen_toks, int)
        if self.batch_size < 1 or self._max_gen_toks < 1:
            raise CoreInferError(f"batch_size and max_gen_toks must be >= 1, got {batch_size} and {max_gen_toks}")
        if dtype is not None and dtype not in DTYPES:
            raise CoreInferError(f"model arg dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.gen = Generator.load(checkpoint, dtype, mesh=None if mesh is None else str(mesh))
        self.method = self.gen.resolve(method_obj)  # a bad layer range fails now, not mid-run
        self.tokenizer = self.gen.tokenizer

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict[str, Any] | None = None) -> CoreInferLM:
        accepted = list(inspect.signature(cls.__init__).parameters)[1:]  # every argument of __init__
        unknown = sorted(set(arg_dict) - set(accepted))
        if unknown:
            raise CoreInferError(f"unknown coreinfer_jax model arg(s) {', '.join(unknown)}; "
                                 f"accepted: {', '.join(accepted)}")
        harness = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if harness.get("device"):
            log.warning("device=%s ignored: JAX runs on its default backend (choose it with JAX_PLATFORMS)",
                        harness["device"])
        args = dict(arg_dict)
        if "batch_size" in harness and "batch_size" not in args:
            if str(harness["batch_size"]).startswith("auto"):
                raise CoreInferError("batch_size=auto is not supported by coreinfer_jax; give a number")
            args["batch_size"] = harness["batch_size"]
        return cls(**args)

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict[str, Any] | None = None) -> CoreInferLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.gen.cfg.eos_token_ids[0]

    @property
    def prefix_token_id(self) -> int:
        """The one-token context of an empty context: BOS, else EOS (as HFLM)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.gen.cfg.max_position_embeddings

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The tokenizer's own special tokens (HFLM's default), none if the text already starts with BOS."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _padded(self, rows: list[Any]) -> list[Any]:
        """`rows` filled up to `batch_size` with copies of its last row: one compile per shape bucket."""
        return rows + [rows[-1]] * (self.batch_size - len(rows))

    def _warn_truncated(self, count: int, what: str) -> None:
        if count:
            log.warning("%d %s request(s) left-truncated to the model's context of %d tokens",
                        count, what, self.max_length)

    def _batches(self, order: Sequence[int], contexts: list[list[int]],
                 continuations: list[list[int]]) -> Iterator[list[int]]:
        """Consecutive batches of `order` whose longest context plus longest continuation fits."""
        batch: list[int] = []
        for i in order:
            trial = batch + [i]
            fits = max(len(contexts[j]) for j in trial) + max(len(continuations[j]) for j in trial) <= self.max_length
            if batch and (len(trial) > self.batch_size or not fits):
                yield batch
                trial = [i]
            batch = trial
        if batch:
            yield batch

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        contexts, continuations, truncated = [], [], 0
        for (context, continuation), context_enc, continuation_enc in requests:
            if len(continuation_enc) >= self.max_length:
                raise CoreInferError(f"continuation of {len(continuation_enc)} tokens leaves no room for a context "
                                 f"in the model's {self.max_length}: {continuation[:80]!r}")
            room = self.max_length - len(continuation_enc)
            truncated += len(context_enc) > room
            contexts.append((context_enc or [self.prefix_token_id])[-room:])  # "" after moving spaces
            continuations.append(continuation_enc)
        self._warn_truncated(truncated, "loglikelihood")
        # Longest first, so each batch pads little and a too-long input fails at once.
        order = sorted(range(len(requests)), key=lambda i: -(len(contexts[i]) + len(continuations[i])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="coreinfer_jax loglikelihood") as bar:
            for batch in self._batches(order, contexts, continuations):
                scores = self.gen.score_ids(self._padded([contexts[i] for i in batch]),
                                            self._padded([continuations[i] for i in batch]), self.method)
                for i, (logprobs, greedy) in zip(batch, scores):
                    results[i] = (float(logprobs.sum()), bool(greedy.all()))
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
                bar.update(len(batch))
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("coreinfer_jax has no rolling log-likelihood (core neurons need a prompt); "
                                  "for perplexity use `python -m coreinfer_jax eval --task wikitext`")

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        results = [""] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="coreinfer_jax generate_until") as bar:
            for indices in groups.values():
                gen_kwargs = requests[indices[0]].args[1]
                for i, text in zip(indices, self._generate([requests[i].args[0] for i in indices], gen_kwargs, bar)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _generate(self, contexts: list[str], gen_kwargs: dict[str, Any], bar: tqdm) -> list[str]:
        """Texts for `contexts` that share one set of generation kwargs, cut at the first `until`."""
        unknown = sorted(set(gen_kwargs) - GEN_KWARGS)
        if unknown:
            raise CoreInferError(f"generation kwarg(s) {', '.join(unknown)} not supported by coreinfer_jax; "
                             f"supported: {', '.join(sorted(GEN_KWARGS))}")
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = [s for s in kwargs["until"] if s]
        max_new = kwargs["max_gen_toks"]
        sampling = Sampling()
        if kwargs["do_sample"]:
            temperature = float(kwargs.get("temperature", 0.0))  # lm-eval's hf model defaults to 0 too
            if not temperature > 0:
                raise CoreInferError(f"do_sample=True needs a temperature > 0, got {temperature}; "
                                     "for greedy decoding set do_sample=False")
            sampling = Sampling(temperature=temperature, top_k=int(kwargs.get("top_k") or 0),
                                top_p=float(kwargs.get("top_p") or 1.0))
        room = self.max_length - max_new
        if room < 1:
            raise CoreInferError(f"max_gen_toks={max_new} leaves no room for a prompt in the model's "
                             f"{self.max_length}-token context")
        prompts = [self.tok_encode(c) or [self.prefix_token_id] for c in contexts]
        self._warn_truncated(sum(len(p) > room for p in prompts), "generate_until")
        prompts = [p[-room:] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        texts = [""] * len(prompts)
        for seed, start in enumerate(range(0, len(order), self.batch_size)):
            batch = order[start: start + self.batch_size]
            out = self.gen.generate_ids(self._padded([prompts[i] for i in batch]), max_new, self.method,
                                        sampling, seed=seed, stop_strings=until)
            for i, tokens in zip(batch, out.tokens):
                texts[i] = cut(self.tokenizer.decode(tokens, skip_special_tokens=True), until)
            bar.update(len(batch))
        return texts


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
