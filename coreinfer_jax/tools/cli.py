"""`python -m coreinfer_jax {generate,bench,eval,calibrate,budget,predictor,sweep,data}`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from coreinfer_jax.calibrate import budget, predictor, similarity
from coreinfer_jax.errors import CoreInferError, InputError, interrupted_line, sigterm_interrupts
from coreinfer_jax.evaluation import data, evaluate, sweep
from coreinfer_jax.evaluation.data import missing_data
from coreinfer_jax.evaluation.tasks import TEMPLATES, format_prompt
from coreinfer_jax.paths import check_input, output_dir
from coreinfer_jax.runtime.compile_cache import cache_hits, use_compile_cache
from coreinfer_jax.runtime.distributed import initialize, is_main_process
from coreinfer_jax.runtime.generator import GenerationResult, Generator
from coreinfer_jax.runtime.sampling import Sampling
from coreinfer_jax.sparse.method import Dense
from coreinfer_jax.tools.args import add_method_args, add_model_args, layers_arg, method_from_args
from coreinfer_jax.tools.batch_bench import batch_main
from coreinfer_jax.tools.bench import bench_main
from coreinfer_jax.tools.compile_time import compile_main
from coreinfer_jax.tools.device_suite import suite_main
from coreinfer_jax.tools.profiling import maybe_profile
from coreinfer_jax.tools.roofline import ffn_bytes_per_token
from coreinfer_jax.tools.shapes import HF_CONFIGS

# The project's own input errors print one line; anything else is a bug and shows its traceback.
USER_ERRORS = (CoreInferError, FileNotFoundError)


def read_prompt(args: argparse.Namespace) -> str:
    """`--prompt TEXT`, or `--prompt-file FILE`'s text (trailing whitespace dropped)."""
    if args.prompt_file is not None:
        return check_input(args.prompt_file, "file", "prompt file").read_text(encoding="utf-8").rstrip()
    try:
        names_a_file = len(args.prompt) < 4096 and "\n" not in args.prompt and Path(args.prompt).is_file()
    except OSError:  # not a possible path (e.g. a name too long): certainly text
        names_a_file = False
    if names_a_file:
        print(f"note: --prompt is the text itself; to read the file {args.prompt}, use --prompt-file",
              file=sys.stderr)
    return args.prompt


def use_chat(args: argparse.Namespace, gen: Generator) -> bool:
    """The chat template by default when the tokenizer has one and no --task shapes the prompt,
    as chat tools do (an instruct model given a bare question otherwise often ends at once)."""
    has_template = bool(getattr(gen.tokenizer, "chat_template", None))
    if args.chat is None:
        return has_template and args.task == "none"
    if args.chat and not has_template:
        raise InputError(f"--chat: the tokenizer of {args.checkpoint} has no chat template")
    return args.chat


def empty_note(out: GenerationResult, gen: Generator, chat: bool) -> str | None:
    """Why the generation holds no text, as one line (None when it has some)."""
    if out.texts[0].strip():
        return None
    tokens = out.tokens[0]
    if not tokens or tokens[0] in gen.cfg.eos_token_ids:
        first = "a newline" if not tokens else "its end token"  # --stop-at-newline drops the newline
        if chat:
            hint = "try --no-chat or --task qa"
        elif getattr(gen.tokenizer, "chat_template", None):
            hint = "try --chat"
        else:
            hint = "try another prompt or --task qa"
        return f"finished at once: the model produced {first} first; {hint}"
    if gen.tokenizer.decode(tokens, skip_special_tokens=True).strip():
        return "no text before the first --stop text"
    return f"no text: the {len(tokens)} generated tokens decode to whitespace or special tokens only"


def unescape(text: str) -> str:
    """`--stop` text as meant: a shell passes "\\n" as a backslash and an n."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def generate_main(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    gen = Generator.load(args.checkpoint, args.dtype, offload=args.offload, mesh=args.mesh)
    method = gen.resolve(method_from_args(args))
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    chat = use_chat(args, gen)
    prompt = format_prompt(args.task, prompt)
    kwargs: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, method=method, sampling=sampling,
                                  seed=args.seed, chat=chat,
                                  stop_at_newline=args.stop_at_newline or args.task == "qa",
                                  stop_strings=[unescape(s) for s in args.stop])
    # The first call compiles (pre-fill and decode for this bucket); the second is timed.
    hits = cache_hits()
    warm = gen.generate(prompt, **kwargs)
    from_cache = cache_hits() - hits
    with maybe_profile(args.profile):
        out = gen.generate(prompt, **kwargs)
    if not is_main_process():
        return 0
    if args.json:
        print(json.dumps(result_json(out, warm.compile_s, from_cache, args.offload, gen)))
    else:
        print(out.texts[0])
        print(f"[{method.name}, {'chat template' if chat else 'raw prompt'}] prompt {out.prompt_tokens[0]} tokens, "
              f"{len(out.tokens[0])} new; compile {warm.compile_s:.2f}s{cached_note(from_cache)}, "
              f"pre-fill {out.prefill_s * 1e3:.1f} ms, decode {out.decode_tokens_per_s:.1f} tokens/s", file=sys.stderr)
    note = empty_note(out, gen, chat)
    if note is not None:
        print(f"note: {note}", file=sys.stderr)
    return 0


def cached_note(programs: int) -> str:
    return f" ({programs} program{'s' * (programs != 1)} from the compile cache)" if programs else ""


def check_data(args: argparse.Namespace) -> None:
    """`eval` and `sweep` need the user's data files: say so before loading a model."""
    if args.command == "eval" and args.data is None:
        raise missing_data(args.task)
    if args.command == "sweep":
        given = {task for task, _ in args.data}
        for task in args.tasks:
            if task not in given:
                raise missing_data(task, f"--data {task}=FILE")


def bench_command(args: argparse.Namespace) -> int:
    """`bench`: the device suite, compile time vs depth, or the decode-speed table."""
    if args.mesh is not None and (args.suite is not None or args.compile_depths is not None):
        raise CoreInferError("--mesh applies to the decode-speed tables (bench, bench --batch), not to --suite or "
                             "--compile-depths")
    if args.suite is not None:
        return suite_main(args)
    if args.compile_depths is not None:
        return compile_main(args)
    if args.batch is not None:
        return batch_main(args)
    return bench_main(args)


def result_json(out: GenerationResult, compile_s: float, from_cache: int, offload: bool,
                gen: Generator) -> dict[str, Any]:
    """One generation as JSON; `ffn_bytes_per_token` counts the FFN weights one decoded token reads
    in all layers (predictor factors included), `dense_ffn_bytes_per_token` the same for dense;
    `compiled_from_cache` the programs of `compile_s` read from the compile cache."""
    return {
        "offload": offload,
        "chat": out.chat,
        "text": out.texts[0],
        "tokens": out.tokens[0],
        "prompt_tokens": out.prompt_tokens[0],
        "compile_s": compile_s,
        "compiled_from_cache": from_cache,
        "prefill_s": out.prefill_s,
        "decode_s": out.decode_s,
        "decode_tokens_per_s": out.decode_tokens_per_s,
        **out.method.describe(),
        "core_neurons": None if out.core_neurons is None else out.core_neurons[0].tolist(),
        "ffn_bytes_per_token": ffn_bytes_per_token(gen.cfg, gen.params, out.method),
        "dense_ffn_bytes_per_token": ffn_bytes_per_token(gen.cfg, gen.params, Dense()),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m coreinfer_jax",
        description="CoreInfer in JAX: pre-filling a prompt picks each sparse layer's core FFN neurons, and "
                    "decoding reads only their weights. Convert a model first (`python -m convert`: the bundled "
                    "SmolLM2-135M), then e.g. `generate --prompt TEXT --method hybrid`; `COMMAND --help` lists a "
                    "command's options.",
        epilog="environment: COREINFER_HOME holds the converted checkpoints and the compile cache "
               "(default ~/.cache/coreinfer_jax); COREINFER_COMPILE_CACHE moves the cache (a directory) or turns it "
               "off (off). Every command but bench and data reads and writes compiled programs there.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    add_model_args(g)
    add_method_args(g)
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from this file (UTF-8)")
    g.add_argument("--task", choices=list(TEMPLATES), default="none",
                   help="wrap the prompt in a task template (qa, summarize, translate: few-shot; "
                        "question: the similarity method's format)")
    chat = g.add_mutually_exclusive_group()
    chat.add_argument("--chat", action="store_true", default=None,
                      help="apply the tokenizer's chat template (the default when it has one and --task is none)")
    chat.add_argument("--no-chat", "--raw", dest="chat", action="store_false", default=None,
                      help="the prompt as written, without the chat template")
    g.add_argument("--stop-at-newline", action="store_true",
                   help="end the answer at its first newline (always on with --task qa)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the answer before TEXT (repeatable; decoding stops once TEXT is written; "
                        "\\n and \\t are read as a newline and a tab)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--profile", type=output_dir, default=None, help="write a jax.profiler trace here")
    g.add_argument("--offload", action="store_true",
                   help="memory-limited mode: FFN weights stay in host memory, only core neurons go to the device")
    g.set_defaults(func=generate_main)

    b = sub.add_parser("bench", help="decode speed: Transformers PyTorch vs this project, dense and sparse")
    add_model_args(b)
    add_method_args(b, default="stability", several_keeps=True)
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--reps", type=int, default=5)
    b.add_argument("--no-torch", action="store_true", help="skip the Transformers PyTorch row")
    b.add_argument("--torch-attention", choices=["eager", "sdpa"], default="eager",
                   help="Transformers' attention implementation for the baseline row")
    b.add_argument("--json", action="store_true")
    b.add_argument("--profile", type=output_dir, default=None,
                   help="write a jax.profiler trace of the whole batch-1 table's run (not with --batch, "
                        "--compile-depths or --suite)")
    b.add_argument("--shapes", default=None, metavar="NAME",
                   help=f"a real model's shapes instead of a checkpoint ({', '.join(HF_CONFIGS)}); "
                        "the batch-1 table needs --random-weights with it, --batch and --compile-depths do not")
    b.add_argument("--random-weights", action="store_true",
                   help="random params of --shapes made on the device, a prompt of random token ids")
    b.add_argument("--tiny", action="store_true",
                   help="tiny widths of --shapes, or the tiny shapes and short runs of --suite (CPU, ~2 minutes)")
    b.add_argument("--compile-depths", type=int, nargs="+", default=None, metavar="LAYERS",
                   help="instead of decoding: compile seconds of pre-fill and decode at these depths "
                        "(--shapes' family at tiny width, default smollm2-135m)")
    b.add_argument("--suite", choices=["device"], default=None,
                   help="device: the tests that can use an accelerator, the SmolLM2- and 8B-shape bench and "
                        "memory-limited mode against Transformers (one JSON + markdown table in --out)")
    b.add_argument("--out", type=output_dir, default=Path("device_suite"), help="--suite's output directory")
    b.add_argument("--batch", type=int, nargs="+", default=None, metavar="B",
                   help="instead of the batch-1 table: throughput at these batch sizes, dense vs per-row vs "
                        "batch-shared core neurons (--keep default 0.4, for hybrid too)")
    b.set_defaults(func=bench_command)

    evaluate.add_parser(sub, add_model_args, add_method_args)
    # Calibration, budgets and predictors are fitted once, on one device.
    add_model_args(similarity.add_parser(sub), mesh=False)
    add_model_args(budget.add_parser(sub, layers_arg), mesh=False)
    add_model_args(predictor.add_parser(sub, layers_arg), mesh=False)
    sweep.add_parser(sub, add_model_args)
    data.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_interrupts():
            if getattr(args, "coordinator", None) is not None:
                initialize(args.coordinator, args.num_processes, args.process_id)
            check_data(args)
            if args.command not in ("bench", "data"):  # bench times compiles; data compiles nothing
                use_compile_cache()
            return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        line, status = interrupted_line(e)
        print(f"error: {line}", file=sys.stderr)
        return status
