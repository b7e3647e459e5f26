"""Stop strings inside the decode loop (`runtime.stop_strings`).

The table is checked against the tokenizer itself: after each token of a sequence, the row is
MATCHED exactly when `tokenizer.decode` of the tokens so far contains a stop string. Decoding
with stop strings must give each row a prefix of its tokens without them, ending at the
first token whose text completes a stop string, and the same cut text.
"""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import SENTENCES

from coreinfer_jax import Dense, Generator, Stability
from coreinfer_jax.errors import InputError
from coreinfer_jax.runtime import batching, stop_strings
from coreinfer_jax.runtime.stop_strings import stop_table

# HumanEval's, a leading space, and overlapping ones ("aa" inside "aab", "abab" restarting
# after "aba"), so that the automaton's fallbacks are exercised.
STOPS = ["\ndef", "\nclass", "\nif", "\nprint", "\n#", "\n```", " th", "aab", "abab", "e.\n"]


def walk(table, tokens: list[int]) -> list[bool]:
    """Whether the row is MATCHED after each token, by reading the table."""
    state, seen = 0, []
    for t in tokens:
        state = int(table[state, t])
        seen.append(state == table.shape[0] - 1)
    return seen


def contains(tokenizer, tokens: list[int], stops: list[str]) -> list[bool]:
    """Whether the decoded text of each prefix contains a stop string: the tokenizer's own answer."""
    texts = [tokenizer.decode(tokens[: i + 1], skip_special_tokens=True) for i in range(len(tokens))]
    return [any(s in text for s in stops) for text in texts]


def sequences(tokenizer, stops: list[str], count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Random token sequences, half of their tokens drawn from pieces of the stop strings and
    tokens holding newlines, so that matches (and near misses) are common."""
    rng = random.Random(seed)
    vocab = tokenizer.get_vocab()
    decoded = {v: tokenizer.decode([v]) for v in vocab.values()}
    near = [v for v, text in decoded.items()
            if text and ("\n" in text or any(text in s or s[:2] in text for s in stops))]
    ids = sorted(vocab.values())
    return [[rng.choice(near) if rng.random() < 0.5 else rng.choice(ids) for _ in range(length)]
            for _ in range(count)]


def check_table_reads_as_the_tokenizer_decodes(tokenizer, vocab_size: int, count: int) -> None:
    table = stop_table(tokenizer, STOPS, vocab_size)
    assert table.shape[1] == vocab_size
    hits = 0
    for tokens in sequences(tokenizer, STOPS, count, 40):
        want = contains(tokenizer, tokens, STOPS)
        assert walk(table, tokens) == want, tokenizer.decode(tokens)
        hits += want[-1]
    assert 0 < hits < count  # both outcomes occur


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE ("▁" for spaces) whose decoder drops the first token's leading
    space, as Llama 2's does: a text's first token reads differently from the same token inside."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(SENTENCES + ["def f():\n    # the end\nif x:\n    print(x)\nclass A"],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_the_table_reads_texts_as_the_tokenizer_decodes_them(tiny_tokenizer) -> None:
    # Ids past the tokenizer (a padded embedding) read as nothing.
    check_table_reads_as_the_tokenizer_decodes(tiny_tokenizer, len(tiny_tokenizer) + 5, count=300)
    tok = metaspace_tokenizer()
    assert tok.decode(tok(" the cat")["input_ids"]) == "the cat"  # the first space is dropped
    check_table_reads_as_the_tokenizer_decodes(tok, len(tok), count=300)
    # " th" is not in a text that starts with "▁the", and is once another token comes first.
    the, world = tok.convert_tokens_to_ids(["▁the", "▁world"])
    table = stop_table(tok, STOPS, len(tok))
    assert walk(table, [the]) == contains(tok, [the], STOPS) == [False]
    assert walk(table, [world, the]) == contains(tok, [world, the], STOPS) == [False, True]


@pytest.mark.slow
def test_the_table_reads_texts_as_smollm2_decodes_them(smollm2_checkpoint) -> None:
    gen = Generator.load(smollm2_checkpoint)
    check_table_reads_as_the_tokenizer_decodes(gen.tokenizer, gen.cfg.vocab_size, count=100)


def test_a_token_holding_a_whole_stop_string_matches_at_once(tiny_tokenizer) -> None:
    table = stop_table(tiny_tokenizer, ["the"], len(tiny_tokenizer))
    the = tiny_tokenizer(" the", add_special_tokens=False)["input_ids"]
    assert len(the) == 1  # " the" is one token of the tiny vocabulary
    assert walk(table, the) == [True]
    # MATCHED is kept whatever follows.
    assert walk(table, the + tiny_tokenizer(" cat sat", add_special_tokens=False)["input_ids"])[-1]


def test_bad_stop_strings_are_one_clear_error(tiny_tokenizer) -> None:
    with pytest.raises(InputError, match="non-empty"):
        stop_table(tiny_tokenizer, ["\ndef", ""], len(tiny_tokenizer))
    with pytest.raises(InputError, match="non-empty"):
        stop_table(tiny_tokenizer, [], len(tiny_tokenizer))
    with pytest.raises(InputError, match="U\\+FFFD"):
        stop_table(tiny_tokenizer, ["\ufffd"], len(tiny_tokenizer))


def first_stop(tokenizer, tokens: list[int], stops: list[str]) -> int:
    """How many tokens a row keeps: up to the first whose text completes a stop string."""
    return next((i + 1 for i, hit in enumerate(contains(tokenizer, tokens, stops)) if hit), len(tokens))


def cut(text: str, stops: list[str]) -> str:
    positions = [text.index(s) for s in stops if s in text]
    return text[: min(positions)] if positions else text


def word(tokenizer, tokens: list[int], start: int) -> str:
    """The text of the first token from `start` on that is ASCII letters or digits."""
    texts = [tokenizer.decode([t]) for t in tokens[start:]]
    return next(t for t in texts if t.isascii() and t.strip().isalnum())


def test_a_text_is_cut_at_the_earliest_of_its_stop_strings() -> None:
    assert stop_strings.cut("x = 1\ndef f():\n# end", ["\n#", "\ndef"]) == "x = 1"
    assert stop_strings.cut("x = 1", ["\n#"]) == "x = 1"


@pytest.mark.parametrize("method", [Dense(), Stability(keep=0.5)], ids=["dense", "stability"])
def test_decoding_stops_at_the_first_stop_string_of_each_row(tiny_checkpoint, monkeypatch, method) -> None:
    # 16-slot first window: the stops below fall in later segments of a growing cache too.
    monkeypatch.setattr(batching, "MIN_WINDOW", 16)
    gen = Generator.load(tiny_checkpoint("llama"))
    prompts = ["The cat sat on the mat.", "Rain is expected", "The computer program printed hello"]
    full = gen.generate(prompts, max_new_tokens=60, method=method, stop_at_eos=False)
    # Stop strings taken from the rows' own tokens, so that they occur: early in row 0, late in
    # row 1 (past the first two windows), and one that no row holds. The random model also
    # writes stray bytes, so these are tokens of ASCII letters and digits.
    stops = [word(gen.tokenizer, full.tokens[0], 3), word(gen.tokenizer, full.tokens[1], 40), "\n#zz"]
    out = gen.generate(prompts, max_new_tokens=60, method=method, stop_at_eos=False, stop_strings=stops)
    for tokens, stopped, text, got in zip(full.tokens, out.tokens, full.texts, out.texts):
        keep = first_stop(gen.tokenizer, tokens, stops)
        assert stopped == tokens[:keep]
        assert got == cut(text, stops)
    assert len(out.tokens[0]) < 60 and len(out.tokens[1]) < 60
    # The batch ends when its last row does.
    assert out.decode_steps == max(len(t) for t in out.tokens) - 1


def test_a_first_token_completing_a_stop_string_decodes_nothing_more(tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    prompts = ["The cat", "The cat sat on the mat."]
    full = gen.generate(prompts, max_new_tokens=30, stop_at_eos=False)
    first = [gen.tokenizer.decode(t[:1], skip_special_tokens=True) for t in full.tokens]
    assert all(t.isascii() and t.strip() for t in first)
    out = gen.generate(prompts, max_new_tokens=30, stop_at_eos=False, stop_strings=first)
    # Each row's first token completes a stop string: nothing is decoded after pre-fill.
    assert [len(t) for t in out.tokens] == [1, 1] and out.decode_steps == 0
    assert out.texts == ["", ""]
    # One string is one stop string, not its characters.
    assert gen.generate(["The cat"], max_new_tokens=30, stop_at_eos=False, stop_strings=first[0] + "zz").tokens == \
        full.tokens[:1]
