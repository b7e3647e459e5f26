"""The decode loop: segments on a growing KV cache, stop tokens, what it compiles and copies.

Decode attention reads every slot of the cache it is given, so generation runs in segments
on a cache that doubles as positions fill it (`batching.cache_windows`). The tiny models'
context (128) is below the real first window (256 slots), so these tests shrink it.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from coreinfer_jax import Dense, Generator, Stability
from coreinfer_jax.errors import InputError, MethodError
from coreinfer_jax.models.forward import cache_shape
from coreinfer_jax.runtime import batching, engine
from coreinfer_jax.runtime.batching import cache_windows, prompt_bucket, stop_ids
from coreinfer_jax.runtime.sampling import Sampling

GROW = engine.grow_cache  # the jitted program, before `small_windows` wraps it
PROMPTS = [[5, 17, 33, 100, 2, 9, 250, 41, 7, 61, 3, 90], [7, 8, 9], [11, 12, 13, 14, 15, 16, 200]]


@pytest.fixture
def small_windows(monkeypatch) -> list[int]:
    """Windows from 16 slots, and the cache lengths `grow_cache` is asked for, in order."""
    monkeypatch.setattr(batching, "MIN_WINDOW", 16)
    grown: list[int] = []

    def recording(cache, *, slots):
        grown.append(slots)
        return GROW(cache, slots=slots)

    monkeypatch.setattr(engine, "grow_cache", recording)
    return grown


def test_prompt_buckets_are_powers_of_two_from_16_within_the_context() -> None:
    assert [prompt_bucket(n, 128) for n in (1, 16, 17, 100, 128)] == [16, 16, 32, 128, 128]
    # A context that is not a power of two caps the bucket: no cache slot past the model's positions.
    assert prompt_bucket(1500, 2000) == 2000
    assert prompt_bucket(1000, 2000) == 1024


def test_cache_windows_double_from_the_first_that_fits() -> None:
    # 50-token prompt (bucket 64) + 2048 new: 2112 slots at the end (33 x 64).
    assert cache_windows(64, 50, 2048) == [256, 512, 1024, 2048, 2112]
    assert cache_windows(64, 50, 100) == [192]  # fits the first window's length: one segment
    # A 300-token prompt: its 512-slot bucket is the first window.
    assert cache_windows(512, 300, 1000) == [512, 1024, 1536]
    # A prompt filling its bucket: the first step (position 256) needs 257 slots.
    assert cache_windows(256, 256, 300) == [512, 576]


def test_segmented_decode_matches_transformers(tiny_checkpoint, tiny_torch_model, small_windows) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    out = gen.generate_ids(PROMPTS, max_new_tokens=60, stop_at_eos=False, return_logits=True)
    assert small_windows == [32, 64, 128]  # 16 slots (pre-fill's bucket), then three more segments
    assert out.decode_steps == 59
    model = tiny_torch_model("llama")
    for ids, tokens, logits in zip(PROMPTS, out.tokens, out.logits):
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=60, min_new_tokens=60, do_sample=False,
                                  pad_token_id=0, eos_token_id=None, output_logits=True,
                                  return_dict_in_generate=True)
        assert tokens == want.sequences[0, len(ids):].tolist()
        np.testing.assert_allclose(logits, torch.cat(want.logits).numpy(), atol=1e-4, rtol=0)


def test_segments_carry_the_sampling_key_and_stop_where_a_row_ends(tiny_checkpoint, small_windows,
                                                                  monkeypatch) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    kwargs = dict(max_new_tokens=60, sampling=Sampling(temperature=1.0), seed=3, stop_at_eos=False)
    row = gen.generate_ids([PROMPTS[0]], **kwargs).tokens[0]
    assert small_windows == [32, 64, 128]
    monkeypatch.setattr(batching, "MIN_WINDOW", 1024)
    assert gen.generate_ids([PROMPTS[0]], **kwargs).tokens[0] == row
    monkeypatch.setattr(batching, "MIN_WINDOW", 16)
    # Token k is chosen at position len + k - 1: stop at a token first chosen in the third
    # segment (positions 32..63, a 64-slot cache).
    n = len(PROMPTS[0])
    stop = next(t for k, t in enumerate(row) if 32 <= n + k - 1 < 64 and t not in row[:k])
    small_windows.clear()
    cut = gen.generate_ids([PROMPTS[0]], stop_tokens=[stop], **kwargs)
    assert cut.tokens[0] == row[: row.index(stop) + 1]
    assert small_windows == [32, 64]


def test_generation_stopped_early_does_not_grow_the_cache(tiny_checkpoint, small_windows) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    full = gen.generate_ids([PROMPTS[1]], max_new_tokens=60, stop_at_eos=False)
    small_windows.clear()
    stop = full.tokens[0][4]
    cut = gen.generate_ids([PROMPTS[1]], max_new_tokens=60, stop_at_eos=False, stop_tokens=[stop])
    assert cut.tokens[0] == full.tokens[0][: full.tokens[0].index(stop) + 1]
    assert small_windows == []  # stopped within the first 16 slots


def test_same_bucket_and_stop_count_bucket_do_not_recompile(tiny_checkpoint, small_windows) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[0][::-1][:9]]
    seen = {t for p in prompts for t in gen.generate_ids([p], 60, stop_at_eos=False).tokens[0]}
    unused = [t for t in range(gen.cfg.vocab_size) if t not in seen]  # stop tokens that never stop a row
    programs = engine.prefill, engine.decode, engine.resume, GROW
    sizes = [f._cache_size() for f in programs]
    small_windows.clear()
    # Prompts of other lengths in the same bucket (long enough to need all four segments),
    # with 0, 3 and 8 stop tokens.
    for prompt, stops in zip(prompts, ([], unused[:3], unused[:8])):
        gen.generate_ids([prompt], 60, stop_at_eos=False, stop_tokens=stops)
    assert [f._cache_size() for f in programs] == sizes
    assert small_windows == [32, 64, 128] * 3  # every call ran every segment


def test_stop_ids_pad_to_a_power_of_two_and_refuse_unknown_tokens() -> None:
    np.testing.assert_array_equal(stop_ids([2, 9, 2], 320), [2, 9, -1, -1, -1, -1, -1, -1])
    assert stop_ids(range(9), 320).shape == (16,) and stop_ids((), 320).shape == (8,)
    with pytest.raises(InputError, match="stop token 320 is outside the vocabulary"):
        stop_ids([5, 320], 320)


@pytest.mark.parametrize("bad", [320, 5000, -1])
def test_token_ids_outside_the_vocabulary_are_refused(tiny_checkpoint, bad) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    assert gen.cfg.vocab_size == 320
    with pytest.raises(InputError, match=rf"prompt token id {bad} is outside the vocabulary \(ids 0..319\)"):
        gen.generate_ids([[1, 2, 3], [4, bad, 6]], max_new_tokens=4)
    with pytest.raises(InputError, match=rf"context token id {bad} is outside the vocabulary"):
        gen.score_ids([[bad, 2]], [[3]])
    with pytest.raises(InputError, match=rf"continuation token id {bad} is outside the vocabulary"):
        gen.score_ids([[1, 2]], [[3, bad]])


def test_arguments_of_the_wrong_type_are_named(tiny_checkpoint) -> None:
    # Each failed inside JAX before (a cache of 64.0 slots, `jax.random.key(None)`, `Stability.validate`
    # unbound, `top_k` of 321 or 2.5 logits), or, the int8 dtype, loaded.
    gen = Generator.load(tiny_checkpoint("llama"))
    with pytest.raises(InputError, match=r"max_new_tokens must be an integer >= 1, got 2\.5"):
        gen.generate_ids([[1, 2, 3]], max_new_tokens=2.5)
    with pytest.raises(InputError, match="seed must be an integer, got None"):
        gen.generate_ids([[1, 2, 3]], max_new_tokens=2, seed=None)
    with pytest.raises(MethodError, match="method must be a decoding method such as Dense"):
        gen.generate_ids([[1, 2, 3]], max_new_tokens=2, method=Stability)
    with pytest.raises(InputError, match="top_k=321 exceeds the model's vocabulary of 320 tokens"):
        gen.generate_ids([[1, 2, 3]], max_new_tokens=2, sampling=Sampling(temperature=1.0, top_k=321))
    with pytest.raises(ValueError, match="top_k must be an integer >= 0, got 2.5"):
        Sampling(temperature=1.0, top_k=2.5)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, got 'int8'"):
        Generator.load(tiny_checkpoint("llama"), dtype="int8")  # a cast that would wreck the weights
    # One row where a batch of rows goes: a TypeError from len(1) or a comparison of str and int before.
    with pytest.raises(InputError, match=r"each prompt must be a row of token ids, got 1; several rows, e\.g\."):
        gen.generate_ids([1, 2, 3], max_new_tokens=2)
    with pytest.raises(InputError, match="prompts must be rows of token ids, e.g. \\[\\[1, 2, 3\\]\\], got 'hello'"):
        gen.generate_ids("hello", max_new_tokens=2)
    with pytest.raises(InputError, match="each context must be a row of token ids, got 1"):
        gen.score_ids([1, 2, 3], [4, 5, 6])
    with pytest.raises(InputError, match="prompt token ids must be integers, got float64 values such as 1.5"):
        gen.generate_ids([[1.5, 2.0]], max_new_tokens=2)  # was truncated to [1, 2] and decoded
    assert len(gen.generate_ids([[1, 2, 3]], max_new_tokens=np.int64(2), seed=np.int32(1),
                                  stop_at_eos=False).tokens[0]) == 2


def lowered(gen: Generator, sampling: Sampling) -> str:
    tokens, lengths, cache_len = gen._pack([PROMPTS[0]], 8)
    first_logits, cache, _, weights = gen._prefill(tokens, lengths, cache_len, Dense())
    return engine.decode.lower(weights, first_logits, cache, lengths, jnp.full_like(lengths, 8), stop_ids([2], 320),
                               jax.random.key(0), cfg=gen.cfg, sampling=sampling,
                               max_steps=cache_len - tokens.shape[1]).as_text()


def test_greedy_decode_draws_no_random_bits(tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint("llama"))
    assert "threefry" not in lowered(gen, Sampling())
    assert "threefry" in lowered(gen, Sampling(temperature=1.0))  # the pattern can match


def test_each_row_stops_at_its_own_limit(tiny_checkpoint) -> None:
    """`max_new_tokens` per row: a row allowed 0 or 1 keeps only pre-fill's token while the
    others go on, and a row allowed 3 gets 3; the first tokens are the ones each row gets alone."""
    gen = Generator.load(tiny_checkpoint("llama"))
    tokens, lengths, _ = gen._pack(PROMPTS, 8)
    first_logits, cache, _, weights = gen._prefill(tokens, lengths, 32, Dense())
    out = engine.decode(weights, first_logits, cache, lengths, jnp.asarray([1, 0, 3], jnp.int32), stop_ids([], 320),
                        jax.random.key(0), cfg=gen.cfg, sampling=Sampling(), max_steps=6)
    got = np.asarray(out["tokens"])  # [3, 6], -1 past a row's end
    alone = [gen.generate_ids([p], max_new_tokens=6, stop_at_eos=False).tokens[0] for p in PROMPTS]
    assert got[0].tolist() == [alone[0][0]] + [-1] * 5
    assert got[1].tolist() == [alone[1][0]] + [-1] * 5
    assert got[2].tolist() == list(alone[2][:3]) + [-1] * 3
    assert int(out["steps"]) == 2 and not bool(out["more"])


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0)], ids=["greedy", "sampled"])
def test_resumed_loop_updates_the_kv_cache_in_place(tiny_checkpoint, sampling) -> None:
    # As `decode` (test_parity): a copy of a cache buffer inside the loop costs a read and a
    # write of that layer's cache per token.
    gen = Generator.load(tiny_checkpoint("llama"))
    tokens, lengths, _ = gen._pack([PROMPTS[0]], 40)
    first_logits, cache, _, weights = gen._prefill(tokens, lengths, 32, Dense())
    out = engine.decode(weights, first_logits, cache, lengths, jnp.full_like(lengths, 40), stop_ids([], 320),
                        jax.random.key(0), cfg=gen.cfg, sampling=sampling, max_steps=48)
    assert bool(out["more"]) and int(out["steps"]) == 32 - len(PROMPTS[0])  # stopped by the full cache
    cache = engine.grow_cache(out.pop("cache"), slots=64)
    state = {k: out[k] for k in engine.STATE if k in out}
    compiled = engine.resume.lower(weights, state, cache, jnp.full_like(lengths, 40), stop_ids([], 320), cfg=gen.cfg,
                                   sampling=sampling).compile().as_text()
    shape = ",".join(map(str, cache_shape(gen.cfg, 1, 64)))
    assert re.search(rf"f32\[{shape}\]", compiled)  # the pattern below can match
    assert not re.findall(rf"= f32\[{shape}\]\S* copy\(", compiled)
