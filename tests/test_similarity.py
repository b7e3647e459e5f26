"""Similarity-guided selection: calibration (signatures, k-means, per-cluster lists) against a
NumPy restatement of the method page, cluster assignment in the jitted pre-fill, the file
format, generation on the tiny models, and the command line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SENTENCES
from coreinfer_jax import Dense, Generator
from coreinfer_jax.runtime import engine
from coreinfer_jax.sparse.gather import gather_core_layers
from coreinfer_jax.tools import cli
from coreinfer_jax.calibrate import similarity as similarity_calibration
from coreinfer_jax.calibrate.similarity import calibrate, fit, truthfulqa_sentence
from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.sparse.calibration import Calibration, CalibrationError, default_calibration_layer, signature_size
from coreinfer_jax.calibrate import kmeans as kmeans_module
from coreinfer_jax.calibrate.kmeans import choose_clusters, elbow
from coreinfer_jax import Similarity, make_method
from coreinfer_jax.sparse.similarity import cluster_core_neurons
from coreinfer_jax.models.forward import forward, init_cache
from coreinfer_jax.runtime.sampling import Sampling
from coreinfer_jax.sparse.selection import rank_bound, sentence_signature, token_core_counts

# --- NumPy restatement of the method page ("Similarity-guided selection") -------------------


def token_counts(acts: np.ndarray, limits: list[int]) -> np.ndarray:
    """`[F]`: in how many tokens of `acts` `[T, F]` each neuron is among that token's `limits[t]`
    largest activations (ties in index order)."""
    counts = np.zeros(acts.shape[1], np.int64)
    for a, limit in zip(acts, limits, strict=True):
        counts[np.argsort(-a, kind="stable")[:limit]] += 1
    return counts


def reference_signature(acts: np.ndarray, size: int) -> np.ndarray:
    """Step 1 for one sentence's real tokens `acts` `[T, F]`: multi-hot `bool [F]`."""
    counts = token_counts(acts, [round(0.4 * int((a > 0).sum())) for a in acts])
    top = np.argsort(-counts, kind="stable")[:size]
    signature = np.zeros(acts.shape[1], bool)
    signature[top[counts[top] > 0]] = True
    return signature


def reference_lists(cluster_acts: list[np.ndarray], keep: float) -> tuple[np.ndarray, np.ndarray]:
    """Step 3 for one cluster and layer, over all tokens `[T_i, F]` of the cluster's sentences:
    (the method's list, top `int(len(unique) * keep)` by count; all neurons ranked by count)."""
    acts = np.concatenate(cluster_acts)  # [T, F]
    counts = token_counts(acts, [int(0.4 * (acts > 0).sum() / len(acts))] * len(acts))
    ranked = np.argsort(-counts, kind="stable")
    return ranked[: int(len(np.flatnonzero(counts)) * keep)], ranked


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    both, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(np.array([len(a)]))
    return (both - expected) / ((rows + cols) / 2 - expected)


# --- synthetic activations with planted clusters ----------------------------------------------

F, L, LAYER, SIZE, K, T_MAX, HOT = 64, 3, 1, 8, 5, 12, 8


def planted(seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """50 sentences `[T, L, F]` in 5 clusters; each cluster's 8 hot neurons per layer are
    boosted in every token."""
    rng = np.random.default_rng(seed)
    truth = rng.permutation(np.repeat(np.arange(K), 10))
    hot = [rng.permutation(F)[: K * HOT].reshape(K, HOT) for _ in range(L)]
    acts = []
    for c in truth:
        a = rng.normal(-0.2, 1.0, size=(rng.integers(5, T_MAX + 1), L, F)).astype(np.float32)
        for layer in range(L):
            a[:, layer, hot[layer][c]] += 2.5
        acts.append(a)
    return acts, truth


def synthetic_passes(acts: list[np.ndarray]):
    """`fit`'s two passes over in-memory activations, with the same device functions as a model's."""
    signature_fn = jax.jit(sentence_signature, static_argnames="size")
    counts_fn = jax.jit(token_core_counts, static_argnames="k_max")

    def pad(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.zeros((len(rows), T_MAX, L, F), np.float32)
        valid = np.zeros((len(rows), T_MAX), bool)
        for j, r in enumerate(rows):
            x[j, : len(acts[r])], valid[j, : len(acts[r])] = acts[r], True
        return x, valid

    def first_pass(rows):
        x, valid = pad(rows)
        positives = ((x > 0) & valid[..., None, None]).sum(axis=(1, 3))  # [B, L]
        return np.asarray(signature_fn(x[:, :, LAYER], valid, size=SIZE)), positives, valid.sum(1)

    def count_pass(rows, limits):
        x, valid = pad(rows)
        return np.stack([np.asarray(counts_fn(x[:, :, i], np.where(valid, limits[:, i : i + 1], 0),
                                              k_max=rank_bound(F))) for i in range(L)], axis=1)

    return first_pass, count_pass


SYNTHETIC_MODEL = {"architecture": "synthetic", "family": "llama", "num_layers": L, "hidden_size": 16,
                   "intermediate_size": F, "vocab_size": 10, "name": None}


def test_calibration_recovers_planted_clusters_and_follows_the_method() -> None:
    acts, truth = planted()
    first_pass, count_pass = synthetic_passes(acts)
    keep = 0.5
    cal = fit(np.array_split(np.arange(len(acts)), 5), first_pass, count_pass, model=SYNTHETIC_MODEL, layer=LAYER,
              signature_size=SIZE, clusters="auto", keep=keep, progress=False)
    assert sorted(cal.inertias) == list(range(1, 11))
    assert cal.clusters == K
    assert adjusted_rand_index(cal.labels, truth) >= 0.9
    for n, a in enumerate(acts):
        np.testing.assert_array_equal(cal.signatures[n], reference_signature(a[:, LAYER], SIZE))
    assert cal.neurons.shape == (K, L, int(F * keep))
    for c in range(K):
        members = [acts[n] for n in np.flatnonzero(cal.labels == c)]
        for layer in range(L):
            method_list, ranked = reference_lists([a[:, layer] for a in members], keep)
            np.testing.assert_array_equal(cal.neurons[c, layer], ranked[: int(F * keep)])
            np.testing.assert_array_equal(cal.neurons[c, layer, : len(method_list)], method_list)


def test_a_short_sentences_signature_holds_only_neurons_core_in_some_token() -> None:
    # One token with 5 positive activations: round(0.4 * 5) = 2 token-wise core neurons, so a
    # signature of size 8 has those 2 and no neuron that no token chose.
    a = -np.arange(1, F + 1, dtype=np.float32)
    a[[40, 7, 23, 60, 11]] = [5.0, 4.0, 3.0, 2.0, 1.0]
    got = np.asarray(jax.jit(sentence_signature, static_argnames="size")(a[None, None], np.ones((1, 1), bool),
                                                                         size=SIZE))[0]
    assert np.flatnonzero(got).tolist() == [7, 40]
    np.testing.assert_array_equal(got, reference_signature(a[None], SIZE))


def test_elbow_takes_the_largest_second_difference_and_at_least_four() -> None:
    assert elbow([100.0, 50.0, 40.0, 35.0, 32.0]) == 2
    assert elbow([100.0, 90.0, 80.0, 20.0, 18.0, 17.0]) == 4
    two_groups = np.repeat(np.eye(2, 6), 5, axis=0) + np.random.default_rng(0).normal(0, 0.01, (10, 6))
    fitted, inertias = choose_clusters(two_groups, "auto")
    assert len(fitted.centroids) == 4 and sorted(inertias) == list(range(1, 11))
    with pytest.raises(ValueError, match="integer"):
        choose_clusters(two_groups, 11)


def test_kmeans_seeds_by_squared_distance_restarts_empty_clusters_far_and_keeps_the_best_run(monkeypatch) -> None:
    # k-means++: with 20 points at 0 and one at 100, the second centre is drawn with probability
    # proportional to d^2, so it is whichever side the first centre is not on, every time.
    x = np.array([[0.0]] * 20 + [[100.0]])
    for seed in range(10):
        assert sorted(kmeans_module._plus_plus(x, 2, np.random.default_rng(seed))[:, 0]) == [0.0, 100.0]
    # Lloyd from centres 1 and 100: every point is nearest 1, so cluster 1 is empty and restarts at
    # the point farthest from its own centre (20), giving {0, 1, 2} and {20}.
    run = kmeans_module._lloyd(np.array([[0.0], [1.0], [2.0], [20.0]]), np.array([[1.0], [100.0]]), 10)
    assert run.labels.tolist() == [0, 0, 0, 1] and run.centroids[:, 0].tolist() == [1.0, 20.0] and run.inertia == 2.0
    # Of the restarts, the lowest inertia wins.
    inertias = iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(kmeans_module, "_lloyd",
                        lambda x, c, n: kmeans_module.KMeansFit(np.zeros(len(x), np.int32), c, next(inertias)))
    assert kmeans_module.kmeans(x, 2, restarts=3).inertia == 1.0


def test_signature_size_and_layer_scale_the_references_by_hand() -> None:
    # The reference's 3000 of OPT-6.7B's 16384 neurons at layer 25 of 32, rounded to nearest.
    assert [signature_size(f) for f in (16384, 14336, 1536, 64)] == [3000, 2625, 281, 12]  # 64: 11.72
    # 25 * 30 / 32 = 23.44, 25 * 24 / 32 = 18.75; with 2 layers round(1.56) = 2 is past the last layer.
    assert [default_calibration_layer(n) for n in (32, 30, 24, 2)] == [25, 23, 19, 1]
    # The reference's calibration sentence, built from TruthfulQA without spaces.
    assert truthfulqa_sentence("Why?", "Light.") == "Question:Why?Answer:Light."


def reference_cluster_neurons(lists: np.ndarray, clusters: list[int], F: int, n_keep: int, shards: int,
                              shared: bool) -> np.ndarray:
    """`Similarity`'s docstring for one layer's `lists` `[k, L]`: a neuron scores L - (its
    place in the row's cluster's list), unlisted 0; shared, summed over the rows with a cluster.
    Each of `shards` blocks of neurons keeps its own best `n_keep / shards`, ties in index order."""
    L = lists.shape[1]
    scores = np.zeros((len(clusters), F), np.int64)
    for b, c in enumerate(clusters):
        if c >= 0:
            scores[b, lists[c]] = L - np.arange(L)
    if shared:
        scores = np.broadcast_to(scores.sum(0), scores.shape)
    block = F // shards
    out = [np.concatenate([s * block + np.argsort(-row[s * block:(s + 1) * block], kind="stable")[: n_keep // shards]
                           for s in range(shards)]) for row in scores]
    return np.stack(out)


@pytest.mark.parametrize("shards,share", [(2, "row"), (1, "batch"), (2, "batch")])
def test_shard_local_and_shared_lists_keep_the_best_listed_neurons(shards: int, share: str) -> None:
    rng = np.random.default_rng(3)
    k, layers, F, L = 3, 2, 16, 8
    neurons = np.stack([rng.permutation(F)[:L] for _ in range(k * layers)]).reshape(k, layers, L).astype(np.int32)
    cal = Calibration(model=SYNTHETIC_MODEL, layer=1, keep=0.5, signature_size=4, data_sha256="", seed=0,
                      inertias={k: 1.0}, centroids=np.zeros((k, F), np.float32), neurons=neurons,
                      labels=np.arange(k, dtype=np.int32), signatures=np.zeros((k, F), bool))
    method = Similarity(cal, keep=0.5, layers=(0, 2), shards=shards, share=share)
    clusters = [2, 0, -1] if share == "batch" else [2, 0, 1]  # -1: a row that only fills a mesh's data axis
    got = np.asarray(cluster_core_neurons(jnp.asarray(neurons), jnp.asarray(clusters, jnp.int32), method=method))
    assert got.shape == (3, layers, 8)
    for j in range(layers):
        want = reference_cluster_neurons(neurons[:, j], clusters, F, 8, shards, shared=share == "batch")
        np.testing.assert_array_equal(got[:, j], want, err_msg=f"layer {j}")  # shared: every row the same set


# --- a real (tiny) model -------------------------------------------------------------------


def half(cal: Calibration) -> Similarity:
    """The method most tests use: keep 0.5, both layers of the tiny models sparse."""
    return Similarity(cal, keep=0.5, layers=(0, 2))


@pytest.fixture(scope="module", params=["llama", "opt_350m_like"])
def calibrated(request, tiny_checkpoint) -> tuple[Generator, Calibration]:
    gen = Generator.load(tiny_checkpoint(request.param))
    return gen, calibrate(gen, SENTENCES, clusters=4, progress=False)


def host_clusters(gen: Generator, cal: Calibration, prompts: list[list[int]]) -> list[int]:
    """Each prompt's cluster, computed on the host from its activations at the calibration layer."""
    tokens, lengths, _ = gen._pack(prompts, 1)

    @jax.jit
    def activations(params, tokens):
        B, T = tokens.shape
        _, _, acts = forward(params, gen.cfg, tokens, jnp.zeros((B,), jnp.int32), init_cache(gen.cfg, B, T, jnp.float32),
                             select=lambda i, a: a if i == cal.layer else None)
        return acts[0]  # [B, T, F]; causal, so padding never changes the real tokens' values

    acts = np.asarray(activations(gen.params, tokens))
    clusters = []
    for a, n in zip(acts, np.asarray(lengths)):
        signature = reference_signature(a[:n], cal.signature_size).astype(np.float64)
        clusters.append(int(np.argmin(((signature[None] - cal.centroids.astype(np.float64)) ** 2).sum(1))))
    return clusters


def test_the_model_passes_count_real_tokens_as_the_method_page_does(tiny_checkpoint) -> None:
    """The two passes `calibrate` runs on a model, against the method page restated over its
    activations: positives are `> 0` (a pruned neuron's exact 0 is not one) and padding tokens
    count nowhere."""
    gen = Generator.load(tiny_checkpoint("llama"))
    cfg, F = gen.cfg, gen.cfg.intermediate_size
    # Ten neurons with zero gate rows: silu(0) * up is exactly 0 in every token.
    layers = [dict(layer, ffn=dict(layer["ffn"], w_gate=layer["ffn"]["w_gate"].at[:10].set(0.0)))
              for layer in gen.params["layers"]]
    params = dict(gen.params, layers=layers)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (3, 16)).astype(np.int32)  # past each length: padding
    lengths = np.array([16, 11, 6], np.int32)
    size, limits = signature_size(F), np.array([[5, 9], [3, 7], [12, 4]], np.int32)  # [B, L]

    _, _, acts = forward(params, cfg, jnp.asarray(tokens), jnp.zeros((3,), jnp.int32),
                         init_cache(cfg, 3, 16, jnp.float32), select=lambda i, a: a, prefix=False)
    acts = [np.asarray(a) for a in acts]  # per layer [B, T, F]; causal: padding never changes real tokens
    assert all((a[:, :, :10] == 0).all() for a in acts)
    positives, signature = similarity_calibration._signature_pass(
        params, jnp.asarray(tokens), jnp.asarray(lengths), cfg=cfg, layer=1, size=size)
    counts = similarity_calibration._count_pass(params, jnp.asarray(tokens), jnp.asarray(lengths),
                                                jnp.asarray(limits), cfg=cfg)
    for b, n in enumerate(lengths):
        assert np.asarray(positives)[b].tolist() == [int((a[b, :n] > 0).sum()) for a in acts]
        np.testing.assert_array_equal(np.asarray(signature)[b], reference_signature(acts[1][b, :n], size))
        for layer, a in enumerate(acts):
            np.testing.assert_array_equal(np.asarray(counts)[b, layer], token_counts(a[b, :n], [limits[b, layer]] * n),
                                          err_msg=f"row {b} layer {layer}")


def one_per_cluster(gen: Generator, cal: Calibration) -> list[list[int]]:
    """The start of a calibration sentence of each cluster, as token ids of different lengths
    that share the 16-token bucket."""
    ids = gen.encode([SENTENCES[int(np.flatnonzero(cal.labels == c)[0])] for c in range(cal.clusters)])
    return [p[: 16 - 3 * c] for c, p in enumerate(ids)]


def test_prefill_assigns_each_prompt_as_the_host_does(calibrated) -> None:
    gen, cal = calibrated
    assert cal.layer == 1 and cal.signature_size == signature_size(gen.cfg.intermediate_size)
    prompts = one_per_cluster(gen, cal)
    out = gen.generate_ids(prompts, max_new_tokens=6, method=half(cal))
    clusters = host_clusters(gen, cal, prompts)
    assert len(set(clusters)) > 1
    core = cal.neurons[clusters][:, 0:2, : int(gen.cfg.intermediate_size * 0.5)]  # [B, n_sparse, n_keep]
    np.testing.assert_array_equal(out.core_neurons, core)

    # Decoding with exactly those neurons: a dense pre-fill, then the shared sparse decode.
    tokens, lengths, cache_len = gen._pack(prompts, 6)
    first_logits, cache, _ = engine.prefill(gen.params, tokens, lengths, cfg=gen.cfg, method=Dense(),
                                            cache_len=cache_len)
    weights = half(cal).validate(gen.cfg).decode_weights(gen.params, jnp.asarray(core))
    want = engine.decode(weights, first_logits, cache, lengths, jnp.int32(6),
                         jnp.asarray(gen.cfg.eos_token_ids, jnp.int32), jax.random.key(0), cfg=gen.cfg,
                         sampling=Sampling(), max_steps=cache_len - tokens.shape[1])
    assert out.tokens == [[int(t) for t in row if t >= 0] for row in np.asarray(want["tokens"])[:, :6]]


def test_keep_one_is_dense_and_offload_matches(calibrated) -> None:
    gen, cal = calibrated
    prompts = one_per_cluster(gen, cal)
    dense = gen.generate_ids(prompts, max_new_tokens=6)
    full = gen.generate_ids(prompts, max_new_tokens=6, method=Similarity(cal, keep=1.0, layers=(0, 2)))
    assert full.tokens == dense.tokens
    on_device = gen.generate_ids(prompts, max_new_tokens=6, method=half(cal))
    offloaded = Generator(gen.cfg, gen.params, gen.tokenizer, offload=True).generate_ids(prompts, 6, method=half(cal))
    assert offloaded.tokens == on_device.tokens
    np.testing.assert_array_equal(offloaded.core_neurons, on_device.core_neurons)


def test_same_bucket_and_same_shaped_calibration_do_not_recompile(calibrated) -> None:
    gen, cal = calibrated
    prompts = one_per_cluster(gen, cal)
    method = Similarity(cal, keep=0.5)
    programs = engine.prefill, gather_core_layers, engine.decode
    gen.generate_ids([prompts[0]], max_new_tokens=8, method=method)
    sizes = [f._cache_size() for f in programs]
    for p in prompts[1:]:
        gen.generate_ids([p], max_new_tokens=8, method=method)
    # Another calibration of the same shapes: its arrays are traced arguments, not constants.
    other = dataclasses.replace(cal, centroids=cal.centroids[::-1].copy(), neurons=cal.neurons[::-1].copy())
    assert other != cal and Similarity(other, keep=0.5) == method
    gen.generate_ids([prompts[0]], max_new_tokens=8, method=Similarity(other, keep=0.5))
    assert [f._cache_size() for f in programs] == sizes


def test_files_round_trip_and_bad_files_are_one_line_errors(calibrated, tmp_path: Path, tiny_checkpoint) -> None:
    gen, cal = calibrated
    path = cal.save(tmp_path / "cal")
    loaded = Calibration.load(path, gen.cfg)
    assert loaded == cal and loaded.inertias == cal.inertias and loaded.model == cal.model
    for name in ("centroids", "neurons", "labels", "signatures"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(cal, name))
    manifest = json.loads((path / "manifest.json").read_text())
    assert (manifest["layer"], manifest["clusters"], manifest["keep"]) == (cal.layer, 4, 1.0)

    other = Generator.load(tiny_checkpoint("opt" if gen.cfg.family == "llama" else "llama")).cfg
    errors = []
    with pytest.raises(CalibrationError, match="made for another model") as e:
        Calibration.load(path, other)
    errors.append(e)
    with pytest.raises(CalibrationError, match="made for another model") as e:
        Similarity(path).validate(other)
    errors.append(e)
    with pytest.raises(CalibrationError, match="already exists") as e:
        cal.save(path)
    errors.append(e)

    truncated = Path(shutil.copytree(path, tmp_path / "truncated"))
    data = (truncated / "arrays.npz").read_bytes()
    (truncated / "arrays.npz").write_bytes(data[: len(data) // 2])
    edited = Path(shutil.copytree(path, tmp_path / "edited"))
    (edited / "manifest.json").write_text(json.dumps(dict(manifest, layer=0)))
    for bad in (truncated, edited):
        with pytest.raises(CalibrationError, match="corrupted") as e:
            Calibration.load(bad)
        errors.append(e)
    with pytest.raises(CalibrationError, match="does not exist") as e:
        Calibration.load(tmp_path / "missing")
    errors.append(e)
    assert all("\n" not in str(e.value) for e in errors)


def test_method_errors(calibrated, tmp_path: Path) -> None:
    gen, cal = calibrated
    with pytest.raises(ValueError, match="needs a calibration"):
        make_method("similarity", keep=0.4)
    with pytest.raises(ValueError, match="only used by the similarity method"):
        make_method("stability", calibration=tmp_path)
    short = dataclasses.replace(cal, keep=0.25, neurons=cal.neurons[..., : int(gen.cfg.intermediate_size * 0.25)])
    with pytest.raises(CalibrationError, match="calibrate again with --keep 0.5"):
        Similarity(short, keep=0.5).validate(gen.cfg)


def test_impossible_cluster_counts_are_refused_before_any_signature(calibrated, monkeypatch) -> None:
    gen, _ = calibrated
    monkeypatch.setattr(similarity_calibration, "_signature_pass", None)  # called: a TypeError, not the message
    with pytest.raises(CoreInferError,
                       match=r"clusters must be 'auto' or an integer in 1..3 \(the number of sentences\), got 4"):
        calibrate(gen, SENTENCES[:3], clusters=4, progress=False)
    with pytest.raises(CoreInferError, match="--clusters auto needs at least 4 sentences, got 3"):
        calibrate(gen, SENTENCES[:3], progress=False)
    with pytest.raises(CoreInferError, match="got True"):
        calibrate(gen, SENTENCES, clusters=True, progress=False)
    with pytest.raises(CoreInferError, match="sentences must be a sequence of strings, not one string"):
        calibrate(gen, SENTENCES[0], clusters=1, progress=False)  # was: its characters, "prompt is empty"


def test_cli_calibrate_then_generate(tiny_checkpoint, tmp_path: Path, capsys) -> None:
    ckpt = tiny_checkpoint("llama")
    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(SENTENCES[:12]) + "\n")
    out = tmp_path / "cal"
    assert cli.main(["calibrate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out),
                     "--clusters", "auto", "--keep", "0.5"]) == 0
    cal = Calibration.load(out)
    assert cal.clusters >= 4 and cal.keep == 0.5 and len(cal.labels) == 12 and cal.model["name"]
    assert "inertia by k" in capsys.readouterr().out
    args = ["generate", "--checkpoint", str(ckpt), "--prompt", "Question:What is the tallest mountain?Answer:",
            "--max-new-tokens", "4", "--method", "similarity", "--keep", "0.5", "--json"]
    assert cli.main([*args, "--calibration", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "similarity" and result["keep"] == 0.5 and result["layers"] == [1, 2]
    assert result["core_neurons"][0] in cal.neurons[:, 1, :64].tolist()
    assert cli.main(args) == 2
    assert "needs a calibration" in capsys.readouterr().err
    assert cli.main([*args[:-2], "0.6", "--json", "--calibration", str(out)]) == 2
    assert "calibrate again" in capsys.readouterr().err
