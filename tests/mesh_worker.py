"""Runs generation on a device mesh in a process of its own (the device count is fixed when JAX
starts, so `tests/test_mesh.py` starts this with `JAX_NUM_CPU_DEVICES`).

    python tests/mesh_worker.py JOBS.json OUT.json

Each job: `checkpoint`, `mesh`, `prompts` (token ids), `new_tokens`, `methods` (settings for
`make_method` plus `share`, `calibration`); optional `score` (continuations to score with
each method), `hlo` (also compile the gather and decode programs of each sparse method and
report their collectives), `recompile` (generate again from prompts one token shorter, in the
same bucket, and report how many programs compiled anew), `lower` (every program the job's generations and scoring run,
lowered for cuda and tpu, checked for host callbacks by `test_lowering`) and `error_mesh` (a
mesh to try, reporting its error line).
Writes, per job, each method's tokens, core neurons and scores, and what was asked besides.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp

from coreinfer_jax import Generator
from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.runtime import engine
from coreinfer_jax.runtime.batching import cache_windows, stop_ids
from coreinfer_jax.runtime.sampling import Sampling
from coreinfer_jax.sparse.gather import gather_core_layers
from coreinfer_jax.sparse.registry import make_method


def build_method(settings: dict[str, Any]) -> Any:
    settings = dict(settings)
    options = {k: settings.pop(k) for k in ("share", "shards", "compensate") if k in settings}
    layers = settings.pop("layers", None)
    method = make_method(settings.pop("method"), layers=tuple(layers) if layers else None, **settings)
    return dataclasses.replace(method, **options) if options else method


def collectives(text: str) -> dict[str, list[str]]:
    """Result shapes of each all-gather and all-reduce in compiled HLO text."""
    return {op: re.findall(rf"= (\S+) {op}\(", text) for op in ("all-gather", "all-reduce")}


def compiled_programs(gen: Generator, method: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """The collectives of the gather and decode programs this generation runs."""
    tokens, lengths, cache_len = gen._pack(prompts, new_tokens)
    window = cache_windows(tokens.shape[1], max(map(len, prompts)), new_tokens)[0]
    with gen.on_mesh():
        first, cache, core = engine.prefill(gen.params, tokens, lengths, method.tables(), cfg=gen.cfg, method=method,
                                            cache_len=window)
        sparse = method.sparse_layers()
        width = gen.cfg.intermediate_size
        shared = method.share == "batch"
        gather = gather_core_layers.lower([gen.params["layers"][i]["ffn"] for i in sparse],
                                          core, counts=method.layer_neurons(width),
                                          shards=method.shards, shared=shared).compile().as_text()
        weights = method.decode_weights(gen.params, core)
        decode = engine.decode.lower(weights, first, cache, lengths, jnp.full_like(lengths, new_tokens),
                                     stop_ids((), gen.cfg.vocab_size), jax.random.key(0), cfg=gen.cfg,
                                     sampling=Sampling(), max_steps=cache_len - tokens.shape[1],
                                     ffn_fn=method.decode_ffn).compile().as_text()
        layer = weights["layers"][sparse[0]]["ffn"]
        rows = layer.get("core", layer)  # the hybrid method's core rows sit under "core"
        # One device's gather fuses gate|up (`sparse.gather.fused_layout`); shard-local ones do not.
        w_up = rows["w_up"] if "w_up" in rows else rows["w_gate_up"]
    return {"gather": collectives(gather), "decode": collectives(decode),
            "core_w_up_shape": list(w_up.shape),
            "core_w_up_shard_shapes": sorted({tuple(s.data.shape) for s in w_up.addressable_shards})}


def lowered_programs(gen: Generator, job: dict[str, Any]) -> dict[str, Any]:
    """Every program generation and scoring run on the mesh (each method of the job), lowered
    for cuda and tpu: their names, and `test_lowering.check_programs`' findings per platform."""
    import pytest

    from test_lowering import Recorder, check_programs, lower

    with pytest.MonkeyPatch.context() as monkeypatch:
        rec = Recorder(monkeypatch)
        for settings in job["methods"]:
            rec.scenario = settings["method"] + ("-" + settings["share"] if "share" in settings else "")
            method = build_method(settings)
            gen.generate_ids(job["prompts"], job["new_tokens"], method=method, stop_at_eos=False)
            gen.score_ids(job["prompts"], job["score"], method=method)
    def unplaced(x: Any) -> Any:
        # Small inputs (token ids, lengths) were uncommitted arrays on device 0: jit places them.
        if isinstance(x, jax.ShapeDtypeStruct) and not isinstance(x.sharding, jax.sharding.NamedSharding):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        return x

    programs = {name: (fn, jax.tree.map(unplaced, args), jax.tree.map(unplaced, kwargs))
                for name, (fn, args, kwargs) in rec.programs.items()}
    with gen.on_mesh():
        findings = {platform: check_programs([(name, *lower(p, platform)) for name, p in programs.items()])
                    for platform in ("cuda", "tpu")}
    return {"programs": sorted(programs), "findings": findings}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "error_mesh" in job:
        try:
            Generator.load(job["checkpoint"], mesh=job["error_mesh"])
            out["error"] = None
        except CoreInferError as e:
            out["error"] = str(e)
        return out
    gen = Generator.load(job["checkpoint"], mesh=job["mesh"])
    w_up = gen.params["layers"][0]["ffn"]["w_up"]
    out["w_up_shard_shape"] = list(w_up.addressable_shards[0].data.shape)
    if job.get("lower"):
        out["lowered"] = lowered_programs(gen, job)
    out["methods"] = []
    for settings in job["methods"]:
        method = build_method(settings)
        result = gen.generate_ids(job["prompts"], job["new_tokens"], method=method, stop_at_eos=False)
        row: dict[str, Any] = {"tokens": result.tokens,
                               "core": None if result.core_neurons is None else result.core_neurons.tolist()}
        if "score" in job:
            row["score"] = [lp.tolist() for lp, _ in gen.score_ids(job["prompts"], job["score"], method=method)]
        if job.get("recompile"):
            # Other prompt lengths in the same bucket: no program may compile again.
            programs = (engine.prefill, engine.decode, gather_core_layers)
            before = [f._cache_size() for f in programs]
            gen.generate_ids([p[:-1] for p in job["prompts"]], job["new_tokens"], method=method, stop_at_eos=False)
            row["recompiled"] = [f._cache_size() - b for f, b in zip(programs, before)]
        if job.get("hlo") and settings["method"] != "dense":
            row["hlo"] = compiled_programs(gen, gen.resolve(method), job["prompts"], job["new_tokens"])
        out["methods"].append(row)
    return out


def main(jobs_path: str, out_path: str) -> None:
    with open(jobs_path) as f:
        jobs = json.load(f)
    results = {"devices": jax.device_count(), "jobs": [run_job(job) for job in jobs]}
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
