"""The lm-evaluation-harness adapter: scores and generations against Transformers and the
library's own decoding, a real `simple_evaluate` run on local tasks, the CLI route, bad args."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from tokenizers import processors

import lm_eval
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from conftest import build_tiny_tokenizer
from coreinfer_jax import Sampling, make_method
from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.evaluation.lm_eval_adapter import CoreInferLM

PAIRS = [
    ("The quick brown fox", " jumps over the lazy dog."),
    ("Paris is the capital of ", "France"),  # trailing space moves to the continuation
    ("", "Water boils at one hundred degrees."),  # empty context: BOS is the context
    ("She sells sea shells by", " the sea shore."),
    ("Numbers like 1, 2, 3 and", " 100 appear in many texts."),
    ("  ", "Rain is expected tomorrow."),  # the context is empty once its spaces move: BOS again
]  # six: two batches of four, the second padded
MC_DOCS = [
    {"question": "The cat sat on the", "choices": ["mat", "moon", "river"], "answer": 0},
    {"question": "Water boils at one hundred", "choices": ["apples", "degrees", "legs"], "answer": 1},
    {"question": "How many legs does a spider", "choices": ["have?", "sing?", "eat?"], "answer": 0},
    {"question": "The sun rises in the", "choices": ["west", "east", "park"], "answer": 1},
]
GEN_PROMPTS = ["The quick brown", "Good morning! How", "The library opens at", "Birds build nests in"]
GEN_KWARGS = {"until": ["."], "max_gen_toks": 6, "do_sample": False}
LONG_TEXT = " ".join(["The cat sat on the mat and looked out of the window."] * 20)  # longer than the context
# Both sparse layers of the tiny model; one batch size everywhere so tests share compiles.
SPARSE_ARGS = {"method": "stability", "keep": 0.5, "layers": "0:2", "batch_size": 4}


def make_lm(checkpoint: Path, **args: object) -> CoreInferLM:
    args = {"checkpoint": checkpoint, **args}
    return CoreInferLM.create_from_arg_string(",".join(f"{k}={v}" for k, v in args.items()))


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def dense(ckpt: Path) -> CoreInferLM:
    return make_lm(ckpt, batch_size=4)


@pytest.fixture(scope="module")
def sparse(ckpt: Path) -> CoreInferLM:
    return make_lm(ckpt, **SPARSE_ARGS)


def torch_score(model: torch.nn.Module, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation])).logits[0]
    scored = logits[len(context) - 1: -1]  # the positions that predict the continuation
    logprobs = torch.log_softmax(scored, dim=-1)[torch.arange(len(continuation)), torch.tensor(continuation)]
    return float(logprobs.sum()), bool((scored.argmax(-1) == torch.tensor(continuation)).all())


def hf_split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """HFLM's tokenization, restated: trailing context spaces join the continuation; BOS for ""."""
    if not context:
        return [tok.bos_token_id], tok.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[: len(context) - spaces], context[len(context) - spaces:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx or [tok.bos_token_id], whole[len(ctx):]


def test_loglikelihood_matches_transformers(dense: CoreInferLM, tiny_torch_model) -> None:
    model, tok = tiny_torch_model("llama"), dense.tokenizer
    got = dense.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    want = [torch_score(model, *hf_split(tok, c, x)) for c, x in PAIRS]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4, rtol=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert all(isinstance(v, float) and isinstance(b, bool) for v, b in got)


def test_is_greedy_on_the_models_own_continuation(dense: CoreInferLM, tiny_torch_model) -> None:
    model = tiny_torch_model("llama")
    ids = dense.tok_encode("The sun rises in the")
    with torch.no_grad():
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)[0, len(ids):].tolist()
    other = greedy[:2] + [(greedy[2] + 1) % len(dense.tokenizer)]
    got = dense._loglikelihood_tokens([(("", ""), ids, greedy), (("", ""), ids, other)], disable_tqdm=True)
    assert [g for _, g in got] == [True, False]
    np.testing.assert_allclose([v for v, _ in got], [torch_score(model, ids, c)[0] for c in (greedy, other)],
                               atol=1e-4, rtol=1e-5)


def test_long_context_is_left_truncated(dense: CoreInferLM, tiny_torch_model, caplog) -> None:
    model, tok = tiny_torch_model("llama"), dense.tokenizer
    context = LONG_TEXT
    ctx, cont = hf_split(tok, context, " The end.")
    assert len(ctx) > dense.max_length
    with caplog.at_level(logging.WARNING, logger="coreinfer_jax.evaluation.lm_eval_adapter"):
        [(value, _)] = dense.loglikelihood(requests("loglikelihood", [(context, " The end.")]), disable_tqdm=True)
    assert "left-truncated" in caplog.text
    want, _ = torch_score(model, ctx[-(dense.max_length - len(cont)):], cont)
    np.testing.assert_allclose(value, want, atol=1e-4, rtol=1e-5)


def test_stability_keep_one_is_dense_and_keep_half_is_not(ckpt: Path, dense: CoreInferLM,
                                                          sparse: CoreInferLM) -> None:
    reqs = requests("loglikelihood", PAIRS)
    base = np.array([v for v, _ in dense.loglikelihood(reqs, disable_tqdm=True)])
    full = make_lm(ckpt, method="stability", keep=1.0, batch_size=4).loglikelihood(reqs, disable_tqdm=True)
    half = sparse.loglikelihood(reqs, disable_tqdm=True)
    np.testing.assert_allclose([v for v, _ in full], base, atol=1e-4)
    assert np.abs(np.array([v for v, _ in half]) - base).max() > 1e-2


def test_every_documented_model_arg_is_accepted(ckpt: Path, sparse: CoreInferLM) -> None:
    """`share`, `mesh` and `compensate` reach the method and the generator."""
    lm = make_lm(ckpt, **SPARSE_ARGS, share="batch", mesh="1x1", compensate="true")
    assert lm.method.share == "batch" and lm.method.compensate and lm.gen.mesh is not None
    assert not make_lm(ckpt, **SPARSE_ARGS, compensate="false").method.compensate
    reqs = requests("loglikelihood", PAIRS[:4])
    plain = [v for v, _ in sparse.loglikelihood(reqs, disable_tqdm=True)]
    compensated = [v for v, _ in make_lm(ckpt, **SPARSE_ARGS, compensate=True).loglikelihood(reqs, disable_tqdm=True)]
    assert np.abs(np.array(compensated) - plain).max() > 1e-3


def test_sparse_scores_are_sparse_decoding(sparse: CoreInferLM) -> None:
    """Teacher-forcing the sparse model's own greedy output reproduces its decode logits."""
    prompts = [sparse.tok_encode(p) for p in GEN_PROMPTS]
    out = sparse.gen.generate_ids(prompts, 5, sparse.method, stop_at_eos=False, return_logits=True)
    logprobs = np.asarray(jax.nn.log_softmax(out.logits, axis=-1))
    want = [logprobs[i, np.arange(5), out.tokens[i]].sum() for i in range(len(prompts))]
    got = sparse._loglikelihood_tokens([(("", ""), p, t) for p, t in zip(prompts, out.tokens)],
                                       disable_tqdm=True)
    np.testing.assert_allclose([v for v, _ in got], want, atol=1e-4)
    assert all(g for _, g in got)


def test_generate_until_matches_transformers_greedy(dense: CoreInferLM, tiny_torch_model) -> None:
    model, tok = tiny_torch_model("llama"), dense.tokenizer
    kwargs = [GEN_KWARGS, {"until": [" the"], "max_gen_toks": 8}]
    args = [(p, k) for k in kwargs for p in GEN_PROMPTS]
    got = dense.generate_until(requests("generate_until", args), disable_tqdm=True)
    for (prompt, k), text in zip(args, got):
        ids = tok.encode(prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=k["max_gen_toks"], do_sample=False)
        want = tok.decode(out[0, len(ids):], skip_special_tokens=True)
        for stop in k["until"]:
            want = want.split(stop)[0]
        assert text == want


def test_generate_until_sampling_and_newline_stop(dense: CoreInferLM) -> None:
    kwargs = {"until": ["\n"], "max_gen_toks": 7, "do_sample": True, "temperature": 0.8, "top_k": 20}
    got = dense.generate_until(requests("generate_until", [(p, kwargs) for p in GEN_PROMPTS]), disable_tqdm=True)
    ids = [dense.tok_encode(p) for p in GEN_PROMPTS]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # the adapter batches longest first
    out = dense.gen.generate_ids([ids[i] for i in order], 7, make_method("dense"),
                                 Sampling(temperature=0.8, top_k=20), seed=0)  # seed: the batch's index
    want = [dense.tokenizer.decode(t, skip_special_tokens=True).split("\n")[0] for t in out.tokens]
    assert [got[i] for i in order] == want
    assert len(set(got)) > 1


def test_generate_until_cuts_each_text_at_its_first_stop_string(dense: CoreInferLM, tiny_torch_model) -> None:
    """Stop strings the model does write, taken from its own greedy text (Transformers): each
    text must end just before the first one's first occurrence."""
    model, tok = tiny_torch_model("llama"), dense.tokenizer
    args, wants = [], []
    for prompt in GEN_PROMPTS:
        ids = tok.encode(prompt)
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        text = tok.decode(new, skip_special_tokens=True)
        # Two characters from its second half (a random model writes parts of characters too).
        start = next(i for i in range(len(text) // 2, len(text) - 1) if "\ufffd" not in text[i: i + 2])
        stop = text[start: start + 2]
        assert text.index(stop) > 0
        args.append((prompt, {"until": ["never written", stop], "max_gen_toks": 8, "do_sample": False}))
        wants.append(text[: text.index(stop)])
    assert dense.generate_until(requests("generate_until", args), disable_tqdm=True) == wants


def test_a_context_starting_with_bos_gets_no_second(dense: CoreInferLM) -> None:
    # A tokenizer that adds a BOS, as Gemma's and Llama's do (the tiny model's adds none).
    tok = build_tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    lm = copy.copy(dense)
    lm.tokenizer = tok
    plain = tok.encode("Hi there", add_special_tokens=False)
    assert lm.tok_encode("Hi there") == [1, *plain]
    assert lm.tok_encode("<s>Hi there") == [1, *plain]


def test_each_sampled_batch_takes_its_index_as_seed(dense: CoreInferLM) -> None:
    """Five copies of one request in batches of four: the fifth is sampled in batch 1 (seed 1),
    so it is not a copy of the first's sample, as repeated samples (pass@k) need."""
    kwargs = {"until": ["\n"], "max_gen_toks": 7, "do_sample": True, "temperature": 0.8, "top_k": 20}
    got = dense.generate_until(requests("generate_until", [(GEN_PROMPTS[0], kwargs)] * 5), disable_tqdm=True)
    ids = dense.tok_encode(GEN_PROMPTS[0])
    want = [dense.tokenizer.decode(dense.gen.generate_ids([ids] * 4, 7, make_method("dense"),
                                                          Sampling(temperature=0.8, top_k=20), seed=seed).tokens[0],
                                   skip_special_tokens=True).split("\n")[0] for seed in (0, 1)]
    assert want[0] != want[1]
    assert got[0] == want[0] and got[4] == want[1]


def test_a_long_generation_prompt_keeps_room_for_its_tokens(dense: CoreInferLM, tiny_torch_model, caplog) -> None:
    model, tok = tiny_torch_model("llama"), dense.tokenizer
    prompt = LONG_TEXT
    kwargs = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    ids = dense.tok_encode(prompt)
    assert len(ids) > dense.max_length
    with caplog.at_level(logging.WARNING, logger="coreinfer_jax.evaluation.lm_eval_adapter"):
        [text] = dense.generate_until(requests("generate_until", [(prompt, kwargs)]), disable_tqdm=True)
    assert "1 generate_until request(s) left-truncated" in caplog.text
    kept = ids[-(dense.max_length - 6):]  # the prompt's last tokens, leaving room for the 6 new ones
    with torch.no_grad():
        out = model.generate(torch.tensor([kept]), max_new_tokens=6, do_sample=False)
    assert text == tok.decode(out[0, len(kept):], skip_special_tokens=True).split("\n")[0]


@pytest.mark.parametrize("kwargs", [{"do_sample": True, "temperature": 0.0}, {"do_sample": True}])
def test_sampling_at_temperature_zero_is_an_error_as_with_transformers(dense: CoreInferLM, tiny_torch_model,
                                                                       kwargs: dict) -> None:
    with pytest.raises(CoreInferError, match="do_sample=True needs a temperature > 0, got 0.0"):
        dense.generate_until(requests("generate_until", [("Hi", {"until": ["."], **kwargs})]), disable_tqdm=True)
    # lm-eval's hf model hands the same request (a missing temperature as 0.0) to Transformers, which refuses it.
    with pytest.raises(ValueError, match="strictly positive float"):
        tiny_torch_model("llama").generate(torch.tensor([[5, 6]]), max_new_tokens=2, do_sample=True, temperature=0.0)


def write_tasks(root: Path, gen_targets: list[str]) -> None:
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (root / "gen.jsonl").write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n"
                                            for p, t in zip(GEN_PROMPTS, gen_targets)))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (root / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        f"generation_kwargs: {json.dumps(GEN_KWARGS)}\nmetric_list:\n  - metric: exact_match\n")


def expected_acc(lm: CoreInferLM) -> tuple[float, list[list[float]]]:
    scores = [[v for v, _ in lm.loglikelihood(requests("loglikelihood", [(d["question"], " " + c)
                                                                          for c in d["choices"]]),
                                              disable_tqdm=True)] for d in MC_DOCS]
    return float(np.mean([np.argmax(s) == d["answer"] for s, d in zip(scores, MC_DOCS)])), scores


def test_simple_evaluate_end_to_end(ckpt: Path, sparse: CoreInferLM, tmp_path: Path) -> None:
    outputs = sparse.generate_until(requests("generate_until", [(p, GEN_KWARGS) for p in GEN_PROMPTS]),
                                    disable_tqdm=True)
    targets = outputs[:2] + ["no such answer", "nor this"]  # exact match is 0.5 if the run is faithful
    write_tasks(tmp_path, targets)
    acc, scores = expected_acc(sparse)

    results = lm_eval.simple_evaluate(
        model="coreinfer_jax", model_args=dict(SPARSE_ARGS, checkpoint=str(ckpt)), tasks=["tiny_mc", "tiny_gen"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), bootstrap_iters=0)

    samples = sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    np.testing.assert_allclose([[r[0][0] for r in s["resps"]] for s in samples], scores, atol=1e-5)
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc)
    gen = sorted(results["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in gen] == outputs
    assert results["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(0.5)


def test_cli(ckpt: Path, dense: CoreInferLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's own CLI finds the registered model (its default --batch_size=1 does not clash)."""
    write_tasks(tmp_path, ["x"] * len(GEN_PROMPTS))
    acc, _ = expected_acc(dense)
    monkeypatch.setattr(sys, "argv", [
        "lm-eval", "run", "--model", "coreinfer_jax", "--model_args", f"checkpoint={ckpt},batch_size=4",
        "--tasks", "tiny_mc", "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")])
    cli_evaluate()
    [result] = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(result.read_text())["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc)
    # `python -m coreinfer_jax.evaluation.lm_eval_adapter ARGS` is that same CLI.
    done = subprocess.run([sys.executable, "-m", "coreinfer_jax.evaluation.lm_eval_adapter", "run", "--help"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert done.returncode == 0 and "--model_args" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("args, message", [
    ("temperature=0.5", "unknown coreinfer_jax model arg"),
    ("method=stability,keep=1.5", r"keep must be in \(0, 1\]"),
    ("keep=0.5", "only apply to sparse methods"),
    ("method=magic", "unknown method 'magic'"),
    ("batch_size=two", "batch_size must be a number"),
    ("batch_size=0", "must be >= 1"),
    ("batch_size=2.5", "batch_size must be an integer"),
    ("dtype=int8", "dtype must be one of"),
    ("method=stability,layers=6", "START:END"),
    ("method=stability,layers=0:9", "outside the model's 2 layers"),
    ("method=similarity", "needs a calibration"),  # `calibration` reaches make_method
    ("method=stability,calibration=/nowhere", "only used by the similarity method"),
    ("method=stability,compensate=maybe", "compensate must be true or false"),
    ("compensate=true", "compensate applies to the stability and hybrid methods"),
    ("method=stability,rest=sketch", "rest applies to the hybrid method"),
    ("method=hybrid,rest=mean", "rest must be one of zero, sketch"),
    ("method=stability,shards=2", "unknown coreinfer_jax model arg"),
])
def test_bad_model_args(ckpt: Path, args: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CoreInferLM.create_from_arg_string(f"checkpoint={ckpt},{args}")


def test_harness_args_chat_template_and_bad_requests(ckpt: Path, dense: CoreInferLM) -> None:
    assert CoreInferLM.create_from_arg_string(f"checkpoint={ckpt}", {"batch_size": "5", "device": None}).batch_size == 5
    assert CoreInferLM.create_from_arg_string(f"checkpoint={ckpt},batch_size=2", {"batch_size": 1}).batch_size == 2
    with pytest.raises(ValueError, match="auto is not supported"):
        CoreInferLM.create_from_arg_string(f"checkpoint={ckpt}", {"batch_size": "auto"})
    assert dense.apply_chat_template([{"role": "user", "content": "Hi"}]) == "<s>user\nHi</s>\n<s>assistant\n"
    with pytest.raises(NotImplementedError, match="coreinfer_jax eval --task wikitext"):
        dense.loglikelihood_rolling(requests("loglikelihood_rolling", [("some text",)]))
    with pytest.raises(ValueError, match="num_beams"):
        dense.generate_until(requests("generate_until", [("Hi", {"until": ["."], "num_beams": 4})]))
