"""Command-line options shared by the subcommands: the model, and the decoding method."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Sequence

from coreinfer_jax.calibrate.predictor import default_predictor_dir, hybrid_layers
from coreinfer_jax.errors import CoreInferError, MethodError
from coreinfer_jax.models.checkpoint import DEFAULT_CHECKPOINT, DTYPES
from coreinfer_jax.sparse.budget import Budget, BudgetError
from coreinfer_jax.sparse.hybrid import SELECT_BY, Hybrid
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.sparse.predictor import Predictor, PredictorError
from coreinfer_jax.sparse.method import Dense, Method
from coreinfer_jax.sparse.registry import METHODS, make_method, parse_layers
from coreinfer_jax.sparse.rules import RULES, SHARES
from coreinfer_jax.sparse.token_step import RESTS


def layers_arg(text: str) -> tuple[int, int]:
    """`parse_layers` as an argparse type: its message, not argparse's generic one; an empty or
    reversed range gets its own (it is not outside the model)."""
    try:
        first, end = parse_layers(text)
    except CoreInferError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if end <= first:
        raise argparse.ArgumentTypeError(f"{text} is an empty range: END must be greater than START "
                                         f"(half-open: START:END makes layers START .. END-1 sparse)")
    return first, end


def add_model_args(p: argparse.ArgumentParser, mesh: bool = True) -> None:
    """`--checkpoint`, `--dtype` and, for commands that decode (`mesh`), `--mesh` and the
    multi-process options."""
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help=f"converted checkpoint directory (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (default: the checkpoint's)")
    if not mesh:
        return
    p.add_argument("--mesh", default=None, metavar="DATAxTENSOR",
                   help="split the model over DATA x TENSOR devices, e.g. 1x4 (tensor parallel over 4; "
                        "sparse methods select shard-locally); default: one device")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="several processes (hosts) drive one --mesh: process 0's address (jax.distributed)")
    p.add_argument("--num-processes", type=int, default=1, help="with --coordinator: how many processes")
    p.add_argument("--process-id", type=int, default=0, help="with --coordinator: this process's index")


def add_method_args(p: argparse.ArgumentParser, default: str = "dense", several_keeps: bool = False) -> None:
    p.add_argument("--method", choices=list(METHODS), default=default)
    group = p.add_argument_group("sparse methods", "options of the sparse methods (an error with --method dense)")
    sparse: list[argparse.Action] = []

    def option(*names: str, **kwargs: Any) -> None:
        sparse.append(group.add_argument(*names, **kwargs))

    if several_keeps:
        option("--keep", type=float, nargs="+", default=None,
               help="keep values of the sparse rows (default 0.2 0.4 0.6, hybrid: its recommended static keep; "
                    "bench --batch and --compile-depths: 0.4 for every method); dense rows are measured too "
                    "(eval: unless --no-dense)")
    else:
        option("--keep", type=float, default=None,
               help="fraction of FFN neurons kept per sparse layer (default 0.4; hybrid: the static core's, "
                    "default its recommended one)")
    option("--token-keep", type=float, default=0.2,
           help="token-wise core fraction, relative to the mean positive count")
    option("--layers", type=layers_arg, default=None,
           help="sparse layers as a half-open range START:END (default: the paper's 6..26 of 32, scaled; "
                "hybrid: its recommended range for the model family)")
    option("--calibration", type=Path, default=None,
           help="calibration directory of --method similarity (made by the calibrate command)")
    option("--rule", choices=list(RULES), default=None,
           help="the core's selection rule: paper (CoreInfer's, the stability default), magnitude, "
                "normalized_magnitude, griffin (hybrid default: its recommended one)")
    option("--down-weighted", action="store_true",
           help="rank each neuron's activation times its down-projection row's norm (WINA-style)")
    option("--compensate", action="store_true",
           help="add the left-out neurons' prompt means to each decode step's FFN output (FLAP-style)")
    option("--dynamic", type=float, default=None,
           help="hybrid: per-token neurons chosen at each step, a fraction of the FFN width")
    option("--predictor", type=Path, default=None,
           help="hybrid: low-rank predictor directory made by the predictor command (with --select-by "
                "predictor, default CHECKPOINT/predictor)")
    option("--select-by", choices=list(SELECT_BY), default=None,
           help="hybrid: choose per-token neurons by a 4-bit sketch of the weights (the gated default), "
                "a fitted low-rank predictor, or the true activations (oracle: a quality bound that "
                "reads every weight)")
    option("--rest", choices=list(RESTS), default=None,
           help="hybrid: what the neurons in neither set add: zero (skipped, CoreInfer's way) or sketch "
                "(their 4-bit sketch estimate through a 4-bit down projection; the gated default)")
    option("--share", choices=list(SHARES), default="row",
           help="core neurons per row, or one set for the whole batch (gathered once: batch throughput)")
    option("--shards", type=int, default=1,
           help="shard-local selection over N equal blocks of neurons, as a tensor-parallel mesh of N "
                "does (set by --mesh; give it alone to measure its quality on one device)")
    option("--layer-neurons", default=None,
           help="per-layer budget: neurons of each sparse layer, comma-separated, totalling --keep's")
    option("--budget", type=Path, default=None,
           help="per-layer budget JSON made by the budget command (allocated for each --keep)")
    p.set_defaults(default_keeps=[0.2, 0.4, 0.6] if several_keeps else [0.4],
                   sparse_defaults={(a.dest, a.option_strings[0]): a.default for a in sparse})


def parse_layer_neurons(text: str) -> tuple[int, ...]:
    """`--layer-neurons 500,520,...` -> `(500, 520, ...)`; `Stability.validate` checks the total."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise MethodError(f"--layer-neurons must be comma-separated integers, got {text!r}") from None


def methods_from_args(args: argparse.Namespace, keeps: Sequence[float] | None) -> list[Method]:
    """The sparse methods of the common CLI options (`--method --rule --token-keep --layers
    --calibration --layer-neurons --budget --dynamic --predictor --select-by`), one per keep
    (None: the method's defaults); none for `--method dense`, which takes none of them."""
    if args.method == "dense":
        given = [flag for (dest, flag), default in args.sparse_defaults.items() if getattr(args, dest) != default]
        if given:
            raise MethodError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} only to the sparse methods, "
                              "not to --method dense: add --method stability, similarity or hybrid")
        return []
    hybrid = args.method == "hybrid"
    if not hybrid and (args.dynamic is not None or args.predictor is not None or args.select_by is not None
                       or args.rest is not None):
        raise MethodError("--dynamic, --predictor, --select-by and --rest apply to --method hybrid")
    if hybrid:
        return [hybrid_from_args(args, k) for k in keeps or [None]]
    keeps = keeps or args.default_keeps
    if args.budget is not None:
        if args.method != "stability" or args.layer_neurons is not None:
            raise MethodError("--budget needs --method stability and no --layer-neurons")
        budget = Budget.load(args.budget)
        if args.rule is not None and args.rule != budget.rule:
            raise BudgetError(f"--rule {args.rule} but the budget {args.budget} was measured for rule {budget.rule}")
        if args.layers is not None and tuple(args.layers) != budget.layers:
            raise BudgetError(f"--layers {args.layers[0]}:{args.layers[1]} but the budget {args.budget} is for "
                              f"{budget.layers[0]}:{budget.layers[1]}")
        return [dataclasses.replace(budget.method(k), token_keep=args.token_keep, down_weighted=args.down_weighted,
                                    compensate=args.compensate, share=args.share, shards=args.shards) for k in keeps]
    layer_keep = parse_layer_neurons(args.layer_neurons) if args.layer_neurons is not None else None
    if layer_keep is not None and len(keeps) > 1:
        raise MethodError("--layer-neurons fixes one total: give a single --keep")
    methods = [make_method(args.method, keep=k, token_keep=args.token_keep, layers=args.layers,
                           calibration=args.calibration, rule=args.rule, layer_keep=layer_keep) for k in keeps]
    for option in ("down_weighted", "compensate"):
        if getattr(args, option):
            if args.method != "stability":
                raise MethodError(f"--{option.replace('_', '-')} applies to the stability and hybrid methods")
            methods = [dataclasses.replace(m, **{option: True}) for m in methods]
    if args.share != "row" or args.shards != 1:
        if args.method not in ("stability", "similarity"):
            raise MethodError("--share and --shards apply to the stability, similarity (and, --shards, hybrid) "
                              "methods")
        methods = [dataclasses.replace(m, share=args.share, shards=args.shards) for m in methods]
    return methods


def hybrid_from_args(args: argparse.Namespace, keep: float | None) -> Hybrid:
    """`--method hybrid`: what the options set, the rest left to the model family's recommended
    configuration; a low-rank predictor from `--predictor`, or with `--select-by predictor`
    the checkpoint's own (or a message saying how to make it)."""
    if args.budget is not None or args.layer_neurons is not None or args.calibration is not None:
        raise MethodError("--budget, --layer-neurons and --calibration do not apply to --method hybrid")
    if args.share != "row":
        raise MethodError("--share does not apply to --method hybrid (it picks each row's own neurons at every step)")
    settings = {k: v for k, v in (("keep", keep), ("dynamic", args.dynamic), ("rule", args.rule),
                                  ("layers", args.layers), ("rest", args.rest)) if v is not None}
    predictor = args.predictor
    if args.select_by == "predictor":
        predictor = predictor or default_predictor_dir(args.checkpoint)
        if not predictor.exists():
            raise PredictorError(f"the hybrid method needs a predictor and {predictor} does not exist; make it with "
                                 f"`python -m coreinfer_jax predictor --checkpoint {args.checkpoint} "
                                 f"--data WIKITEXT_FILE` or give --predictor DIR")
    method = Hybrid(predictor=predictor, select_by=args.select_by, token_keep=args.token_keep,
                    down_weighted=args.down_weighted, compensate=args.compensate, shards=args.shards, **settings)
    if isinstance(method.predictor, Predictor):
        check_predictor_layers(method.predictor, args)
    return method


def check_predictor_layers(fitted: Predictor, args: argparse.Namespace) -> None:
    """A predictor that does not cover the sparse layers: say which command fixes it (the
    method's own check knows the layers but not the command line)."""
    config = Path(args.checkpoint) / "config.json"
    if not config.is_file():
        return  # loading the checkpoint reports it
    cfg = ModelConfig.load(config)
    first, end = args.layers or hybrid_layers(cfg)
    if fitted.covers(first, end):
        return
    have = f"{fitted.layers[0]}:{fitted.layers[1]}"
    which = "--layers" if args.layers else "--method hybrid's default for this model"
    raise PredictorError(f"the predictor has factors for layers {have}, not for the sparse layers {first}:{end} "
                         f"({which}): fit one for them with `python -m coreinfer_jax predictor --checkpoint "
                         f"{args.checkpoint} --data FILE --layers {first}:{end} --out DIR` (without --layers it "
                         f"fits {':'.join(map(str, hybrid_layers(cfg)))}) and give --predictor DIR, or add --layers "
                         f"{have} here")


def method_from_args(args: argparse.Namespace) -> Method:
    """The one method of `generate`'s options: dense, or the sparse one they make."""
    sparse = methods_from_args(args, None if args.keep is None else [args.keep])
    return sparse[0] if sparse else Dense()


# `--hybrid` words that switch an option on.
OPTION_WORDS = {"compensate": "compensate", "down": "down_weighted"}


def hybrid_arg(text: str) -> dict[str, Any]:
    """`--hybrid KEEP+DYNAMIC[:WORD]...`, e.g. `0.25+0.25`, `0+0.5`, `0.2+0.2:griffin:oracle`,
    `0.2+0.2:predictor:compensate`, `0.24+0.24:rest=zero`; a word is a rule, how per-token
    neurons are chosen (sketch, predictor or oracle; default: the family's), `compensate`, `down`
    (`down_weighted`) or `rest=zero|sketch`."""
    spec, *rest = text.split(":")
    try:
        keep, dynamic = (float(x) for x in spec.split("+"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hybrid takes KEEP+DYNAMIC[:WORD]..., got {text!r}") from None
    settings: dict[str, Any] = {"keep": keep, "dynamic": dynamic}
    for word in rest:
        if word in SELECT_BY:
            settings["select_by"] = word
        elif word in RULES:
            settings["rule"] = word
        elif word in OPTION_WORDS:
            settings[OPTION_WORDS[word]] = True
        elif word.removeprefix("rest=") in RESTS and word.startswith("rest="):
            settings["rest"] = word.removeprefix("rest=")
        else:
            raise argparse.ArgumentTypeError(f"--hybrid: {word!r} is neither a rule ({', '.join(RULES)}), one of "
                                             f"{', '.join(SELECT_BY)}, {', '.join(OPTION_WORDS)}, nor "
                                             f"{' or '.join('rest=' + r for r in RESTS)}")
    return settings
