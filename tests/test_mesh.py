"""Models split over a device mesh (`models.sharding`): 8 CPU devices forced in a subprocess
(`mesh_worker.py`) against the same generations on this process's single device. The worker
compiles every program of ~10 models and meshes (minutes on 2 cores), so its tests are
marked slow (CI runs them); the one-device checks are not.

Tensor parallelism changes only the order of floating-point sums, so greedy tokens equal one
device's; sparse methods under `1xN` select shard-locally, which one device reproduces with
`shards=N`. The compiled programs are inspected for the collectives they run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from conftest import SENTENCES
from coreinfer_jax import Generator
from coreinfer_jax.calibrate.similarity import calibrate
from coreinfer_jax.errors import MethodError
from coreinfer_jax.models.forward import forward, init_cache
from coreinfer_jax.models.sharding import MeshError, make_mesh, parse_mesh
from coreinfer_jax.runtime import engine
from coreinfer_jax.runtime.sampling import Sampling
from coreinfer_jax.sparse.rules import top_neurons
from mesh_worker import build_method
from test_lowering import tiny_predictor

HERE = Path(__file__).parent
PROMPTS = [[5, 17, 33, 8, 90, 41, 12], [7, 99, 23, 64], [150, 3, 77, 18, 200, 9], [44, 45, 46]]
SCORE = [[12, 13, 14], [60], [8, 9], [21, 22, 23, 24]]
NEW = 12
SPARSE = {"method": "stability", "keep": 0.5, "layers": [0, 2]}
MAGNITUDE = dict(SPARSE, rule="normalized_magnitude")
SHARED = dict(SPARSE, share="batch")
DENSE = {"method": "dense"}
# Static 0.25 + per-token 0.25, with a predictor of random factors (`tiny_predictor`).
HYBRID = {"method": "hybrid", "keep": 0.25, "dynamic": 0.25, "layers": [0, 2]}
# No predictor: the gated default, a 4-bit sketch of the sharded weights; compensated (the
# prompt means and the bias are reduced over the neuron shards).
SKETCH = dict(HYBRID, compensate=True)
COMPENSATED = dict(SPARSE, compensate=True)


def run_worker(jobs: list[dict[str, Any]], tmp: Path, devices: int = 8, timeout: int = 600) -> dict[str, Any]:
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(HERE / "mesh_worker.py"), str(tmp / "jobs.json"), str(tmp / "out.json")],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp / "out.json").read_text())
    assert out["devices"] == devices
    return out


@pytest.fixture(scope="module")
def mesh_run(tiny_checkpoint, tmp_path_factory) -> dict[str, Any]:
    """One worker process for every mesh job here (JAX starts once)."""
    tmp = tmp_path_factory.mktemp("mesh")
    cal = calibrate(Generator.load(tiny_checkpoint("llama")), SENTENCES, clusters=4, progress=False)
    cal_dir = str(cal.save(tmp / "calibration"))
    tied = Generator.load(tiny_checkpoint("llama_tied")).cfg
    hybrid = dict(HYBRID, predictor=str(tiny_predictor(tied).save(tmp / "predictor")))
    similarity = {"method": "similarity", "keep": 0.5, "layers": [0, 2], "calibration": cal_dir}
    jobs = {
        "llama 2x2": dict(checkpoint=str(tiny_checkpoint("llama")), mesh="2x2", hlo=True, score=SCORE,
                          methods=[DENSE, SPARSE, MAGNITUDE, SHARED, similarity]),
        "llama_tied 1x4": dict(checkpoint=str(tiny_checkpoint("llama_tied")), mesh="1x4", hlo=True, recompile=True,
                               score=SCORE, methods=[DENSE, SPARSE, SHARED, hybrid]),
        "llama_tied 2x4": dict(checkpoint=str(tiny_checkpoint("llama_tied")), mesh="2x4", lower=True, score=SCORE,
                               methods=[DENSE, SPARSE, SHARED, hybrid, SKETCH, COMPENSATED]),
        "opt 1x4": dict(checkpoint=str(tiny_checkpoint("opt")), mesh="1x4", methods=[DENSE, SPARSE]),
    }
    for family in ("mistral", "qwen2", "qwen3", "phi3", "gemma3"):
        jobs[f"{family} 1x2"] = dict(checkpoint=str(tiny_checkpoint(family)), mesh="1x2", methods=[DENSE, SPARSE])
    errors = {"too many devices": dict(checkpoint=str(tiny_checkpoint("llama")), error_mesh="4x4"),
              "kv heads": dict(checkpoint=str(tiny_checkpoint("llama")), error_mesh="1x4")}
    for job in jobs.values():
        job.update(prompts=PROMPTS, new_tokens=NEW)
    # Three prompts on a data axis of 2: a copy of the third fills it.
    jobs["llama 2x2 three prompts"] = dict(checkpoint=str(tiny_checkpoint("llama")), mesh="2x2", prompts=PROMPTS[:3],
                                           new_tokens=NEW, methods=[SHARED, dict(similarity, share="batch")])
    out = run_worker(list(jobs.values()) + list(errors.values()), tmp)["jobs"]
    return {"jobs": dict(zip(jobs, out)), "errors": dict(zip(errors, out[len(jobs):])), "calibration": cal_dir,
            "hybrid": hybrid, "checkpoints": {name: job["checkpoint"] for name, job in jobs.items()}}


def one_device(checkpoint: str, settings: dict[str, Any], tensor: int) -> tuple[Any, Generator]:
    """This process's single-device generation with the rule the mesh's tensor axis implies."""
    gen = Generator.load(checkpoint)
    method = build_method(settings)
    if settings["method"] != "dense":
        method = dataclasses.replace(method, shards=tensor)
    return gen.generate_ids(PROMPTS, NEW, method=method, stop_at_eos=False), gen, method


@pytest.mark.slow
@pytest.mark.parametrize("job", ["llama 2x2", "llama_tied 1x4", "llama_tied 2x4", "opt 1x4", "mistral 1x2",
                                 "qwen2 1x2", "qwen3 1x2", "phi3 1x2", "gemma3 1x2"])
def test_mesh_generation_equals_one_device(mesh_run, job: str) -> None:
    """Dense and every sparse method: the same greedy tokens and core neurons as one device
    running the same shard-local rule."""
    ran = mesh_run["jobs"][job]
    tensor = parse_mesh(job.split()[1])[1]
    checkpoint = mesh_run["checkpoints"][job]
    settings = [DENSE, SPARSE, MAGNITUDE, SHARED, "similarity"] if job == "llama 2x2" else \
        [DENSE, SPARSE, SHARED, mesh_run["hybrid"]] if job == "llama_tied 1x4" else \
        [DENSE, SPARSE, SHARED, mesh_run["hybrid"], SKETCH, COMPENSATED] if job == "llama_tied 2x4" else [DENSE, SPARSE]
    assert len(settings) == len(ran["methods"])
    for s, got in zip(settings, ran["methods"]):
        if s == "similarity":
            s = {"method": "similarity", "keep": 0.5, "layers": [0, 2], "calibration": mesh_run["calibration"]}
        want, _, _ = one_device(checkpoint, s, tensor)
        assert got["tokens"] == want.tokens, (job, s)
        if want.core_neurons is not None:
            np.testing.assert_array_equal(np.array(got["core"]), want.core_neurons)


@pytest.mark.slow
def test_a_batch_the_data_axis_does_not_divide_shares_the_prompts_own_set(mesh_run) -> None:
    """Three prompts on a 2x2 mesh, batch-shared stability and similarity: the tokens and the one
    core set one device gives the three prompts (the row that fills the data axis takes no part)."""
    ran = mesh_run["jobs"]["llama 2x2 three prompts"]
    gen = Generator.load(mesh_run["checkpoints"]["llama 2x2 three prompts"])
    similarity = {"method": "similarity", "keep": 0.5, "layers": [0, 2], "calibration": mesh_run["calibration"]}
    for settings, got in zip([SHARED, dict(similarity, share="batch")], ran["methods"], strict=True):
        method = dataclasses.replace(build_method(settings), shards=2)
        want = gen.generate_ids(PROMPTS[:3], NEW, method=method, stop_at_eos=False)
        assert got["tokens"] == want.tokens, settings["method"]
        np.testing.assert_array_equal(np.array(got["core"]), want.core_neurons)


@pytest.mark.slow
def test_weights_are_split_over_the_tensor_axis(mesh_run) -> None:
    """Each device holds F / tensor rows of every FFN matrix (tiny models: F = 128, D = 64)."""
    assert mesh_run["jobs"]["llama 2x2"]["w_up_shard_shape"] == [64, 64]
    assert mesh_run["jobs"]["llama_tied 1x4"]["w_up_shard_shape"] == [32, 64]
    assert mesh_run["jobs"]["qwen3 1x2"]["w_up_shard_shape"] == [64, 64]


@pytest.mark.slow
def test_core_neurons_are_shard_local(mesh_run) -> None:
    """Block s of each row's ids lies in device s's rows; the gathered core weights are split on
    K the same way, so each device holds its own K / tensor rows."""
    for job, tensor in (("llama 2x2", 2), ("llama_tied 1x4", 4)):
        core = np.array(mesh_run["jobs"][job]["methods"][1]["core"])  # [B, n_sparse, K]
        K = core.shape[-1]
        blocks = core.reshape(*core.shape[:2], tensor, K // tensor) // (128 // tensor)
        assert (blocks == np.arange(tensor)[:, None]).all()
        hlo = mesh_run["jobs"][job]["methods"][1]["hlo"]
        data = 2 if job.startswith("llama 2x2") else 1
        assert hlo["core_w_up_shape"] == [len(PROMPTS), K, 64]
        assert hlo["core_w_up_shard_shapes"] == [[len(PROMPTS) // data, K // tensor, 64]]


@pytest.mark.slow
def test_no_ffn_weight_crosses_devices(mesh_run) -> None:
    """The gather runs no collective at all, and decode gathers nothing: each attention block and
    FFN ends in one all-reduce of the `[B, 1, D]` output (plus the vocabulary-split embedding's)."""
    for job in ("llama 2x2", "llama_tied 1x4"):
        for hlo in (m["hlo"] for m in mesh_run["jobs"][job]["methods"][1:3]):
            assert hlo["gather"] == {"all-gather": [], "all-reduce": []}
            assert hlo["decode"]["all-gather"] == []
            outputs = [s for s in hlo["decode"]["all-reduce"] if s.endswith(",64]{2,1,0}")]
            assert len(outputs) == 2 * 2 + 1, hlo["decode"]["all-reduce"]


@pytest.mark.slow
def test_sharded_programs_lower_for_gpu_and_tpu(mesh_run) -> None:
    """Every program a 2x4-mesh generation and scoring run (dense, shard-local, batch-shared),
    lowered for cuda and tpu with their shardings: no host callback (`test_lowering`)."""
    lowered = mesh_run["jobs"]["llama_tied 2x4"]["lowered"]
    for method in ("stability", "hybrid"):
        for kind in ("prefill", "gather_core_layers", "decode", "score_continuation"):
            assert f"{method}/{kind}" in lowered["programs"], (method, kind)
    assert lowered["findings"] == {"cuda": [], "tpu": []}


@pytest.mark.slow
def test_hybrid_per_token_rows_stay_on_their_device(mesh_run) -> None:
    """The token-adaptive method on a mesh: per-token ids shard-local like the core's, so the
    per-step gather of weight rows runs inside each device. The decode loop all-gathers only
    the predicted scores (`[B, 1, N, F/N]` numbers per layer and step), never a `[.., D]` row
    of weights; the once-per-generation gather runs no collective."""
    hlo = mesh_run["jobs"]["llama_tied 1x4"]["methods"][3]["hlo"]
    assert hlo["gather"] == {"all-gather": [], "all-reduce": []}
    gathered = [[int(d) for d in shape.split("[")[1].split("]")[0].split(",")] for shape in hlo["decode"]["all-gather"]]
    assert all(dims[-1] != 64 and np.prod(dims) <= len(PROMPTS) * 128 for dims in gathered), hlo["decode"]["all-gather"]
    assert hlo["core_w_up_shard_shapes"] == [[len(PROMPTS), 32 // 4, 64]]


@pytest.mark.slow
def test_no_recompile_within_a_bucket_on_a_mesh(mesh_run) -> None:
    """Prompts one token shorter (same bucket): pre-fill, decode and the gather compile nothing new."""
    for got in mesh_run["jobs"]["llama_tied 1x4"]["methods"]:
        assert got["recompiled"] == [0, 0, 0]


@pytest.mark.slow
def test_batch_shared_core_is_one_set_gathered_once(mesh_run) -> None:
    """share="batch": every row has the same ids, and the gathered weights are `[K, D]`."""
    for job, index in (("llama 2x2", 3), ("llama_tied 1x4", 2)):
        got = mesh_run["jobs"][job]["methods"][index]
        core = np.array(got["core"])
        assert (core == core[:1]).all()
        assert len(got["hlo"]["core_w_up_shape"]) == 2


@pytest.mark.slow
def test_scores_under_a_mesh_equal_one_device(mesh_run) -> None:
    """Teacher-forced log-probabilities (dense and shard-local sparse) within float32 noise."""
    checkpoint = mesh_run["checkpoints"]["llama 2x2"]
    gen = Generator.load(checkpoint)
    for settings, got in zip([DENSE, SPARSE], mesh_run["jobs"]["llama 2x2"]["methods"]):
        method = build_method(settings)
        if settings["method"] != "dense":
            method = dataclasses.replace(method, shards=2)
        want = gen.score_ids(PROMPTS, SCORE, method=method)
        for (lp, _), g in zip(want, got["score"]):
            np.testing.assert_allclose(np.array(g), lp, atol=1e-4)


@pytest.mark.slow
def test_bad_meshes_say_what_is_wrong(mesh_run) -> None:
    assert "needs 16 devices but 8 are available" in mesh_run["errors"]["too many devices"]["error"]
    assert "does not divide the model's 2 KV heads" in mesh_run["errors"]["kv heads"]["error"]
    with pytest.raises(MeshError, match="DATAxTENSOR"):
        parse_mesh("4")
    with pytest.raises(MeshError, match="needs 2 devices"):
        make_mesh("1x2")


def test_shard_local_top_k_equals_numpy(rng=np.random.default_rng(0)) -> None:
    """Each block's own best, in index order on ties; one shard is the global top-k; shared sums rows."""
    scores = rng.integers(0, 5, size=(3, 24)).astype(np.float32)
    got = np.asarray(top_neurons(jax.numpy.asarray(scores), 8, shards=4))
    for b in range(3):
        want = [s * 6 + j for s in range(4) for j in sorted(range(6), key=lambda j: (-scores[b, s * 6 + j], j))[:2]]
        assert got[b].tolist() == want
    one = np.asarray(top_neurons(jax.numpy.asarray(scores), 8))
    assert [sorted(r) for r in one.tolist()] == [sorted(np.argsort(-s, kind="stable")[:8].tolist()) for s in scores]
    shared = np.asarray(top_neurons(jax.numpy.asarray(scores), 8, share="batch"))
    assert (shared == np.argsort(-scores.sum(0), kind="stable")[:8]).all()


def test_sharding_settings_are_checked(tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    with pytest.raises(MethodError, match="shards=3 must be >= 1 and divide the FFN width 128"):
        gen.generate_ids(PROMPTS[:1], 2, method=build_method(dict(SPARSE, shards=3)))
    with pytest.raises(MethodError, match="unknown share"):
        gen.generate_ids(PROMPTS[:1], 2, method=build_method(dict(SPARSE, share="column")))
    with pytest.raises(MeshError, match="offload mode runs on one device"):
        Generator.load(tiny_checkpoint("llama"), offload=True, mesh="1x1")


def test_batch_shared_with_one_row_equals_per_row(tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    row = gen.generate_ids(PROMPTS[:1], NEW, method=build_method(SPARSE), stop_at_eos=False)
    shared = gen.generate_ids(PROMPTS[:1], NEW, method=build_method(SHARED), stop_at_eos=False)
    assert shared.tokens == row.tokens
    np.testing.assert_array_equal(shared.core_neurons, row.core_neurons)


@pytest.mark.parametrize("settings", [SHARED, dict(MAGNITUDE, share="batch"), dict(COMPENSATED, share="batch"),
                                      "similarity"], ids=["stability", "normalized_magnitude", "compensated",
                                                          "similarity"])
def test_rows_filling_the_data_axis_take_no_part_in_a_shared_set(tiny_checkpoint, tmp_path, settings) -> None:
    """A mesh's data axis that does not divide the batch gets copies of the last prompt
    (`Generator._fill_data_shards`). Pre-fill leaves them out of a batch-shared core set: with
    a copy of prompt 3, the set is the one the three prompts choose alone, and without
    `counted` the copy would tilt it (so the check cannot pass by chance)."""
    gen = Generator.load(tiny_checkpoint("llama"))
    if settings == "similarity":
        cal = calibrate(gen, SENTENCES, clusters=4, progress=False).save(tmp_path / "calibration")
        settings = {"method": "similarity", "keep": 0.5, "layers": [0, 2], "calibration": str(cal), "share": "batch"}
    method = gen.resolve(build_method(settings))
    prompts = PROMPTS[:3]

    def core(rows: list[list[int]], counted: jax.Array | None = None) -> np.ndarray:
        tokens, lengths, _ = gen._pack(rows, NEW)
        _, _, kept = engine.prefill(gen.params, tokens, lengths, method.tables(), counted, cfg=gen.cfg, method=method,
                                    cache_len=tokens.shape[1])
        return np.asarray(method.neuron_ids(kept))

    alone = core(prompts)
    assert (alone == alone[:1]).all()
    filled = prompts + prompts[-1:]
    assert not np.array_equal(core(filled)[:3], alone)
    np.testing.assert_array_equal(core(filled, jax.numpy.arange(4) < 3), np.concatenate([alone, alone[:1]]))


def test_a_filling_row_compensates_as_its_prompt_does(tiny_checkpoint) -> None:
    """Left out of a shared set's choice, a copy of the last prompt still adds that prompt's
    compensation bias (its means over its own tokens), as one device computing the prompt
    alone would. The bias is restated with NumPy from the prompt alone, pre-filled on its own."""
    gen = Generator.load(tiny_checkpoint("llama"))
    method = gen.resolve(build_method(dict(COMPENSATED, share="batch")))
    prompts = PROMPTS[:3]
    tokens, lengths, _ = gen._pack(prompts + prompts[-1:], NEW)
    _, _, kept = engine.prefill(gen.params, tokens, lengths, None, jax.numpy.arange(4) < 3, cfg=gen.cfg,
                                method=method, cache_len=tokens.shape[1])
    bias = np.asarray(kept["bias"])  # [4, n_sparse, D]
    assert np.abs(bias[2]).max() > 1e-3  # a bias there is to copy
    np.testing.assert_allclose(bias[3], bias[2], rtol=1e-6, atol=1e-7)

    # The last prompt alone, its activations read by a dense pre-fill's hook: means over its
    # tokens of every neuron outside the (shared) core, times the down projection.
    ids = np.asarray(method.neuron_ids(kept))[3]  # [n_sparse, K]
    alone_tokens, _, _ = gen._pack(prompts[-1:], NEW)
    activations = {}

    def hook(layer, activation):
        activations[layer] = np.asarray(activation[0, : len(prompts[-1])], np.float64)  # [T, F]

    forward(gen.params, gen.cfg, alone_tokens, jax.numpy.zeros((1,), jax.numpy.int32),
            init_cache(gen.cfg, 1, alone_tokens.shape[1], gen.params["embed"].dtype), select=hook, prefix=False)
    for j, layer in enumerate(method.sparse_layers()):
        means = activations[layer].mean(0)  # [F]
        means[ids[j]] = 0.0
        w_down = np.asarray(gen.params["layers"][layer]["ffn"]["w_down"], np.float64)  # [F, D]
        np.testing.assert_allclose(bias[3, j], means @ w_down, rtol=1e-4, atol=1e-6)


def test_rows_filling_the_data_axis_do_not_keep_the_decode_loop_running(tiny_checkpoint, monkeypatch) -> None:
    """A sampled copy of the last prompt draws its own tokens. It wants none, so it is done at
    once and the loop stops with the prompt; before, it ran on until it drew a stop token too.
    The generator fills as a data axis of 2 would (one copy), on one device."""
    gen = Generator.load(tiny_checkpoint("llama"))
    monkeypatch.setattr(gen, "_fill_data_shards", lambda rows: [*rows, rows[-1]])
    kwargs = dict(max_new_tokens=40, sampling=Sampling(temperature=1.0), seed=0, stop_at_eos=False)
    row = gen.generate_ids(PROMPTS[:1], **kwargs).tokens[0]
    assert len(row) == 40
    stop = row[5]
    cut = gen.generate_ids(PROMPTS[:1], stop_tokens=[stop], **kwargs)  # the same draws, then the stop
    assert cut.tokens[0] == row[: row.index(stop) + 1]
    assert cut.decode_steps == row.index(stop)  # token k is chosen by forward pass k (token 0 by pre-fill)


def test_mesh_options_apply_where_they_are_used(tiny_checkpoint, capsys) -> None:
    """`--mesh 1x1` decodes as one device; commands that do not decode on a mesh refuse it."""
    from coreinfer_jax.tools.cli import main

    ckpt = str(tiny_checkpoint("llama"))
    args = ["generate", "--checkpoint", ckpt, "--prompt", "The quick brown fox", "--max-new-tokens", "6", "--json",
            "--method", "stability", "--keep", "0.5", "--layers", "0:2"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--mesh", "1x1"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == plain["tokens"]
    assert main(["bench", "--mesh", "1x1", "--compile-depths", "8"]) == 2
    assert "--mesh applies to the decode-speed tables" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predictor", "--checkpoint", ckpt, "--data", "x.txt", "--mesh", "1x1"])


@pytest.mark.slow
def test_smollm2_on_a_1x3_mesh_equals_one_device(smollm2_checkpoint, tmp_path) -> None:
    """The real SmolLM2-135M (9 heads, 3 KV heads, 1536 neurons) split over 3 devices: dense and
    shard-local stability (`normalized_magnitude`, keep 0.4) generate what one device does."""
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 2681, 2114, 253, 655, 28, 30, 3147]]
    methods = [DENSE, {"method": "stability", "keep": 0.4, "rule": "normalized_magnitude"}]
    job = dict(checkpoint=str(smollm2_checkpoint), mesh="1x3", prompts=prompts, new_tokens=16, methods=methods)
    ran = run_worker([job], tmp_path, devices=3)["jobs"][0]
    gen = Generator.load(smollm2_checkpoint)
    for settings, got in zip(methods, ran["methods"]):
        method = build_method(settings)
        if settings["method"] != "dense":
            method = dataclasses.replace(method, shards=3)
        want = gen.generate_ids(prompts, 16, method=method, stop_at_eos=False)
        assert got["tokens"] == want.tokens, settings
    assert ran["w_up_shard_shape"] == [512, 576]
