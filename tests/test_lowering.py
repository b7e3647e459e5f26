"""GPU and TPU checked without one: every compiled program the runtime calls, lowered to
StableHLO for `cuda` and `tpu` on this CPU-only host, with no host callback in it.

The programs are recorded from real generations on a tiny random model (each jitted program
wrapped to keep its first call's arguments, as shapes, per scenario), so the list follows
the runtime: pre-fill with each method, the core-neuron gather, decode, resume, grow_cache,
teacher-forced scoring, and memory-limited mode's streamed pre-fill and host gather.

A host callback (`jax.pure_callback`, `io_callback`, `jax.debug.print`) lowers to a
`custom_call @xla_ffi_python_cpu_callback` (CPU), its GPU twin, or host send/recv (TPU); on a
host without that backend, lowering one for `cuda`/`tpu` fails outright. `host_callbacks`
reports both, and the negative controls below show it catching each.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

from coreinfer_jax import Dense, Generator, Hybrid, Similarity, Stability
from coreinfer_jax.runtime import engine, offload
from coreinfer_jax.sparse import hybrid
from coreinfer_jax.sparse import method as method_module
from coreinfer_jax.sparse.artifact import model_identity
from coreinfer_jax.sparse.calibration import Calibration, signature_size
from coreinfer_jax.sparse.predictor import Predictor, projections
from coreinfer_jax.tools.shapes import model_config, random_params

PLATFORMS = ("cuda", "tpu")
# A custom call whose target is a (Python) callback, host send/recv, or a legacy host_callback op.
CALLBACK_OP = re.compile(r"custom_call\s*@[\w.]*callback|stablehlo\.(send|recv)\b|host_callback|_xla_host_transfer")
PROMPTS = [[5, 17, 33, 100, 2, 9, 250, 41, 7, 61, 3, 90, 14, 15], [7, 8, 9, 10, 11]]
# Positions past the first 256-slot cache window: decode continues with grow_cache + resume.
LONG = 260

Program = tuple[Callable, tuple, dict]  # (jitted function, arguments as shapes, keyword arguments)


def host_callbacks(text: str) -> list[str]:
    """The lines of StableHLO `text` that call back into the host."""
    return [line.strip() for line in text.splitlines() if CALLBACK_OP.search(line)]


def lower(program: Program, platform: str) -> tuple[str | None, str | None]:
    """`(StableHLO text, None)`, or `(None, why)` when the program cannot lower for `platform`
    because it holds a host callback (JAX lowers those only for the backend in this process)."""
    fn, args, kwargs = program
    try:
        return fn.trace(*args, **kwargs).lower(lowering_platforms=(platform,)).as_text(), None
    except ValueError as e:
        if "is different from the lowering platform" in str(e):
            return None, f"host callback: {e}"
        raise


def check_programs(lowered: list[tuple[str, str | None, str | None]]) -> list[str]:
    """Findings for `(name, text, error)` triples from `lower`: one line per host callback."""
    findings = []
    for name, text, error in lowered:
        if error is not None:
            findings.append(f"{name}: {error}")
        else:
            findings += [f"{name}: {line}" for line in host_callbacks(text)]
    return findings


# Sharded programs on an abstract 8-device mesh (issue 12, item 6) go here: build their
# `(name, Program)` pairs, lower each with `lower(program, platform)` and assert that
# `check_programs` finds nothing, as `test_every_program_lowers_for_gpu_and_tpu` does.


def _shapes(tree: Any) -> Any:
    """Arrays as `ShapeDtypeStruct`s (memory kind kept): a donated argument is gone after its call."""
    def spec(x: Any) -> Any:
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, np.ndarray):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        return x
    return jax.tree.map(spec, tree)


class Recorder:
    """Wraps jitted programs so that each one's first call per scenario is kept (as shapes)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.programs: dict[str, Program] = {}
        self.scenario = ""
        for module, names in ((engine, ("prefill", "decode", "resume", "grow_cache", "score_continuation")),
                              (method_module, ("gather_core_layers",)), (hybrid, ("gather_core_layers",)),
                              (offload, ("_embed", "_layer", "_head", "_gather_on_host"))):
            for name in names:
                monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name: str, jitted: Callable) -> Callable:
        def call(*args, **kwargs):
            self.programs.setdefault(f"{self.scenario}/{name.lstrip('_')}", (jitted, _shapes(args), _shapes(kwargs)))
            return jitted(*args, **kwargs)
        return call


def tiny_calibration(cfg, seed: int = 0) -> Calibration:
    """A calibration of random clusters (lowering needs its shapes, not its quality)."""
    rng = np.random.default_rng(seed)
    F, k = cfg.intermediate_size, 3
    return Calibration(model=model_identity(cfg), layer=1, keep=0.5, signature_size=signature_size(F),
                       data_sha256="", seed=seed, inertias={k: 1.0}, centroids=rng.random((k, F), np.float32),
                       neurons=np.stack([rng.permutation(F)[: F // 2] for _ in range(k * cfg.num_layers)])
                       .reshape(k, cfg.num_layers, F // 2).astype(np.int32),
                       labels=np.arange(k, dtype=np.int32), signatures=rng.random((k, F)) < 0.2)


def tiny_predictor(cfg, rank: int = 4, seed: int = 0) -> Predictor:
    """A predictor of random factors for every layer (fitting one would compile for nothing here)."""
    rng = np.random.default_rng(seed)
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    factors = {f"{k}_{p}": rng.normal(size=(L, D, rank) if k == "a" else (L, rank, F)).astype(np.float32)
               for p in projections(cfg.family) for k in "ab"}
    return Predictor(model=model_identity(cfg), rank=rank, layers=(0, L), data_sha256="", tokens=0, eps=1e-3,
                     refine_steps=0, factors=factors)


@pytest.fixture(scope="module")
def programs() -> dict[str, Program]:
    """Every program a generation calls, per scenario, on a tiny Llama-3-shaped random model."""
    cfg, _ = model_config("llama-3-8b", tiny=True, num_layers=2)
    gen = Generator(cfg, random_params(cfg), tokenizer=None)
    predictor = tiny_predictor(cfg)
    with pytest.MonkeyPatch.context() as monkeypatch:
        rec = Recorder(monkeypatch)
        scenarios = {"dense": Dense(), "stability": Stability(keep=0.4, layers=(0, 2)),
                     "similarity": Similarity(tiny_calibration(cfg), keep=0.5, layers=(0, 2)),
                     "hybrid": Hybrid(keep=0.2, dynamic=0.2, layers=(0, 2), predictor=predictor)}
        for rec.scenario, m in scenarios.items():
            gen.generate_ids(PROMPTS, max_new_tokens=LONG if rec.scenario == "dense" else 4, method=m,
                             stop_at_eos=False)
            if rec.scenario in ("stability", "hybrid"):  # the two decode FFNs scoring runs
                gen.score_ids(PROMPTS, [[3, 4, 5], [6]], method=m)
        rec.scenario = "offload"
        Generator(cfg, gen.params, None, offload=True, host_memory="pinned_host").generate_ids(
            PROMPTS, max_new_tokens=4, method=scenarios["stability"])
    return rec.programs


@pytest.mark.slow  # the recording compiles about 25 programs on the CPU (~30 s on 2 cores)
def test_the_recording_covers_every_program(programs) -> None:
    want = {f"{s}/{p}" for s in ("dense", "stability", "similarity", "hybrid") for p in ("prefill", "decode")}
    want |= {f"{s}/score_continuation" for s in ("stability", "hybrid")}
    want |= {f"{s}/gather_core_layers" for s in ("stability", "similarity", "hybrid")}
    want |= {"dense/resume", "dense/grow_cache"}
    want |= {f"offload/{p}" for p in ("embed", "layer", "head", "gather_on_host", "decode")}
    assert want <= set(programs), sorted(want - set(programs))


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
def test_every_program_lowers_for_gpu_and_tpu(programs, platform) -> None:
    lowered = [(name, *lower(p, platform)) for name, p in sorted(programs.items())]
    assert not check_programs(lowered)
    # The programs really were lowered for `platform`, not for this host.
    decode_text = dict((n, t) for n, t, _ in lowered)["dense/decode"]
    assert "stablehlo.while" in decode_text


def _callback_programs() -> dict[str, Program]:
    x = jnp.ones((4,), jnp.float32)
    out = jax.ShapeDtypeStruct((4,), jnp.float32)
    return {
        "pure_callback": (jax.jit(lambda x: jax.pure_callback(lambda a: np.asarray(a) * 2, out, x) + 1), (x,), {}),
        "io_callback": (jax.jit(lambda x: io_callback(lambda a: np.asarray(a) * 2, out, x) + 1), (x,), {}),
        "debug_print": (jax.jit(lambda x: (jax.debug.print("{x}", x=x), x + 1)[1]), (x,), {}),
    }


@pytest.mark.parametrize("name", ["pure_callback", "io_callback", "debug_print"])
@pytest.mark.parametrize("platform", ("cpu",) + PLATFORMS)
def test_a_host_callback_is_caught(name, platform) -> None:
    """Negative control: a program with a callback is flagged on every platform, as a
    callback op in its text (the host's own backend) or as a lowering that fails."""
    program = _callback_programs()[name]
    findings = check_programs([(name, *lower(program, platform))])
    assert findings, f"{name} on {platform} was not flagged"
    clean = (jax.jit(lambda x: x * 2 + 1), program[1], {})
    assert not check_programs([("clean", *lower(clean, platform))])


def test_the_pattern_matches_each_callback_spelling() -> None:
    for line in ("%0 = stablehlo.custom_call @xla_ffi_python_cpu_callback(%arg0)",
                 "%1 = stablehlo.custom_call @xla_python_gpu_callback(%a)",
                 "%2 = stablehlo.custom_call @xla_ffi_python_gpu_callback(%a)",
                 "%3 = \"stablehlo.send\"(%a, %t) {is_host_transfer = true}",
                 "%4:2 = \"stablehlo.recv\"(%t) {is_host_transfer = true}"):
        assert host_callbacks(line), line
    # Memory-limited mode's host placement is not a callback.
    assert not host_callbacks('%5 = stablehlo.custom_call @annotate_device_placement(%a) '
                              '{mhlo.frontend_attributes = {_xla_buffer_placement = "pinned_host"}}')


@pytest.mark.slow
def test_recorded_arguments_are_shapes_not_buffers(programs) -> None:
    # A donated cache is deleted after its call; the recording must not hold the buffer.
    _, args, _ = programs["dense/decode"]
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(args))
    assert dataclasses.is_dataclass(programs["stability/prefill"][2]["method"])
