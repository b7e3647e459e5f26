"""XLA's GPU compiler without a GPU: compile pre-fill, the gather and the decode loop for an
sm_90 target (an H200's `GpuTargetConfig`, kept in `gpu_targets/`) from abstract arguments,
and read what the optimized program does inside the decode loop.

Nothing is allocated: the params are `jax.ShapeDtypeStruct`s sharded on a one-device mesh
of the target's topology, so Llama-3-8B shapes compile on a 2-core CPU machine in seconds.
It needs a CUDA plugin (the `cuda12` or `cuda13` extra) but no GPU, driver or CUDA runtime.

What it checks (`check`, `python -m coreinfer_jax.tools.gpu_compile`):
- the decode loop's body writes no weight-sized buffer (`loop_writes`): on 2026-12-04 the
  H200 profile showed XLA concatenating each sparse layer's gathered gate and up rows and
  padding its down rows at every step (141 MB per layer-step at 8B shapes, more than the
  method saved), and this compile finds the same 21 + 21 copies;
- one decode step reads what the method says it reads (`loop_read_bytes` of the compiled
  loop against `roofline.bytes_per_token`, the count every speed bound is made from).

It also counts the kernels one layer adds to a decode step (`kernels_per_layer`): at batch 1
all but the products are small, and in the H200 profile they took 38% of dense decode.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.forward import init_cache
from coreinfer_jax.models.params import Params
from coreinfer_jax.runtime import engine
from coreinfer_jax.runtime.sampling import Sampling
from coreinfer_jax.sparse.calibration import Calibration, default_calibration_layer, signature_size
from coreinfer_jax.sparse.hybrid import Hybrid
from coreinfer_jax.sparse.method import Dense, Method
from coreinfer_jax.sparse.similarity import Similarity
from coreinfer_jax.sparse.sketch import Sketch
from coreinfer_jax.sparse.stability import Stability
from coreinfer_jax.tools.hlo_reading import loop_kernels, loop_read_bytes, loop_writes
from coreinfer_jax.tools.roofline import bytes_per_token
from coreinfer_jax.tools.shapes import model_config, random_params

TARGETS = Path(__file__).parent / "gpu_targets"
# How far what the decode loop reads (`loop_read_bytes`) may stray from the method's count.
BYTES_TOLERANCE = 0.10


class GpuCompileError(CoreInferError):
    """The GPU compiler is not installed, or an unknown target."""


# JAX's CUDA plugins: either brings XLA's GPU compiler (the GPU image runs CUDA 13's).
CUDA_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (`jax_plugins`) is not installed either
        return False


def unavailable() -> str | None:
    """Why a deviceless GPU compile cannot run here (None: it can)."""
    if not any(_installed(name) for name in CUDA_PLUGINS):
        return "no CUDA plugin is installed (pip install -e '.[cuda12]'): no GPU compiler to run"
    return None


@functools.cache
def replicated(target: str = "h200") -> NamedSharding:
    """A sharding on one device of `target`'s topology (`gpu_targets/TARGET.txtpb`)."""
    reason = unavailable()
    if reason:
        raise GpuCompileError(reason)
    path = TARGETS / f"{target}.txtpb"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in TARGETS.glob("*.txtpb")))
        raise GpuCompileError(f"no GPU target {target!r}; known: {known}")
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(platform="cuda", target_config=path.read_text(), topology="1x1x1")
    return NamedSharding(topologies.make_mesh(topology, (1,), ("x",)), P())


def _abstract(tree, sharding: NamedSharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """The optimized HLO text of one method's programs, and the bytes of one decode step."""

    label: str
    prefill: str | None  # None where not asked for (`compile_method(prefill=False)`)
    gather: str | None
    decode: str
    step_bytes: int  # what one iteration of the decode loop reads (`loop_read_bytes`)
    counted_bytes: int  # the method's count (`roofline.bytes_per_token`)


@dataclasses.dataclass(frozen=True)
class _Sized:
    """An abstract array that knows its bytes, for the byte counts (`ShapeDtypeStruct` does not)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


def _calibration(cfg: ModelConfig, keep: float, clusters: int = 4) -> Calibration:
    """A stand-in calibration of `cfg`'s shapes (random lists: decode reads them the same)."""
    from coreinfer_jax.sparse.artifact import model_identity

    F = cfg.intermediate_size
    rng = np.random.default_rng(0)
    neurons = np.stack([np.stack([rng.permutation(F)[: int(F * keep)] for _ in range(cfg.num_layers)])
                        for _ in range(clusters)]).astype(np.int32)
    return Calibration(model=model_identity(cfg), layer=default_calibration_layer(cfg.num_layers), keep=keep,
                       signature_size=signature_size(F), data_sha256="0" * 64, seed=0, inertias={},
                       centroids=rng.random((clusters, F)).astype(np.float32), neurons=neurons,
                       labels=np.zeros(1, np.int32), signatures=np.zeros((1, F), bool))


def methods(cfg: ModelConfig) -> dict[str, Method]:
    """The methods the check covers: dense, stability per row and batch-shared, similarity,
    the hybrid default, and compensation."""
    return {"dense": Dense(), "stability keep 0.4": Stability(keep=0.4),
            "stability keep 0.4 shared": Stability(keep=0.4, share="batch"),
            "similarity keep 0.4": Similarity(calibration=_calibration(cfg, 0.4), keep=0.4),
            "hybrid default": Hybrid(),
            "stability keep 0.4 compensated": Stability(keep=0.4, compensate=True)}


def _with_sketch(method: Method, params: Params) -> tuple[Method, Params | None]:
    """The hybrid's sketch built abstractly (its arrays' shapes), and the method holding it."""
    if not isinstance(method, Hybrid) or method.select_by != "sketch" or method.predictor is not None:
        return method, None
    down = method.rest == "sketch"
    factors = jax.eval_shape(lambda p: Sketch.build(p, method.layers, down=down).factors, params)
    return dataclasses.replace(method, predictor=Sketch(method.layers, factors)), factors


def compile_method(cfg: ModelConfig, params: Params, method: Method, *, label: str = "", batch: int = 1,
                   prompt: int = 64, slots: int = 256, target: str = "h200", prefill: bool = True) -> Compiled:
    """Pre-fill (`prompt` tokens), gather and decode (a `slots`-slot cache) of `method` for
    `target`, from abstract `params` (`jax.eval_shape` of a param tree). `prefill=False` skips
    pre-fill's compile where only the loop is read: at 8B widths its top-k (a sort, which XLA
    cannot tune without a GPU) took 10.7 of stability's 12.7 s at 3 layers."""
    shard = replicated(target)
    method = method.validate(cfg)
    method, factors = _with_sketch(method, params)
    spec = functools.partial(_abstract, sharding=shard)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=shard)
    ids = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=shard)  # noqa: E731
    tables = method.tables()
    _, _, core = jax.eval_shape(lambda *a: engine.prefill(*a, cfg=cfg, method=method, cache_len=slots),
                                params, ids(batch, prompt), ids(batch), tables)

    def build(p: Params, core, factors):
        m = method if factors is None else dataclasses.replace(method, predictor=Sketch(method.layers, factors))
        return m.decode_weights(p, core)

    gather = None
    if core is not None:
        gather = jax.jit(build).trace(spec(params), spec(core), spec(factors)).lower(
            lowering_platforms=("cuda",)).compile().as_text()
    weights = jax.eval_shape(build, params, core, factors)
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, slots, params["embed"].dtype))
    decode = engine.decode.trace(spec(weights), spec(jax.ShapeDtypeStruct((batch, cfg.vocab_size), jnp.float32)),
                                 spec(cache), ids(batch), ids(batch), ids(8), key, cfg=cfg, sampling=Sampling(),
                                 max_steps=slots - prompt, ffn_fn=method.decode_ffn)

    decode_hlo = decode.lower(lowering_platforms=("cuda",)).compile().as_text()
    prefill_hlo = None
    if prefill:
        prefill_hlo = engine.prefill.trace(spec(params), ids(batch, prompt), ids(batch), spec(tables) if tables else None,
                                           cfg=cfg, method=method, cache_len=slots).lower(
            lowering_platforms=("cuda",)).compile().as_text()
    return Compiled(label or method.label, prefill_hlo, gather, decode_hlo, loop_read_bytes(decode_hlo),
                    bytes_per_token(cfg, jax.tree.map(lambda x: _Sized(x.shape, x.dtype), params), method, slots))


def kernels_per_layer(label: str, shape: str = "llama-3-8b", dtype: str = "bfloat16", target: str = "h200") -> int:
    """The kernels one more layer adds to a decode step of method `label` (`methods`): the
    decode loop's kernels (`loop_kernels`) at 3 layers of `shape`'s widths minus at 2, with
    every layer sparse for the sparse methods, so the count is a sparse layer's."""
    counts = []
    for n in (2, 3):
        cfg, _ = model_config(shape, num_layers=n)
        params = jax.eval_shape(lambda: random_params(cfg, dtype))
        method = methods(cfg)[label]
        if not isinstance(method, Dense):
            method = dataclasses.replace(method, layers=(0, n))
        counts.append(len(loop_kernels(compile_method(cfg, params, method, target=target, prefill=False).decode)))
    return counts[1] - counts[0]


def check(shape: str = "llama-3-8b", dtype: str = "bfloat16", names: Sequence[str] | None = None,
          target: str = "h200", num_layers: int | None = None) -> list[dict]:
    """One row per method: the weight-sized writes in its decode loop, what the loop reads
    against the method's counted bytes (`num_layers`: the shape's widths with fewer layers)
    and the kernels a layer adds to a step."""
    from tqdm import tqdm

    cfg, _ = model_config(shape, num_layers=num_layers)
    params = jax.eval_shape(lambda: random_params(cfg, dtype))
    chosen = {k: v for k, v in methods(cfg).items() if names is None or k in names}
    rows = []
    for label, method in tqdm(chosen.items(), desc=f"compiling for {target}", unit="method"):
        c = compile_method(cfg, params, method, label=label, target=target)
        writes = loop_writes(c.decode)
        rows.append({"method": label, "loop_writes": [dataclasses.asdict(w) for w in writes],
                     "step_bytes": c.step_bytes, "counted_bytes": c.counted_bytes,
                     "bytes_ratio": c.step_bytes / c.counted_bytes,
                     "kernels_per_layer": kernels_per_layer(label, shape, dtype, target)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coreinfer_jax.tools.gpu_compile",
                                description="compile decode for a GPU without one; list weight-sized copies "
                                            "in the decode loop and compare a step's bytes with the method's count")
    p.add_argument("--shapes", default="llama-3-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--target", default="h200")
    p.add_argument("--num-layers", type=int, default=None,
                   help="the shape's widths with this many layers (compiles faster; default: the model's)")
    args = p.parse_args(argv)
    try:
        rows = check(args.shapes, args.dtype, target=args.target, num_layers=args.num_layers)
    except CoreInferError as e:
        print(f"error: {e}")
        return 2
    failed = False
    for r in rows:
        ratio = f"{r['bytes_ratio']:.3f}"
        copies = ", ".join(f"{w['op']} {w['shape']}" for w in r["loop_writes"]) or "none"
        print(f"{r['method']:32s} loop reads / counted bytes {ratio:>6s}  kernels per layer-step "
              f"{r['kernels_per_layer']:3d}  weight-sized writes in the loop: {len(r['loop_writes'])} ({copies[:200]})")
        failed |= bool(r["loop_writes"]) or abs(r["bytes_ratio"] - 1) > BYTES_TOLERANCE
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
