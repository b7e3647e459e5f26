"""Command-line options shared by the subcommands: the model, and the decoding method."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Sequence

from coreinfer_jax.errors import CoreInferError, MethodError
from coreinfer_jax.models.checkpoint import DEFAULT_CHECKPOINT
from coreinfer_jax.sparse.budget import Budget, BudgetError
from coreinfer_jax.sparse.method import Method
from coreinfer_jax.sparse.registry import METHODS, make_method, parse_layers
from coreinfer_jax.sparse.rules import RULES


def layers_arg(text: str) -> tuple[int, int]:
    """`parse_layers` as an argparse type: its message, not argparse's generic one."""
    try:
        return parse_layers(text)
    except CoreInferError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help=f"converted checkpoint directory (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: the checkpoint's)")


def add_method_args(p: argparse.ArgumentParser, default: str = "dense", several_keeps: bool = False) -> None:
    p.add_argument("--method", choices=list(METHODS), default=default)
    if several_keeps:
        p.add_argument("--keep", type=float, nargs="+", default=[0.2, 0.4, 0.6],
                       help="keep values of the sparse rows (the dense rows are always measured)")
    else:
        p.add_argument("--keep", type=float, default=0.4, help="fraction of FFN neurons kept per sparse layer")
    p.add_argument("--token-keep", type=float, default=0.2,
                   help="token-wise core fraction, relative to the mean positive count")
    p.add_argument("--layers", type=layers_arg, default=None,
                   help="sparse layers as a half-open range START:END (default: the paper's 6..26 of 32, scaled)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="calibration directory of --method similarity (made by the calibrate command)")
    p.add_argument("--rule", choices=list(RULES), default="paper",
                   help="stability's selection rule: paper (CoreInfer's), magnitude, normalized_magnitude")
    p.add_argument("--layer-neurons", default=None,
                   help="per-layer budget: neurons of each sparse layer, comma-separated, totalling --keep's")
    p.add_argument("--budget", type=Path, default=None,
                   help="per-layer budget JSON made by the budget command (allocated for each --keep)")


def parse_layer_neurons(text: str) -> tuple[int, ...]:
    """`--layer-neurons 500,520,...` -> `(500, 520, ...)`; `Stability.validate` checks the total."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise MethodError(f"--layer-neurons must be comma-separated integers, got {text!r}") from None


def methods_from_args(args: argparse.Namespace, keeps: Sequence[float]) -> list[Method]:
    """The sparse methods of the common CLI options (`--method --rule --token-keep --layers
    --calibration --layer-neurons --budget`), one per keep."""
    if args.budget is not None:
        if args.method != "stability" or args.layer_neurons is not None:
            raise MethodError("--budget needs --method stability and no --layer-neurons")
        budget = Budget.load(args.budget)
        if args.rule != "paper" and args.rule != budget.rule:
            raise BudgetError(f"--rule {args.rule} but the budget {args.budget} was measured for rule {budget.rule}")
        if args.layers is not None and tuple(args.layers) != budget.layers:
            raise BudgetError(f"--layers {args.layers[0]}:{args.layers[1]} but the budget {args.budget} is for "
                              f"{budget.layers[0]}:{budget.layers[1]}")
        return [dataclasses.replace(budget.method(k), token_keep=args.token_keep) for k in keeps]
    layer_keep = parse_layer_neurons(args.layer_neurons) if args.layer_neurons is not None else None
    if layer_keep is not None and len(keeps) > 1:
        raise MethodError("--layer-neurons fixes one total: give a single --keep")
    return [make_method(args.method, keep=k, token_keep=args.token_keep, layers=args.layers,
                        calibration=args.calibration, rule=args.rule, layer_keep=layer_keep) for k in keeps]




def method_from_args(args: argparse.Namespace) -> Method:
    return methods_from_args(args, [args.keep])[0]
