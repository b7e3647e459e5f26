"""Evaluation: metrics on hand-made examples, teacher-forced sparse scoring against
Transformers, and `python -m coreinfer_jax eval` end to end on small files the tests write."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch

from coreinfer_jax import Dense, Generator, Stability
from coreinfer_jax.tools.cli import main
from coreinfer_jax.evaluation.data import DataError, SquadItem, TruthfulQAItem, load_squad, load_truthfulqa
from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.evaluation.evaluate import (EvalResult, Settings, evaluate, markdown, paired, relative_to_dense,
                                               squad, truthfulqa, wikitext, wikitext_windows, within_loss)
from coreinfer_jax.evaluation.tasks import QA_PRIMER, format_prompt
from coreinfer_jax.evaluation.metrics import bleu, exact_match, f1_score, normalize_answer, perplexity, rouge_l, truthfulqa_scores
from eval_files import write_squad, write_truthfulqa


def test_squad_normalisation_exact_match_and_f1() -> None:
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear and the plum") == "apple pear and plum"
    assert exact_match("the Eiffel Tower.", ["Eiffel Tower", "Paris"]) == 1.0
    assert exact_match("Paris", ["Eiffel Tower", "paris"]) == 1.0  # any gold answer
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    # pred tokens {big, red, dog}, gold {red, dog}: P = 2/3, R = 1, F1 = 0.8
    assert f1_score("the big red dog", ["red dog"]) == pytest.approx(0.8)
    assert f1_score("the big red dog", ["cat", "a red dog"]) == pytest.approx(0.8)  # max over golds
    assert f1_score("nothing here", ["red dog"]) == 0.0
    assert f1_score("the", ["a"]) == 1.0  # both normalise to empty: the official script's rule


def test_bleu_tokenizes_punctuation_as_truthfulqa_does() -> None:
    # International tokenizer: "it ' s red" vs "it ' s blue". Matches 3/4 unigrams, 2/3 bigrams,
    # 1/2 trigrams, 0/1 4-grams (exponential smoothing: 1 / (2 * 1)); equal lengths, no brevity
    # penalty. Sacrebleu's default tokenizer keeps "it's" whole: no trigram at all, and a score of 0.
    assert bleu("it's red", "it's blue") == pytest.approx((75 * (200 / 3) * 50 * 50) ** 0.25)


def test_rouge_l_reads_sentences_split_at_a_spaced_period() -> None:
    # One sentence each way round: the longest common subsequence is 2 of 4 tokens. Summary-level
    # (rougeLsum, TruthfulQA's "rougeL"), each reference sentence is found whole: 4 of 4.
    assert rouge_l("dogs bark . cats sleep", "cats sleep . dogs bark") == pytest.approx(1.0)
    assert rouge_l("dogs bark, cats sleep", "cats sleep, dogs bark") == pytest.approx(0.5)


def test_bleu_and_rouge_wiring() -> None:
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    assert bleu("completely different words here", "the cat sat on the mat") < 10
    # LCS("the cat sat down", "the sat down quickly") = "the sat down": P = R = 3/4
    assert rouge_l("the cat sat down", "the sat down quickly") == pytest.approx(0.75)
    right = truthfulqa_scores("Nothing in particular happens", ["Nothing happens", "Nothing in particular happens"],
                              ["You die", "You get sick"])
    assert right["rougeL_max"] == pytest.approx(1.0) and right["rougeL_acc"] == 1.0 and right["rougeL_diff"] > 0
    assert right["bleu_max"] == pytest.approx(100.0) and right["bleu_acc"] == 1.0
    wrong = truthfulqa_scores("You die.", ["Nothing happens"], ["You die", "You get sick"])
    assert wrong["rougeL_acc"] == 0.0 and wrong["bleu_acc"] == 0.0
    # max true 0 (no word shared) minus max false 1 ("you die" whole; "you get sick" would give 0.4)
    assert wrong["rougeL_diff"] == pytest.approx(-1.0)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny_checkpoint) -> None:
    """All-zero weights give zero logits, i.e. probability 1/V for every token, dense or sparse."""
    gen = Generator.load(tiny_checkpoint("llama"))
    zero = Generator(gen.cfg, jax.tree.map(lambda x: x * 0, gen.params), gen.tokenizer)
    rng = np.random.default_rng(0)
    windows = [(rng.integers(0, 300, 20).tolist(), rng.integers(0, 300, 11).tolist()) for _ in range(3)]
    for method in (Dense(), Stability(keep=0.5)):
        metrics, rows = wikitext(zero, windows, method, Settings(batch_size=2))
        assert metrics["perplexity"] == pytest.approx(gen.cfg.vocab_size, rel=1e-5)
        assert metrics["tokens"] == 33 and [r["tokens"] for r in rows] == [11, 11, 11]
    assert perplexity(3 * math.log(7), 3) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="zero tokens"):
        perplexity(0.0, 0)


@pytest.mark.parametrize("name", ["llama", "opt_350m_like"])
def test_dense_scores_equal_transformers(name, tiny_checkpoint, tiny_torch_model) -> None:
    gen = Generator.load(tiny_checkpoint(name))
    model = tiny_torch_model(name)
    contexts = [[5, 17, 33, 100, 2, 9, 41], [7, 8, 9]]
    continuations = [[11, 12, 13, 14], [50, 60, 70, 80, 90, 100]]
    for (lp, greedy), ctx, cont in zip(gen.score_ids(contexts, continuations), contexts, continuations):
        with torch.no_grad():
            logits = model(torch.tensor([ctx + cont])).logits[0].double()
        want = torch.log_softmax(logits, -1)[len(ctx) - 1: -1]
        np.testing.assert_allclose(lp, want[torch.arange(len(cont)), cont].numpy(), atol=1e-4)
        np.testing.assert_array_equal(greedy, (want.argmax(-1) == torch.tensor(cont)).numpy())


def test_scoring_is_teacher_forced_sparse_decoding(tiny_checkpoint) -> None:
    """The chunk scores each token with the logits sparse generation would have produced."""
    gen = Generator.load(tiny_checkpoint("llama"))
    method = Stability(keep=0.5, layers=(1, 2))
    prompt = gen.encode("The quick brown fox jumps over")[0]
    out = gen.generate_ids([prompt], 10, method=method, stop_at_eos=False, return_logits=True)
    (lp, greedy), = gen.score_ids([prompt], out.tokens, method)
    want = jax.nn.log_softmax(out.logits[0], -1)[np.arange(10), out.tokens[0]]
    np.testing.assert_allclose(lp, want, atol=1e-4)
    assert greedy.all()


def test_keep_one_perplexity_equals_dense_and_smaller_keep_differs(tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    rng = np.random.default_rng(1)
    windows = [(rng.integers(0, 300, 24).tolist(), rng.integers(0, 300, 16).tolist()) for _ in range(4)]
    dense, _ = wikitext(gen, windows, Dense())
    full, _ = wikitext(gen, windows, Stability(keep=1.0, layers=(0, 2)))
    half, _ = wikitext(gen, windows, Stability(keep=0.5, layers=(0, 2)))
    assert full["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-5)
    assert abs(half["perplexity"] - dense["perplexity"]) > 1e-3 * dense["perplexity"]


def test_offloaded_scoring_equals_on_device(tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint("llama")
    method = Stability(keep=0.5, layers=(1, 2))
    args = ([[5, 17, 33, 100, 2, 9]], [[11, 12, 13, 14, 15]], method)
    (on, _), = Generator.load(ckpt).score_ids(*args)
    (off, _), = Generator.load(ckpt, offload=True).score_ids(*args)
    np.testing.assert_allclose(on, off, atol=1e-5)


def test_loaders_read_the_official_layouts(tmp_path: Path) -> None:
    tqa = load_truthfulqa(write_truthfulqa(tmp_path / "tqa.csv"))
    assert len(tqa) == 3 and tqa[1].correct == ("Paris.", "The capital is Paris.", "I have no comment.")
    assert tqa[1].incorrect == ("London.", "Berlin.")
    sq = load_squad(write_squad(tmp_path / "squad.json"))
    assert [s.id for s in sq] == ["a", "b", "c"] and sq[1].answers == () and sq[0].answers == ("on the mat",)
    with pytest.raises(DataError, match="does not exist"):
        load_squad(tmp_path / "missing.json")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not a TruthfulQA CSV"):
        load_truthfulqa(tmp_path / "bad.csv")
    (tmp_path / "bad.json").write_text("{\"data\": 3}")
    with pytest.raises(DataError, match="not SQuAD v2 JSON"):
        load_squad(tmp_path / "bad.json")


def test_truthfulqa_answers_drop_the_empty_parts_of_their_lists(tmp_path: Path) -> None:
    # 31 of the 600 rows of the real TruthfulQA.csv in ../shared/data have an empty part
    # (a doubled or trailing "; "): no empty string may become a reference answer. Each answer
    # ends with one period, as TruthfulQA's scorer closes them.
    path = tmp_path / "tqa.csv"
    path.write_text("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
                    "Adversarial,Misc,What is the capital of France?,Paris,Paris; ; The capital is Paris.;,London;,x\n")
    (item,) = load_truthfulqa(path)
    assert item.correct == ("Paris.", "The capital is Paris.", "I have no comment.")
    assert item.incorrect == ("London.",)


def test_squad_gold_answers_that_normalise_to_nothing_are_dropped(tmp_path: Path) -> None:
    # The official v2 script scores only golds with words left after normalisation, and a
    # question with none of those as unanswerable.
    qas = [{"id": "a", "question": "q", "answers": [{"text": "The", "answer_start": 0},
                                                     {"text": "the mat", "answer_start": 0}]},
           {"id": "b", "question": "q", "answers": [{"text": "a.", "answer_start": 0}]}]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": [
        {"context": "The mat.", "qas": qas}]}]}))
    assert [item.answers for item in load_squad(path)] == [("the mat",), ()]


class AnsweringGenerator:
    """Stands in for a Generator: records the prompts it is given and answers each with `answer`."""

    def __init__(self, answer: str) -> None:
        self.prompts, self.answer, self.one_line = [], answer, []

    def generate(self, prompts: list[str], *args, stop_at_newline: bool = False, **kwargs) -> SimpleNamespace:
        self.prompts += prompts
        self.one_line.append(stop_at_newline)
        return SimpleNamespace(texts=[self.answer for _ in prompts])


def test_truthfulqa_asks_with_and_without_the_primer_and_scores_the_stripped_answer() -> None:
    item = TruthfulQAItem("Can pigs fly?", "No.", ("No.", "I have no comment."), ("Yes.",))
    gen = AnsweringGenerator(" No. ")
    for few_shot in (True, False):
        metrics, (record,) = truthfulqa(gen, [item], Dense(), Settings(few_shot=few_shot))
        assert record["answer"] == "No." and metrics["rougeL_max"] == pytest.approx(1.0)
    few, zero = gen.prompts
    assert zero == "Q: Can pigs fly?\nA:" and few == QA_PRIMER + "\n\n" + zero
    assert gen.one_line == [True, True]


def test_squad_asks_for_a_one_line_answer_and_scores_it_stripped() -> None:
    gen = AnsweringGenerator(" Brazil ")
    metrics, (record,) = squad(gen, [SquadItem("a", "The Amazon is in Brazil.", "Where?", ("Brazil",))], Dense())
    assert record["answer"] == "Brazil" and metrics == {"exact_match": 1.0, "f1": 1.0} and gen.one_line == [True]


def test_eval_cli_json_rows_match_their_records(tiny_checkpoint, tmp_path: Path, capsys) -> None:
    ckpt = str(tiny_checkpoint("llama"))
    data = write_truthfulqa(tmp_path / "tqa.csv")
    records = tmp_path / "new" / "records.jsonl"  # its directory is created
    assert main(["eval", "--task", "truthfulqa", "--data", str(data), "--checkpoint", ckpt, "--keep", "0.5", "1.0",
                 "--layers", "1:2", "--batch-size", "2", "--zero-shot", "--records", str(records), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["task"], r["method"], r["keep"], r["n"]) for r in rows] == [
        ("truthfulqa", "dense", 1.0, 3), ("truthfulqa", "stability", 0.5, 3), ("truthfulqa", "stability", 1.0, 3)]
    assert rows[1]["layers"] == [1, 2] and rows[1]["token_keep"] == 0.2
    recs = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(recs) == 9
    for row in rows:
        mine = [r for r in recs if r["method"] == row["method"] and r["keep"] == row["keep"]]
        for name, value in row["metrics"].items():
            assert value == pytest.approx(np.mean([r[name] for r in mine]))
        for r in mine:  # each record's scores follow from its answer
            item = next(i for i in load_truthfulqa(data) if i.question == r["question"])
            assert truthfulqa_scores(r["answer"], item.correct, item.incorrect)["rougeL_max"] == r["rougeL_max"]
    # keep 1.0 keeps every neuron: the answers are the dense ones
    assert [r["answer"] for r in recs[:3]] == [r["answer"] for r in recs[6:]]


def test_eval_squad_scores_answerable_questions_only(tiny_checkpoint, tmp_path: Path) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    records: list = []
    (result,) = evaluate(gen, "squad", [Dense()], write_squad(tmp_path / "s.json"), settings=Settings(few_shot=False),
                         records=records)
    assert result.n == 2 and result.metrics["skipped_unanswerable"] == 1
    assert [r["id"] for r in records] == ["a", "c"]
    assert result.metrics["f1"] == pytest.approx(np.mean([r["f1"] for r in records]))


def test_wikitext_windows_are_consecutive_and_do_not_overlap() -> None:
    class Counting:  # stands in for a Generator: its tokenizer gives each word its position as id
        def tokenizer(self, text, add_special_tokens):
            return {"input_ids": list(range(len(text.split())))}

    text = " ".join("w" * 12)
    assert wikitext_windows(Counting(), text, context=3, scored=2) == [([0, 1, 2], [3, 4]), ([5, 6, 7], [8, 9])]
    assert wikitext_windows(Counting(), text, context=3, scored=2, limit=1) == [([0, 1, 2], [3, 4])]
    with pytest.raises(CoreInferError, match="text has 12 tokens, fewer than one window of 13"):
        wikitext_windows(Counting(), text, context=10, scored=3)


def test_eval_wikitext_windows_and_markdown(tiny_checkpoint, tmp_path: Path, capsys) -> None:
    text = tmp_path / "wiki.txt"
    text.write_text(" = Cats = \n\n The cat sat on the mat . It is black and it sleeps all day long . \n" * 40)
    assert main(["eval", "--task", "wikitext", "--data", str(text), "--checkpoint", str(tiny_checkpoint("llama")),
                 "--keep", "1.0", "--layers", "0:2", "--limit", "3", "--context-tokens", "40",
                 "--scored-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "| wikitext | dense | 1 | 3 |" in out and "| wikitext | stability | 1 | 3 |" in out
    assert "100.0% |" in out  # keep 1.0 perplexity equals dense
    assert "smallest keep within 5% of dense perplexity: 1" in out


def test_loss_rule_and_relative_column() -> None:
    rows = [EvalResult("squad", "dense", 1.0, 10, {"f1": 0.50}), EvalResult("squad", "stability", 0.4, 10, {"f1": 0.40}),
            EvalResult("squad", "stability", 0.6, 10, {"f1": 0.48})]
    assert relative_to_dense(rows) == pytest.approx([1.0, 0.8, 0.96])
    assert within_loss(rows) == 0.6
    ppl = [EvalResult("wikitext", "dense", 1.0, 5, {"perplexity": 20.0}),
           EvalResult("wikitext", "stability", 0.6, 5, {"perplexity": 20.9})]
    assert within_loss(ppl) == 0.6 and "104.5%" in markdown(ppl)


def test_a_dense_metric_of_zero_or_no_dense_row() -> None:
    zero = [EvalResult("squad", "dense", 1.0, 3, {"f1": 0.0}), EvalResult("squad", "stability", 0.4, 3, {"f1": 0.0}),
            EvalResult("squad", "stability", 0.6, 3, {"f1": 0.2})]
    assert within_loss(zero) == 0.4  # equal to dense: nothing lost
    table = markdown(zero)
    assert table.count("| n/a (dense 0) |") == 3
    assert "smallest keep within 5% of dense f1: 0.4 (dense f1 is 0" in table
    fell = [EvalResult("squad", "dense", 1.0, 3, {"f1": 0.5}), EvalResult("squad", "stability", 0.4, 3, {"f1": 0.0})]
    assert within_loss(fell) is None and "within 5% of dense f1: none\n" in markdown(fell) + "\n"
    alone = [EvalResult("squad", "stability", 0.4, 3, {"f1": 0.4})]
    assert "within 5% of dense f1: n/a (no dense row)" in markdown(alone)


def test_eval_with_nothing_to_score_or_a_row_twice_is_one_clear_line(tiny_checkpoint, tmp_path: Path,
                                                                     capsys) -> None:
    squad = json.loads(write_squad(tmp_path / "s.json").read_text())
    for qa in squad["data"][0]["paragraphs"][0]["qas"]:
        qa["answers"] = []
    (tmp_path / "s.json").write_text(json.dumps(squad))
    argv = ["eval", "--checkpoint", str(tiny_checkpoint("llama")), "--zero-shot", "--keep", "0.5"]
    assert main(argv + ["--task", "squad", "--data", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert f"error: no squad example to score in {tmp_path / 's.json'} (3 unanswerable questions are not scored)" \
        in err and "Traceback" not in err
    assert main(argv + ["0.5", "--task", "truthfulqa", "--data", str(write_truthfulqa(tmp_path / "t.csv"))]) == 2
    assert "error: row 'stability keep 0.5' is given twice" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--keep", "1.5"], "keep must be in (0, 1]"),
    (["--method", "nope"], "invalid choice"),
    (["--limit", "0"], "limit must be >= 1"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--data", "/no/such/file.csv"], "evaluation data file /no/such/file.csv does not exist"),
])
def test_eval_bad_input_is_one_clear_line(args, message, tiny_checkpoint, tmp_path: Path, capsys) -> None:
    argv = ["eval", "--task", "truthfulqa", "--zero-shot", "--checkpoint", str(tiny_checkpoint("llama"))]
    if "--data" not in args:
        argv += ["--data", str(write_truthfulqa(tmp_path / "t.csv"))]
    try:
        code = main(argv + args)
    except SystemExit as e:  # argparse rejects unknown choices itself
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_rows_name_shard_local_and_batch_shared_selection() -> None:
    rows = [EvalResult("wikitext", "dense", 1.0, 5, {"perplexity": 20.0}),
            EvalResult("wikitext", "stability", 0.4, 5, {"perplexity": 40.0}, rule="normalized_magnitude", shards=4),
            EvalResult("wikitext", "stability", 0.4, 5, {"perplexity": 41.0}, share="batch")]
    table = markdown(rows)
    assert "| stability normalized_magnitude 4 shards | 0.4 |" in table
    assert "| stability shared | 0.4 |" in table


def test_task_templates_by_hand() -> None:
    # The similarity method's prompt, as its calibration sentences begin ("Question:q Answer:a").
    assert format_prompt("question", "Why is the sky blue?") == "Question:Why is the sky blue?Answer:"
    qa = format_prompt("qa", "Why is the sky blue?")
    assert qa.startswith("Q: What is human life expectancy in the United States?\n")  # the six-shot primer
    assert qa.endswith("The 1992 Olympics were held in Barcelona, Spain.\n\nQ: Why is the sky blue?\nA:")
    assert format_prompt("none", "text") == "text"
    with pytest.raises(CoreInferError, match="unknown task 'poem'"):
        format_prompt("poem", "text")


def test_paired_differences_by_hand() -> None:
    # d = [0, 1, 2, 3]: mean 1.5, sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, se = sqrt(5/3) / 2.
    mean, se = paired([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0])
    assert (mean, se) == (1.5, pytest.approx(math.sqrt(5 / 3) / 2))
    assert paired([0.5], [0.25]) == (0.25, None)  # one example has no spread
