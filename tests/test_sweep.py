"""Per-layer budgets (static per-layer counts, bytes, measurement, allocation) and the sweep
command end to end on the tiny Llama, with data files the tests write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from coreinfer_jax import Dense, Generator, Hybrid, Stability
from coreinfer_jax.runtime import engine
from coreinfer_jax.calibrate.budget import measure
from coreinfer_jax.sparse.budget import Budget, BudgetError, allocate
from coreinfer_jax.tools.cli import main
from coreinfer_jax.tools.roofline import bytes_per_token, ffn_bytes_per_token
from coreinfer_jax.sparse.rules import RULES
from coreinfer_jax.evaluation.evaluate import EvalResult, wikitext_windows
from coreinfer_jax.evaluation.sweep import _noise, markdown, pareto_front, sweep_methods, task_rows
from eval_files import write_truthfulqa
from method_reference import reference_select

PROMPTS = [[5, 17, 33, 100, 2, 9, 250, 41, 7, 61, 3, 90, 14, 15], [7, 8, 9, 10, 11]]
WIKI = " = Cats = \n\n The cat sat on the mat . It is black and it sleeps all day long . \n" * 40


@pytest.fixture(scope="module")
def gen(tiny_checkpoint) -> Generator:
    return Generator.load(tiny_checkpoint("llama"))  # 2 layers, F = 128


def prefill_core(gen: Generator, method: Stability) -> np.ndarray:
    tokens, lengths, cache_len = gen._pack(PROMPTS, 4)
    _, _, core = engine.prefill(gen.params, tokens, lengths, cfg=gen.cfg, method=method.validate(gen.cfg),
                                cache_len=cache_len)
    return np.asarray(core)


@pytest.mark.parametrize("rule", list(RULES))
def test_per_layer_counts_are_prefixes_of_the_rules_ranking(gen, rule) -> None:
    """A layer with fewer (more) neurons keeps the first of (extends) the uniform selection,
    padded with -1 to the widest layer."""
    uniform = prefill_core(gen, Stability(keep=0.5, layers=(0, 2), rule=rule))  # [2, 2, 64]
    budget = prefill_core(gen, Stability(keep=0.5, layers=(0, 2), rule=rule, layer_keep=(96, 32)))  # [2, 2, 96]
    assert uniform.shape == (2, 2, 64) and budget.shape == (2, 2, 96)
    np.testing.assert_array_equal(budget[:, 0, :64], uniform[:, 0])
    np.testing.assert_array_equal(budget[:, 1, :32], uniform[:, 1, :32])
    assert (budget[:, 1, 32:] == -1).all() and (budget[:, 0] >= 0).all()


def test_gathered_weights_are_each_layers_own_rows(gen) -> None:
    method = Stability(keep=0.5, layers=(0, 2), rule="normalized_magnitude", layer_keep=(96, 32)).validate(gen.cfg)
    core = prefill_core(gen, method)
    weights = method.decode_weights(gen.params, jnp.asarray(core))
    for j, n in enumerate((96, 32)):
        full, got = gen.params["layers"][j]["ffn"], weights["layers"][j]["ffn"]
        # Gate and up rows come as one matrix (`sparse.gather.fused_layout`); this test-sized
        # FFN is too narrow to be padded.
        got = dict(got, w_gate=got["w_gate_up"][:, :n], w_up=got["w_gate_up"][:, n:])
        for name in ("w_gate", "w_up", "w_down"):
            assert got[name].shape == (2, n, gen.cfg.hidden_size)
            for b in range(2):
                np.testing.assert_array_equal(got[name][b], np.asarray(full[name])[core[b, j, :n]])


def test_bytes_per_token_depend_on_the_total_only(gen) -> None:
    cfg, params = gen.cfg, gen.params

    def both(method):
        m = method.validate(cfg)
        return bytes_per_token(cfg, params, m, 50), ffn_bytes_per_token(cfg, params, m)

    uniform = both(Stability(keep=0.5, layers=(0, 2)))
    assert both(Stability(keep=0.5, layers=(0, 2), layer_keep=(96, 32))) == uniform
    assert both(Stability(keep=0.5, layers=(0, 2), rule="magnitude", layer_keep=(1, 127))) == uniform
    dense = both(Dense())
    itemsize = 4
    per_neuron = 3 * cfg.hidden_size * itemsize  # a row of w_gate, w_up and w_down
    assert dense[0] - uniform[0] == dense[1] - uniform[1] == 2 * 64 * per_neuron
    assert both(Stability(keep=1.0, layers=(0, 2), layer_keep=(128, 128))) == dense


def test_keep_all_budget_decodes_the_dense_tokens(gen) -> None:
    dense = gen.generate_ids(PROMPTS, 12, stop_at_eos=False)
    full = gen.generate_ids(PROMPTS, 12, method=Stability(keep=1.0, layers=(0, 2), rule="normalized_magnitude",
                                                          layer_keep=(128, 128)), stop_at_eos=False)
    assert full.tokens == dense.tokens


@pytest.mark.parametrize("layer_keep,words", [
    ((64, 64, 64), "has 3 counts but there are 2 sparse layers"),
    ((64, 60), "totals 124 neurons but keep=0.5 keeps 128 (2 layers x 64)"),
    ((0, 128), "counts must be in 1..128"),
    ((200, -72), "counts must be in 1..128"),
])
def test_bad_budgets_are_one_clear_error(gen, layer_keep, words) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        gen.generate_ids([[1, 2, 3]], 4, method=Stability(keep=0.5, layers=(0, 2), layer_keep=layer_keep))


def test_offload_refuses_a_budget(tiny_checkpoint) -> None:
    off = Generator.load(tiny_checkpoint("llama"), offload=True)
    with pytest.raises(ValueError, match="not supported in offload mode"):
        off.generate_ids([[1, 2, 3]], 4, method=Stability(keep=0.5, layers=(0, 2), layer_keep=(96, 32)))


def test_allocate_is_proportional_within_bounds() -> None:
    assert allocate([1.0, 1.0, 2.0], 400, 1, 1000) == (100, 100, 200)
    got = allocate([0.05, -0.01, 0.3, 0.1], 4 * 614, 307, 1228)
    assert sum(got) == 4 * 614 and all(307 <= n <= 1228 for n in got)
    assert got[1] == 307 and got[2] == 1228 and got[0] < got[3]  # clipped at both ends
    assert allocate([1.0, 1.0, 1.0], 10, 1, 10) == (4, 3, 3)  # remainders by layer index
    with pytest.raises(ValueError, match="cannot give 2 layers 5..8 neurons each and 20 in all"):
        allocate([1.0, 1.0], 20, 5, 8)


def test_a_budget_keeps_each_layer_within_half_and_twice_the_uniform_count() -> None:
    def counts(sensitivity: tuple[float, ...]) -> tuple[int, ...]:
        return Budget(rule="paper", layers=(0, 4), width=1000, token_keep=0.2, sensitivity={0.4: sensitivity},
                      dense_nll_per_token=1.0, windows=1).layer_neurons(0.4)

    # Keep 0.4 of 1000: 400 per layer uniformly, 1600 in all, each layer within 200..800.
    assert counts((10.0, 0.0, 0.0, 0.0)) == (800, 267, 267, 266)  # capped at twice; the rest share 800
    assert counts((10.0, 10.0, 10.0, 0.0)) == (467, 467, 466, 200)  # floored at half; 1400 / 3 = 466.7


def test_measured_budget_round_trips_and_serves_its_keeps(gen, tmp_path: Path) -> None:
    windows = wikitext_windows(gen, WIKI, 24, 8, 2)
    budget = measure(gen, windows, "magnitude", [0.5], layers=(0, 2))
    assert budget.layers == (0, 2) and budget.width == 128 and len(budget.sensitivity[0.5]) == 2
    assert budget.windows == 2 and budget.dense_nll_per_token > 0
    budget.save(tmp_path / "b.json")
    loaded = Budget.load(tmp_path / "b.json")
    assert loaded == budget
    counts = loaded.layer_neurons(0.5)
    assert sum(counts) == 128 and all(32 <= n <= 128 for n in counts)
    method = loaded.method(0.5).validate(gen.cfg)
    assert method.rule == "magnitude" and method.layer_keep == counts
    with pytest.raises(BudgetError, match="measured at keep 0.5, not 0.4"):
        loaded.layer_neurons(0.4)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(BudgetError, match="not a budget file"):
        Budget.load(tmp_path / "bad.json")


def torch_nll(model, context: list[int], scored: list[int], layer: int | None = None,
              kept: np.ndarray | None = None) -> float:
    """NLL of `scored` after `context` in Transformers; with `layer`, that layer's FFN keeps
    only `kept` neurons at the scored positions (teacher-forced sparse decoding, restated)."""
    hooks = []
    if layer is not None:
        mask = torch.zeros(model.config.intermediate_size)
        mask[torch.as_tensor(kept)] = 1.0

        def masked(module, args):
            x = args[0].clone()
            x[:, len(context):] *= mask  # the context is pre-filled densely
            return (x,)

        hooks.append(model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(masked))
    with torch.no_grad():
        logits = model(torch.tensor([context + scored[:-1]])).logits[0, len(context) - 1:].double()
    for h in hooks:
        h.remove()
    return -float(torch.log_softmax(logits, -1)[torch.arange(len(scored)), torch.tensor(scored)].sum())


def test_measured_sensitivity_is_the_loss_of_sparsifying_one_layer(gen, tiny_torch_model) -> None:
    """Sensitivity of layer j: NLL per scored token with only layer j sparse, minus dense,
    restated with Transformers and the paper's rule in NumPy (tests/method_reference.py)."""
    model = tiny_torch_model("llama")
    windows = wikitext_windows(gen, WIKI, 24, 8, 2)
    budget = measure(gen, windows, "paper", [0.5], layers=(0, 2))
    increase, dense = np.zeros(2), 0.0
    for context, scored in windows:
        acts: dict[int, np.ndarray] = {}  # the context's activations, [T, F] per layer
        hooks = [model.model.layers[j].mlp.down_proj.register_forward_pre_hook(
            lambda m, a, j=j: acts.__setitem__(j, a[0][0].numpy().copy())) for j in (0, 1)]
        with torch.no_grad():
            model(torch.tensor([context]))
        for h in hooks:
            h.remove()
        base = torch_nll(model, context, scored)
        dense += base
        for j in (0, 1):
            kept, _ = reference_select(acts[j], 0.5, 0.2)
            increase[j] += torch_nll(model, context, scored, j, kept) - base
    assert budget.dense_nll_per_token == pytest.approx(dense / 16, abs=1e-4)
    np.testing.assert_allclose(budget.sensitivity[0.5], increase / 16, atol=1e-4)
    assert np.abs(increase).min() > 1e-2  # each layer's loss is measured, not a zero


def test_pareto_front() -> None:
    points = [(1.0, 0.3), (2.0, 0.5), (2.0, 0.4), (3.0, 0.45), (4.0, 0.6)]
    assert pareto_front(points, higher_is_better=True) == [0, 1, 4]
    assert pareto_front([(1.0, 30.0), (2.0, 20.0), (3.0, 25.0)], higher_is_better=False) == [0, 1]
    # Equal points do not beat each other (one must be strictly better): both stay on the front.
    assert pareto_front([(1.0, 0.5), (1.0, 0.5), (2.0, 0.9)], higher_is_better=True) == [0, 1, 2]


def test_every_sweep_row_takes_the_sweeps_token_keep_and_layers() -> None:
    budget = Budget(rule="magnitude", layers=(0, 2), width=128, token_keep=0.2, sensitivity={0.5: (1.0, 3.0)},
                    dense_nll_per_token=2.0, windows=1)
    methods = sweep_methods(["paper"], [0.5], token_keep=0.3, layers=(0, 2), budget=budget,
                            hybrids=[Hybrid(keep=0.25, dynamic=0.25, layers=(1, 2))])
    assert [m.label for m in methods[:3]] == ["dense", "stability keep 0.5", "stability keep 0.5 magnitude+budget"]
    assert isinstance(methods[3], Hybrid)
    assert [(m.token_keep, m.layers) for m in methods[1:]] == [(0.3, (0, 2))] * 3
    assert methods[2].layer_keep == (32, 96)  # 128 neurons in proportion 1 : 3
    # Without --layers, a hybrid keeps its own layers (its family's recommended ones when unset).
    assert sweep_methods(["paper"], [0.5], hybrids=[Hybrid(keep=0.25, dynamic=0.25, layers=(1, 2))])[-1].layers \
        == (1, 2)


def test_a_difference_within_two_standard_errors_is_noise_either_way() -> None:
    # mean 0.15 is 1.5 SE: noise; 2.5 SE is a verdict, whose direction follows the metric's.
    assert _noise({"mean": 0.15, "se": 0.1}, higher_is_better=True) == "within noise"
    assert _noise({"mean": -0.15, "se": 0.1}, higher_is_better=False) == "within noise"
    assert _noise({"mean": 0.25, "se": 0.1}, higher_is_better=True) == "better"
    assert _noise({"mean": 0.25, "se": 0.1}, higher_is_better=False) == "worse"  # e.g. NLL per token up
    assert _noise({"mean": -0.25, "se": 0.1}, higher_is_better=False) == "better"


def sweep_rows(f1s: dict[str, list[float]]) -> list[dict]:
    """`task_rows` for SQuAD results whose per-question F1s are `f1s` (by row label)."""
    methods = [Dense(), Stability(keep=0.5), Stability(keep=0.5, rule="normalized_magnitude")]
    records = [{"label": m.label, "f1": f} for m in methods for f in f1s[m.label]]
    results = [EvalResult("squad", m.name, 1.0, len(f1s[m.label]),
                          {"f1": float(np.mean(f1s[m.label])), "exact_match": 0.0}) for m in methods]
    return task_rows("squad", methods, results, records, [3, 2, 2])


def test_paired_differences_and_their_noise_verdict() -> None:
    # Differences 0.3, 0.1, 0.2: mean 0.2, sample SD 0.1, SE 0.1 / sqrt(3) = 0.0577 < 0.2 / 2.
    rows = sweep_rows({"dense": [0.5] * 3, "stability keep 0.5": [0.1, 0.3, 0.2],
                       "stability keep 0.5 normalized_magnitude": [0.4, 0.4, 0.4]})
    p = rows[2]["paired_vs_paper"]
    assert (p["mean"], p["se"], p["z"]) == pytest.approx((0.2, 0.1 / 3 ** 0.5, 0.2 * 3 ** 0.5 / 0.1))
    assert "| +0.2000 ± 0.0577 | better |" in markdown({"tasks": ["squad"], "rows": rows})


def test_one_example_has_no_standard_error() -> None:
    rows = sweep_rows({"dense": [0.5], "stability keep 0.5": [0.1], "stability keep 0.5 normalized_magnitude": [0.4]})
    assert rows[2]["paired_vs_paper"] == {"mean": pytest.approx(0.3), "se": None, "z": None}
    table = markdown({"tasks": ["squad"], "rows": rows})
    assert "| +0.3000 ± n/a | n/a (n = 1) |" in table and "noise" not in table
    json.dumps(rows, allow_nan=False)  # no NaN in the report


def test_sweep_writes_json_markdown_and_plot(gen, tiny_checkpoint, tmp_path: Path, capsys) -> None:
    ckpt = str(tiny_checkpoint("llama"))
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(WIKI)
    assert main(["budget", "--checkpoint", ckpt, "--data", str(wiki), "--rule", "normalized_magnitude",
                 "--keep", "0.5", "--layers", "0:2", "--windows", "1", "--first-window", "2",
                 "--context-tokens", "24", "--scored-tokens", "8", "--out", str(tmp_path / "b.json")]) == 0
    # One window, the third: the first two are skipped (those the sweep evaluates on).
    third = wikitext_windows(gen, WIKI, 24, 8, 3)[2:]
    measured = Budget.load(tmp_path / "b.json")
    assert measured.windows == 1
    assert measured == measure(gen, third, "normalized_magnitude", [0.5], layers=(0, 2))
    out = tmp_path / "sweep"
    assert main(["sweep", "--checkpoint", ckpt, "--tasks", "wikitext", "truthfulqa",
                 "--rules", "paper", "normalized_magnitude", "--keep", "0.5", "--budget", str(tmp_path / "b.json"),
                 "--data", f"wikitext={wiki}", f"truthfulqa={write_truthfulqa(tmp_path / 'tqa.csv')}",
                 "--limit", "2", "--windows", "2", "--context-tokens", "24", "--scored-tokens", "8",
                 "--zero-shot", "--max-new-tokens", "4", "--out", str(out)]) == 0
    report = json.loads((out / "sweep.json").read_text())
    labels = ["dense", "stability keep 0.5", "stability keep 0.5 normalized_magnitude",
              "stability keep 0.5 normalized_magnitude+budget"]
    for task, n in (("wikitext", 2), ("truthfulqa", 2)):
        rows = [r for r in report["rows"] if r["task"] == task]
        assert [r["label"] for r in rows] == labels and all(r["n"] == n for r in rows)
        dense, paper, norm, budgeted = rows
        assert dense["ffn_bytes_per_token"] > paper["ffn_bytes_per_token"] == norm["ffn_bytes_per_token"] \
            == budgeted["ffn_bytes_per_token"]
        assert "paired_vs_paper" not in paper and "paired_vs_paper" in norm and "paired_vs_uniform" in budgeted
        assert norm["delta_vs_paper"] == pytest.approx(norm["value"] - paper["value"])
        assert budgeted["rule"] == "normalized_magnitude" and sum(budgeted["budget"]) == 128
    wiki_rows = [r for r in report["rows"] if r["task"] == "wikitext"]
    assert [r["metric"] for r in wiki_rows] == ["perplexity"] * 4
    table = (out / "sweep.md").read_text()
    assert "### wikitext (n = 2; perplexity, lower is better)" in table
    assert "| stability keep 0.5 normalized_magnitude+budget | 0.5 |" in table
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 4 + 2 * 4 and {r["label"] for r in records} == set(labels)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["generate", "--prompt", "hi", "--method", "stability", "--keep", "0.5", "--layers", "0:2",
      "--layer-neurons", "10,10"], "totals 20 neurons but keep=0.5 keeps 128"),
    (["generate", "--prompt", "hi", "--method", "stability", "--layer-neurons", "a,b"],
     "--layer-neurons must be comma-separated integers"),
    (["generate", "--prompt", "hi", "--method", "stability", "--rule", "nope"], "invalid choice: 'nope'"),
    (["sweep", "--rules", "paper", "--data", "books=x.txt", "--out", "x"], "--data takes TASK=FILE"),
    (["sweep", "--rules", "paper", "--hybrid", "0.2+0.2:magic", "--out", "x"],
     "'magic' is neither a rule (paper, magnitude, normalized_magnitude, griffin), one of sketch, predictor"),
    (["generate", "--prompt", "hi", "--method", "stability", "--select-by", "sketch"],
     "--dynamic, --predictor, --select-by and --rest apply to --method hybrid"),
    # Dense (generate's default) would ignore a sparse option: the run is not the one asked for.
    (["generate", "--prompt", "hi", "--keep", "0.4"],
     "--keep applies only to the sparse methods, not to --method dense: add --method stability"),
    (["bench", "--method", "dense", "--keep", "0.3", "--token-keep", "0.5"],
     "--keep, --token-keep apply only to the sparse methods"),
    (["eval", "--task", "wikitext", "--data", __file__, "--method", "dense", "--layers", "0:2", "--compensate"],
     "--layers, --compensate apply only to the sparse methods"),
    (["bench", "--batch", "1", "--method", "dense", "--share", "batch"], "--share applies only to the sparse methods"),
])
def test_bad_cli_input_is_one_clear_line(args, message, tiny_checkpoint, capsys) -> None:
    try:
        code = main(args + ["--checkpoint", str(tiny_checkpoint("llama"))])
    except SystemExit as e:  # argparse rejects bad choices itself
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
