"""`python -m coreinfer_jax.tools.product_bench [--shapes NAME] [--tiny] [--json]`: one token's
weight products in each layout a decode step could read them in, timed on the default device.

At batch 1 a decode step is mostly its matrix-vector products, and on a GPU their speed is
how fast XLA's kernel for that shape reads the weights: in the 2026-12-04 H200 profile the gate
and up products (`[1, 4096] x [14336, 4096]`) read 3.6 TB/s, the down product 4.1 and the
1 GB head 4.4 (docs/gpu.md). Whether a wider product (gate and up as one matrix, which a
converter could store as `[F, 2, D]`) or another operand order reads faster decides layouts,
and only a device can say. This answers it in seconds, without a model:

  gate|up   today's dense form (two `[F, D]` products), one `[2F, D]` product (the sparse
            gathers' layout), one `[F, 2, D]` product (each neuron's gate and up rows side by
            side), and `[2F, D]` with the weights as the product's left operand;
  down      `[F, D]` read along F (the reference a gate|up form is compared with);
  qkv       the decode's fused projection as stored (`[D, E]`, `models.forward.fuse_qkv`) and
            transposed (`[E, D]`).

Every form computes the same numbers from the same weights (`forms`; tested against NumPy).
For the timing each form reads distinct copies of its weights, together at least
`roofline.PROBE_BYTES` (past any cache), one after the other in one program; a sample repeats
that program until it lasts about `roofline.PROBE_SAMPLE_S`, and the best of three counts.
Products run as the GPU decode step runs them: bfloat16 weights, float32 outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.tools.roofline import PROBE_BYTES, PROBE_SAMPLE_S
from coreinfer_jax.tools.shapes import model_config

F32 = jnp.float32
# `--tiny`'s bytes of copies: its 16 KB matrices are 64 copies, one program of 64 products
# (16 MiB made 1024, and compiling them took most of a minute).
TINY_BUDGET = 1 << 20


def _halves(y: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    return y[:, : y.shape[1] // 2], y[:, y.shape[1] // 2:]


@dataclasses.dataclass(frozen=True)
class Form:
    """One layout of a group's weights: `layout(*base)` makes it from the group's base
    matrices, `product(x, weights)` is what is timed (its output as the product leaves it),
    `canonical(output)` rearranges that output for comparison: gate|up as (x G^T, x U^T)
    `[1, F]` each, down as (h D,) `[1, D]`, qkv as (x W,) `[1, E]`."""
    group: str
    layout: Callable[..., tuple[jnp.ndarray, ...]]
    product: Callable[[jnp.ndarray, tuple[jnp.ndarray, ...]], tuple[jnp.ndarray, ...]]
    canonical: Callable[[tuple[jnp.ndarray, ...]], tuple[jnp.ndarray, ...]] = lambda out: out


def _dot(eq: str) -> Callable[[jnp.ndarray, tuple[jnp.ndarray, ...]], tuple[jnp.ndarray, ...]]:
    """`einsum(eq, x, w)` for each matrix `w` of a layout, float32 out."""
    return lambda x, ws: tuple(jnp.einsum(eq, x, w, preferred_element_type=F32) for w in ws)


FORMS: dict[str, Form] = {
    "two [F, D] (dense today)": Form("gate|up", lambda g, u: (g, u), _dot("bd,fd->bf")),
    "one [2F, D] (sparse gathers)": Form("gate|up", lambda g, u: (jnp.concatenate([g, u]),), _dot("bd,fd->bf"),
                                         lambda out: _halves(out[0])),
    "one [F, 2, D]": Form("gate|up", lambda g, u: (jnp.stack([g, u], axis=1),), _dot("bd,fgd->bfg"),
                          lambda out: (out[0][..., 0], out[0][..., 1])),
    "one [2F, D], weights first": Form("gate|up", lambda g, u: (jnp.concatenate([g, u]),),
                                       lambda x, ws: (jnp.einsum("fd,bd->fb", ws[0], x, preferred_element_type=F32),),
                                       lambda out: _halves(out[0].T)),
    "[F, D] along F": Form("down", lambda d: (d,), _dot("bf,fd->bd")),
    "[D, E] (decode today)": Form("qkv", lambda w: (w,), _dot("bd,de->be")),
    "[E, D]": Form("qkv", lambda w: (w.T,), _dot("bd,ed->be")),
}


def base_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, int], ...]]:
    """The base matrices of each group: gate and up `[F, D]`, down `[F, D]`, the fused QKV `[D, E]`."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    E = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    return {"gate|up": ((F, D), (F, D)), "down": ((F, D),), "qkv": ((D, E),)}


def input_width(cfg: ModelConfig, group: str) -> int:
    """The width of the vector a group's product takes: F for down, D for the others."""
    return cfg.intermediate_size if group == "down" else cfg.hidden_size


def forms(cfg: ModelConfig) -> dict[str, Form]:
    """`FORMS`, or only those whose group the family has (gate|up: gated FFNs)."""
    return {k: f for k, f in FORMS.items() if f.group != "gate|up" or cfg.family != "opt"}


def _copies(shapes: tuple[tuple[int, int], ...], layout: Callable, dtype: str, budget: int, key: jax.Array
            ) -> list[tuple[jnp.ndarray, ...]]:
    """Distinct random weights in `layout`, enough copies that together they hold at least `budget` bytes."""
    per_copy = sum(math.prod(s) for s in shapes) * jnp.dtype(dtype).itemsize

    @jax.jit
    def made(k: jax.Array) -> tuple[jnp.ndarray, ...]:
        return layout(*(jax.random.normal(k_, s, dtype) for k_, s in zip(jax.random.split(k, len(shapes)), shapes)))

    return [made(k) for k in jax.random.split(key, max(2, math.ceil(budget / per_copy)))]


def _seconds(run: Callable[[], tuple], calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        out = run()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / calls


def time_form(cfg: ModelConfig, name: str, dtype: str = "bfloat16", budget: int = PROBE_BYTES,
              samples: int = 3) -> dict:
    """One row: the form's microseconds per product and GB/s, over distinct copies of its weights."""
    form = FORMS[name]
    copies = _copies(base_shapes(cfg)[form.group], form.layout, dtype, budget, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (1, input_width(cfg, form.group)), dtype)
    every = jax.jit(lambda x, copies: [form.product(x, w) for w in copies])
    run = lambda: every(x, copies)  # noqa: E731
    jax.block_until_ready(run())  # compile, first touch
    calls = max(1, math.ceil(PROBE_SAMPLE_S / _seconds(run, 1)))
    seconds = min(_seconds(run, calls) for _ in range(samples)) / len(copies)
    nbytes = sum(w.nbytes for w in copies[0])
    return {"group": form.group, "form": name, "us_per_product": seconds * 1e6, "gb_s": nbytes / seconds / 1e9,
            "weight_bytes": nbytes, "copies": len(copies)}


def run(shape: str = "llama-3-8b", tiny: bool = False, dtype: str = "bfloat16",
        budget: int = PROBE_BYTES) -> list[dict]:
    """Every form of `shape`'s family, timed; each row's `vs_first` is its speed over the
    first form of its group (today's)."""
    from tqdm import tqdm

    cfg, _ = model_config(shape, tiny)
    rows = [time_form(cfg, name, dtype, budget) for name in tqdm(forms(cfg), desc="timing products", unit="form")]
    first: dict[str, float] = {}
    for r in rows:
        r["vs_first"] = first.setdefault(r["group"], r["us_per_product"]) / r["us_per_product"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coreinfer_jax.tools.product_bench",
                                description="one token's weight products in each layout, timed on the default device")
    p.add_argument("--shapes", default="llama-3-8b")
    p.add_argument("--tiny", action="store_true", help="tiny widths of --shapes and a 1 MiB budget (CPU, seconds)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        rows = run(args.shapes, args.tiny, args.dtype, TINY_BUDGET if args.tiny else PROBE_BYTES)
    except CoreInferError as e:
        print(f"error: {e}")
        return 2
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    device = jax.devices()[0]
    print(f"{args.shapes}{' (tiny)' if args.tiny else ''}, {args.dtype}, batch 1, {device.device_kind} "
          f"({device.platform}), JAX {jax.__version__}")
    print("| group | form | us per product | GB/s | vs the group's first |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        group = r["group"].replace("|", "\\|")  # a bare | would end the markdown cell
        print(f"| {group} | {r['form']} | {r['us_per_product']:.1f} | {r['gb_s']:.1f} | {r['vs_first']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
