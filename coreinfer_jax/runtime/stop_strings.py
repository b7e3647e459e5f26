"""Stop strings checked inside the decode loop, one token at a time.

A row should end as soon as its text contains a stop string (HumanEval's "\\ndef", a chat
format's closing code fence), but the loop sees token ids, and a stop string may span tokens
("\\n" then "def") or sit inside one ("):\\n#"). So the host builds, once per tokenizer and
set of stop strings, a table `[S, V]`: the state of a string-matching automaton after reading
token v's text from state s. A state is the longest end of the text so far that begins a stop
string (a trie node); the last row is MATCHED, which every state reaches once the text
contains a stop string and never leaves. The loop carries one state per row, starting at
row 0 (the start of a text), and ends the row when it reaches MATCHED.

Only stopping is decided here: the caller still cuts the decoded text at its first stop
string, so a row that stops early has the same cut text as one decoded to its cap. A token's
text is what it adds after another token (`decode([anchor, v])` minus `decode([anchor])`),
or for a row's first token its text alone (some tokenizers drop a leading space there), so
the table's reading is the decoded text's for tokenizers that decode by concatenation
(byte-level BPE, SentencePiece); one that also cleans up spaces before punctuation
(`clean_up_tokenization_spaces`) may differ around those spaces. Special tokens add nothing,
as they are skipped when texts are decoded.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from coreinfer_jax.errors import InputError

# The table's state count is padded to a power of two at least this large, so that stop
# sets of similar size share the decode loop's compile.
MIN_STATES = 8


def _automaton(stops: Sequence[str]) -> tuple[list[str], dict[str, int], np.ndarray]:
    """States (the stop strings' proper prefixes, "" first), the characters the stop strings
    use (their columns), and the character table `int32 [states + 1, chars + 1]` whose last
    row is MATCHED and last column every other character."""
    states = sorted({s[:i] for s in stops for i in range(len(s))}, key=lambda p: (len(p), p))
    index = {p: i for i, p in enumerate(states)}
    chars = {c: i for i, c in enumerate(sorted(set("".join(stops))))}
    matched = len(states)
    table = np.zeros((len(states) + 1, len(chars) + 1), np.int32)  # a character no stop string uses: back to ""
    table[matched] = matched
    for p, s in index.items():
        for c, column in chars.items():
            text = p + c
            if any(text.endswith(stop) for stop in stops):
                table[s, column] = matched
            else:  # the longest end of `text` that begins a stop string ("" at worst)
                table[s, column] = next(index[text[i:]] for i in range(len(text) + 1) if text[i:] in index)
    return states, chars, table


def token_texts(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[str]]:
    """Each token's text as it appears inside a decoded text, and as it appears first ("" for
    special tokens and for ids the tokenizer does not have)."""
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
    head = tokenizer.decode(anchor, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    known = min(len(tokenizer), vocab_size)
    both = tokenizer.batch_decode([anchor + [v] for v in range(known)], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)
    if any(not t.startswith(head) for t in both):
        raise InputError("stop strings: this tokenizer's texts do not extend as tokens are added")
    alone = tokenizer.batch_decode([[v] for v in range(known)], skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)
    missing = [""] * (vocab_size - known)
    return [t[len(head):] for t in both] + missing, alone + missing


def _read(table: np.ndarray, chars: dict[str, int], texts: list[str], starts: np.ndarray) -> np.ndarray:
    """The state after reading each of `texts` from each of `starts`: `int32 [len(starts), len(texts)]`."""
    # Every text from every start at once, one character position at a time; only texts still
    # that long take part at position k, so the work is starts x total characters.
    lengths = np.array([len(t) for t in texts])
    codes = np.full(int(lengths.sum()), len(chars), np.int32)  # [total characters]
    flat = np.frombuffer("".join(texts).encode("utf-32-le"), np.uint32)
    for c, column in chars.items():
        codes[flat == ord(c)] = column
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    state = np.repeat(starts.astype(np.int32)[:, None], len(texts), axis=1)  # [starts, V]
    for k in range(int(lengths.max(initial=0))):
        longer = np.flatnonzero(lengths > k)
        state[:, longer] = table[state[:, longer], codes[offsets[longer] + k]]
    return state


def stop_table(tokenizer: Any, stops: Sequence[str], vocab_size: int) -> np.ndarray:
    """`int16 [S, vocab_size]` next-state table for `stops` (module docstring): row 0 is the
    start (a token read as the first of a text), then the stop strings' prefixes; MATCHED is
    `S - 1`."""
    stops = sorted(set(stops))
    if not stops or any(not s for s in stops):
        raise InputError("stop strings must be non-empty")
    if any("\ufffd" in s for s in stops):
        # What a token holding part of a character decodes to: where it appears depends on
        # where the text is cut.
        raise InputError("stop strings cannot contain U+FFFD, the replacement character")
    states, chars, table = _automaton(stops)
    inside, first = token_texts(tokenizer, vocab_size)
    matched = len(states)
    size = MIN_STATES
    while size < len(states) + 2:
        size *= 2
    if size > np.iinfo(np.int16).max:
        raise InputError(f"stop strings too long: {len(states)} prefixes (at most {np.iinfo(np.int16).max - 2})")
    # Prefix i is row i + 1 and MATCHED the last row; the rows between are never reached and keep to themselves.
    rows = np.concatenate([_read(table, chars, first, np.zeros(1, np.int32)),
                           _read(table, chars, inside, np.arange(len(states)))])  # [1 + prefixes, V]
    padded = np.repeat(np.arange(size, dtype=np.int16)[:, None], vocab_size, axis=1)
    padded[: len(states) + 1] = np.where(rows == matched, size - 1, rows + 1)
    return padded


def cut(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) its first stop string."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends)] if ends else text
