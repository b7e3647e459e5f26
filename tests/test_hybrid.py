"""Token-adaptive core neurons (the hybrid method) and its low-rank predictor.

References are derived independently: the predictor's product from a symmetric square root of
the FFN-input second moment measured with PyTorch hooks (the code uses a Cholesky factor of
its own measurement), the oracle mode from a PyTorch masking restatement.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import run_main
from coreinfer_jax import Dense, Generator, Hybrid, Predictor, Stability
from coreinfer_jax.calibrate.predictor import ffn_inputs, fit_predictor, refine
from coreinfer_jax.models.forward import activation_fn
from coreinfer_jax.runtime import engine
from coreinfer_jax.sparse.method import Method
from coreinfer_jax.sparse.predictor import PredictorError, predicted_scores
from coreinfer_jax.tools.cli import main
from coreinfer_jax.tools.roofline import ffn_bytes_per_token
from method_reference import reference_select
from test_sparse import PROMPTS, ffn_modules, flat, generate_with_decode_masks

CALIBRATION = list(np.random.default_rng(0).integers(3, 300, size=4 * 64 * 4))  # 4 batches of 4 windows of 64
EPS = 1e-3


@pytest.fixture(scope="module")
def fitted(tiny_checkpoint):
    """(generator, rank-8 predictor of layers 0..1) per family."""
    cache = {}

    def make(name: str):
        if name not in cache:
            gen = Generator.load(tiny_checkpoint(name))
            cache[name] = gen, fit_predictor(gen, CALIBRATION, rank=8, layers=(0, gen.cfg.num_layers), window=64,
                                             eps=EPS, progress=False)
        return cache[name]

    return make


def torch_second_moments(model: torch.nn.Module, family: str, windows: np.ndarray) -> list[np.ndarray]:
    """Per layer, `X^T X / N` of the FFN inputs (the pre-FFN norm's output), with PyTorch hooks."""
    if family == "opt":
        mods = [layer.fc1 for layer in model.model.decoder.layers]
    else:
        mods = [layer.mlp.gate_proj for layer in model.model.layers]
    sums = [np.zeros((mods[0].in_features,) * 2) for _ in mods]

    def record(i: int, x: torch.Tensor) -> None:
        x = flat(x).astype(np.float64)  # [N, D]
        sums[i] += x.T @ x

    hooks = [m.register_forward_hook(lambda m, a, o, i=i: record(i, a[0])) for i, m in enumerate(mods)]
    with torch.no_grad():
        model(torch.as_tensor(windows))
    for h in hooks:
        h.remove()
    return [s / windows.size for s in sums]


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_predictor_equals_a_numpy_whitened_svd(name, fitted, tiny_torch_model) -> None:
    gen, predictor = fitted(name)
    model = tiny_torch_model(name)
    moments = torch_second_moments(model, gen.cfg.family, np.asarray(CALIBRATION, np.int64).reshape(-1, 64))
    for layer, s in enumerate(moments):
        s = s + EPS * np.mean(np.diag(s)) * np.eye(len(s))
        vals, vecs = np.linalg.eigh(s)
        root = vecs * np.sqrt(vals) @ vecs.T  # S^(1/2): another whitening than the code's Cholesky factor
        projs = {"up": "fc1"} if name == "opt" else {"gate": "gate_proj", "up": "up_proj"}
        for proj, module in projs.items():
            mod = model.model.decoder.layers[layer].fc1 if name == "opt" else \
                getattr(model.model.layers[layer].mlp, module)
            w = mod.weight.detach().numpy().astype(np.float64)  # [F, D]
            u, sv, vt = np.linalg.svd(w @ root, full_matrices=False)
            want = (np.linalg.solve(root, vt[:8].T * sv[:8]) @ u[:, :8].T)  # [D, F], the best rank-8 map
            got = predictor.factors[f"a_{proj}"][layer] @ predictor.factors[f"b_{proj}"][layer]
            np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())
    # A plain SVD is a different map: the whitening matters on these inputs.
    plain_u, plain_s, plain_vt = np.linalg.svd(np.asarray(gen.params["layers"][0]["ffn"]["w_up"], np.float64))
    plain = (plain_u[:, :8] * plain_s[:8] @ plain_vt[:8]).T
    assert not np.allclose(predictor.factors["a_up"][0] @ predictor.factors["b_up"][0], plain, atol=1e-3)


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_dynamic_zero_equals_stability(name, fitted) -> None:
    gen, predictor = fitted(name)
    layers = (1, gen.cfg.num_layers)
    want = gen.generate_ids(PROMPTS, 16, method=Stability(keep=0.4, rule="paper", layers=layers), stop_at_eos=False)
    got = gen.generate_ids(PROMPTS, 16, method=Hybrid(keep=0.4, dynamic=0.0, rule="paper", layers=layers,
                                                      predictor=predictor), stop_at_eos=False)
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(got.core_neurons, want.core_neurons)


@pytest.mark.parametrize("gated", [True, False])
def test_predicted_scores_restate_the_low_rank_ffn(gated: bool) -> None:
    """A gated neuron's score is |act(gate) * up| of the factored projections (a large negative
    activation matters as much as a large positive one); OPT's is fc1's pre-activation."""
    rng = np.random.default_rng(0)
    D, F, r = 8, 16, 3
    names = ("gate", "up") if gated else ("up",)
    factors = {f"{k}_{p}": rng.normal(size=(D, r) if k == "a" else (r, F)).astype(np.float32)
               for p in names for k in "ab"}
    biases = {f"b_{p}": rng.normal(size=F).astype(np.float32) for p in names}
    x = rng.normal(size=(2, D)).astype(np.float32)
    pre = {p: x.astype(np.float64) @ factors[f"a_{p}"] @ factors[f"b_{p}"] + biases[f"b_{p}"] for p in names}  # [2, F]
    want = np.abs(pre["gate"] / (1 + np.exp(-pre["gate"])) * pre["up"]) if gated else pre["up"]
    got = predicted_scores(jax.tree.map(jnp.asarray, factors), jax.tree.map(jnp.asarray, biases), jnp.asarray(x),
                           jax.nn.silu)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "opt", "gemma3"])
@pytest.mark.parametrize("keep,select_by", [(0.0, "predictor"), (0.5, "predictor"), (0.5, "oracle"),
                                            (0.0, "sketch"), (0.5, "sketch")])
def test_all_neurons_between_static_and_dynamic_equals_dense(name, keep, select_by, fitted) -> None:
    """keep + dynamic = 1 reads every neuron exactly once: a dynamic index repeating a core index
    would leave a neuron out and change the logits."""
    gen, predictor = fitted(name)
    method = Hybrid(keep=keep, dynamic=1.0 - keep, layers=(0, gen.cfg.num_layers),
                    predictor=predictor if select_by == "predictor" else None, select_by=select_by)
    dense = gen.generate_ids(PROMPTS, 12, stop_at_eos=False, return_logits=True)
    got = gen.generate_ids(PROMPTS, 12, method=method, stop_at_eos=False, return_logits=True)
    assert got.tokens == dense.tokens
    np.testing.assert_allclose(got.logits, dense.logits, atol=1e-4)


def torch_prompt_core(model: torch.nn.Module, family: str, ids: list[int], keep: float,
                      layers: range) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """A dense PyTorch pre-fill of `ids` alone: per layer of `layers` the activations CoreInfer
    reads `[T, F]` and the core the paper's rule picks from them (NumPy)."""
    mods = ffn_modules(model, family)
    acts = {}
    hooks = [mods[i].register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, flat(o if family == "opt" else a[0])))
             for i in layers]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return acts, {i: reference_select(acts[i], keep, 0.2)[0] for i in layers}


def torch_oracle_generate(model: torch.nn.Module, family: str, ids: list[int], keep: float, dynamic: float,
                          layers: range, n: int, compensate: bool = False) -> list[int]:
    """The oracle hybrid restated in PyTorch: a dense pre-fill of `ids` alone picks each sparse
    layer's core with the paper's rule (NumPy); every decode step keeps, per layer, the core and the
    `dynamic` other neurons of largest |activation| (OPT: largest pre-activation), zeroing the rest
    or, with `compensate`, setting each to its mean down-projection input over the prompt (OPT:
    of fc1's output after ReLU)."""
    acts, core = torch_prompt_core(model, family, ids, keep, layers)
    width = acts[layers[0]].shape[1]
    n_dynamic = int(width * dynamic)

    def keep_mask(i: int, a: torch.Tensor) -> torch.Tensor:
        score = a[0, -1].clone() if family == "opt" else a[0, -1].abs()
        score[torch.as_tensor(core[i])] = -float("inf")
        mask = torch.zeros(width)
        mask[torch.as_tensor(core[i])] = 1.0
        mask[torch.topk(score, n_dynamic).indices] = 1.0
        return mask

    means = {i: torch.as_tensor((np.maximum(acts[i], 0) if family == "opt" else acts[i]).mean(0)) for i in layers}
    return generate_with_decode_masks(model, family, ids, list(layers), keep_mask, n,
                                      fill=means if compensate else None)


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_oracle_mode_matches_pytorch_masking_restatement(name, tiny_checkpoint, tiny_torch_model) -> None:
    gen = Generator.load(tiny_checkpoint(name))
    layers = (1, gen.cfg.num_layers)
    method = Hybrid(keep=0.3, dynamic=0.2, rule="paper", layers=layers, select_by="oracle").validate(gen.cfg)
    ours = gen.generate_ids(PROMPTS, 16, method=method, stop_at_eos=False)
    static = gen.generate_ids(PROMPTS, 16, method=Stability(keep=0.3, layers=layers), stop_at_eos=False)
    assert ours.tokens != static.tokens, "per-token neurons should change something on a random model"
    for b, ids in enumerate(PROMPTS):
        assert ours.tokens[b] == torch_oracle_generate(tiny_torch_model(name), gen.cfg.family, ids, 0.3, 0.2,
                                                       method.sparse_layers(), 16)


@pytest.mark.parametrize("select_by", ["predictor", "oracle", "sketch"])
def test_teacher_forced_scores_equal_generation_logits(select_by, fitted) -> None:
    gen, predictor = fitted("llama")
    assert_scores_equal_generation(gen, Hybrid(keep=0.2, dynamic=0.3, layers=(0, 2), select_by=select_by,
                                               predictor=predictor if select_by == "predictor" else None))


def assert_scores_equal_generation(gen: Generator, method: Method) -> None:
    """Teacher-forced scoring of `method`'s own greedy tokens gives its generation's log-probs."""
    out = gen.generate_ids(PROMPTS, 10, method=method, stop_at_eos=False, return_logits=True)
    scored = gen.score_ids(PROMPTS, out.tokens, method=method)
    for b, (logprobs, greedy) in enumerate(scored):
        want = jax.nn.log_softmax(out.logits[b], axis=-1)[np.arange(10), out.tokens[b]]
        np.testing.assert_allclose(logprobs, want, atol=2e-4)
        assert greedy.all()


def test_no_recompile_within_a_bucket_and_across_predictors(fitted) -> None:
    gen, predictor = fitted("llama")
    method = Hybrid(keep=0.25, dynamic=0.25, layers=(0, 2), predictor=predictor)
    programs = engine.prefill, engine.decode
    gen.generate_ids([[5, 6, 7]], 8, method=method)
    sizes = [f._cache_size() for f in programs]
    other = dataclasses.replace(predictor, factors={k: v[::-1].copy() for k, v in predictor.factors.items()})
    for prompt, p in [([9, 10, 11, 12, 13], predictor), ([4] * 11, other)]:
        gen.generate_ids([prompt], 8, method=dataclasses.replace(method, predictor=p))
    assert [f._cache_size() for f in programs] == sizes


def test_bytes_count_static_dynamic_and_predictor_rows(fitted) -> None:
    gen, predictor = fitted("llama")
    cfg = gen.cfg
    D, F, itemsize = cfg.hidden_size, cfg.intermediate_size, 4
    dense = ffn_bytes_per_token(cfg, gen.params, Dense())
    assert dense == cfg.num_layers * 3 * F * D * itemsize
    method = Hybrid(keep=0.25, dynamic=0.125, layers=(1, 2), predictor=predictor).validate(cfg)
    rows = int(F * 0.25) + int(F * 0.125)  # 32 + 16 of 128
    factors = 2 * 8 * (D + F)  # gate and up, rank 8
    want = (cfg.num_layers - 1) * 3 * F * D * itemsize + (3 * rows * D + factors) * itemsize
    assert ffn_bytes_per_token(cfg, gen.params, method) == want
    oracle = dataclasses.replace(method, select_by="oracle")
    assert ffn_bytes_per_token(cfg, gen.params, oracle) == dense
    static_only = dataclasses.replace(method, dynamic=0.0)  # reads no predictor: Stability's bytes
    assert ffn_bytes_per_token(cfg, gen.params, static_only) == \
        ffn_bytes_per_token(cfg, gen.params, Stability(keep=0.25, layers=(1, 2)).validate(cfg))


@pytest.mark.parametrize("kwargs,words", [
    ({"keep": 0.6, "dynamic": 0.5}, "keep + dynamic must be in (0, 1]"),
    ({"keep": 0.0, "dynamic": 0.0}, "keep + dynamic must be in (0, 1]"),
    ({"keep": 1.0}, "keep must be in [0, 1)"),
    ({"dynamic": 1.5}, "dynamic must be in [0, 1]"),
    ({"select_by": "magic"}, "select_by must be one of"),
])
def test_bad_settings_are_one_clear_error(kwargs, words) -> None:
    with pytest.raises(ValueError) as e:
        Hybrid(**kwargs)
    assert words in str(e.value)


def test_predictor_errors(fitted, tiny_checkpoint, tmp_path) -> None:
    gen, predictor = fitted("llama")
    with pytest.raises(PredictorError, match="rank must be in 1..64"):
        fit_predictor(gen, CALIBRATION, rank=65, progress=False)
    with pytest.raises(PredictorError, match="needs a predictor"):
        Hybrid(select_by="predictor").validate(gen.cfg)
    opt = Generator.load(tiny_checkpoint("opt"))
    with pytest.raises(PredictorError, match="made for another model"):
        Hybrid(predictor=predictor).validate(opt.cfg)
    with pytest.raises(PredictorError, match="not for the sparse layers 0:2"):
        Hybrid(predictor=dataclasses.replace(predictor, layers=(1, 2)), layers=(0, 2)).validate(gen.cfg)
    saved = predictor.save(tmp_path / "p")
    assert Predictor.load(saved, gen.cfg) == predictor
    data = (saved / "arrays.npz").read_bytes()
    (saved / "arrays.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(PredictorError, match="corrupted or truncated"):
        Predictor.load(saved)
    with pytest.raises(PredictorError, match="does not exist; make one with"):
        Predictor.load(tmp_path / "nowhere")


def test_predictor_command_writes_atomically_and_hybrid_cli_runs(tiny_checkpoint, tmp_path) -> None:
    ckpt = tiny_checkpoint("llama")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog."] * 600))
    out = tmp_path / "pred"
    bad = run_main(main, "predictor", "--checkpoint", str(ckpt), "--data", str(text), "--rank", "999",
                   "--skip-tokens", "0", "--out", str(out))
    assert bad.returncode == 2 and "rank must be in 1..64" in bad.stderr and "Traceback" not in bad.stderr
    assert not out.exists() and not list(tmp_path.glob(".pred*"))
    done = run_main(main, "predictor", "--checkpoint", str(ckpt), "--data", str(text), "--rank", "4",
                    "--skip-tokens", "0", "--window", "64", "--layers", "0:2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert Predictor.load(out).rank == 4
    run = run_main(main, "generate", "--checkpoint", str(ckpt), "--prompt", "The quick brown fox",
                   "--max-new-tokens", "4", "--method", "hybrid", "--predictor", str(out),
                   "--layers", "0:2", "--json")
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout)
    assert row["method"] == "hybrid" and row["rule"] == "normalized_magnitude" and row["keep"] == 0.24
    assert row["select_by"] == "predictor" and row["rank"] == 4
    assert row["ffn_bytes_per_token"] < row["dense_ffn_bytes_per_token"]
    missing = run_main(main, "generate", "--checkpoint", str(ckpt), "--prompt", "The quick brown fox",
                       "--method", "hybrid", "--select-by", "predictor")
    assert missing.returncode == 2 and "python -m coreinfer_jax predictor" in missing.stderr


def test_offload_refuses_the_hybrid_method(fitted) -> None:
    gen, predictor = fitted("llama")
    offloaded = Generator(gen.cfg, gen.params, gen.tokenizer, offload=True)
    with pytest.raises(ValueError, match="offload mode cannot serve the hybrid method"):
        offloaded.generate_ids([[1, 2, 3]], 4, method=Hybrid(predictor=predictor, layers=(0, 2)))


def test_refinement_lowers_the_hidden_activation_error(fitted) -> None:
    gen, predictor = fitted("llama")
    refined = refine(gen, predictor, CALIBRATION, steps=30, window=64, batch_tokens=256, progress=False)
    assert refined.refine_steps == 30
    x = np.asarray(ffn_inputs(gen.params, jax.numpy.asarray(np.reshape(CALIBRATION, (-1, 64))), cfg=gen.cfg,
                              layers=predictor.layers), np.float64)  # [L, N, D]
    act = activation_fn(gen.cfg)
    for j in range(gen.cfg.num_layers):
        w = {k: np.asarray(v, np.float64) for k, v in gen.params["layers"][j]["ffn"].items()}
        hidden = np.asarray(act(x[j] @ w["w_gate"].T)) * (x[j] @ w["w_up"].T)  # NumPy: the true activations

        def error(p: Predictor) -> float:
            f = {k: v[j].astype(np.float64) for k, v in p.factors.items()}
            got = np.asarray(act(x[j] @ f["a_gate"] @ f["b_gate"])) * (x[j] @ f["a_up"] @ f["b_up"])
            return float(np.mean((got - hidden) ** 2) / np.mean(hidden ** 2))

        assert error(refined) < 0.9 * error(predictor)
    opt, opt_predictor = fitted("opt")
    with pytest.raises(PredictorError, match="refinement is for gated FFNs"):
        refine(opt, opt_predictor, CALIBRATION, steps=1, window=64)


def test_sweep_runs_hybrid_rows_with_their_bytes(fitted, tiny_checkpoint, tmp_path) -> None:
    from test_sweep import WIKI

    gen, predictor = fitted("llama")
    predictor.save(tmp_path / "pred")
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(WIKI)
    out = tmp_path / "sweep"
    assert main(["sweep", "--checkpoint", str(tiny_checkpoint("llama")), "--tasks", "wikitext", "--rules", "paper",
                 "--keep", "0.5", "--layers", "0:2", "--hybrid", "0.25+0.25:predictor", "0+0.5:griffin:predictor",
                 "0.25+0.25:oracle", "0.25+0.25",
                 "--predictor", str(tmp_path / "pred"), "--data", f"wikitext={wiki}", "--windows", "2",
                 "--context-tokens", "24", "--scored-tokens", "8", "--out", str(out)]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["dense", "stability keep 0.5", "hybrid 0.25+0.25 r8 normalized_magnitude",
                                          "hybrid 0+0.5 r8 griffin", "hybrid 0.25+0.25 oracle normalized_magnitude",
                                          "hybrid 0.25+0.25 int4+rest normalized_magnitude"]
    dense, paper, hybrid, per_token, oracle, sketch = rows
    # Same neurons per token as keep 0.5, plus the rank-8 factors of gate and up in both layers
    # (float32), or the sketch of the 96 neurons outside a core of 32 (a batch of one's bytes): a
    # byte per weight pair of 96 x 64 and two float32 scales per row, and (the rest's estimate) a
    # byte per two of a neuron's 64 down weights and a scale per neuron.
    assert hybrid["ffn_bytes_per_token"] == per_token["ffn_bytes_per_token"] \
        == paper["ffn_bytes_per_token"] + 2 * 2 * 8 * (64 + 128) * 4
    assert sketch["ffn_bytes_per_token"] == paper["ffn_bytes_per_token"] + 2 * (96 * 64 + 2 * 96 * 4) + \
        2 * (32 * 96 + 96 * 4)
    assert oracle["ffn_bytes_per_token"] == dense["ffn_bytes_per_token"]


def test_lm_eval_adapter_takes_a_hybrid_with_its_predictor(fitted, tiny_checkpoint, tmp_path) -> None:
    from coreinfer_jax.evaluation.lm_eval_adapter import CoreInferLM

    gen, predictor = fitted("llama")
    predictor.save(tmp_path / "pred")
    lm = CoreInferLM.create_from_arg_string(f"checkpoint={tiny_checkpoint('llama')},method=hybrid,keep=0.25,"
                                            f"dynamic=0.25,rule=griffin,layers=0:2,predictor={tmp_path / 'pred'}")
    assert lm.method.label == "hybrid 0.25+0.25 r8 griffin"
    context, continuation = [5, 6, 7, 8, 9], [10, 11, 12]
    got = lm._loglikelihood_tokens([(("", ""), context, continuation)])[0][0]
    want = gen.score_ids([context], [continuation], method=Hybrid(keep=0.25, dynamic=0.25, rule="griffin",
                                                                  layers=(0, 2), predictor=predictor))[0][0]
    assert got == pytest.approx(float(want.sum()), abs=1e-4)
