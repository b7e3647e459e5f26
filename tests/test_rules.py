"""Selection rules against plain NumPy restatements; the paper rule is `select_core_neurons`."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from coreinfer_jax import Stability, make_method, select_core_neurons
from coreinfer_jax.sparse.radix_select import radix_top
from coreinfer_jax.sparse.rules import RULES, top_neurons_and_mask


def magnitude_reference(acts: np.ndarray, n_keep: int, token_keep: float) -> np.ndarray:
    """One prompt's real tokens `acts` `[T, F]`: the paper's counting, tokens voting by |a|."""
    T, F = acts.shape
    limit = int(token_keep * int((acts > 0).sum()) / T)
    counts = np.zeros(F, np.int64)
    for t in range(T):
        counts[np.argsort(-np.abs(acts[t]), kind="stable")[:limit]] += 1
    return np.argsort(-counts, kind="stable")[:n_keep]


def normalized_magnitude_scores(acts: np.ndarray) -> np.ndarray:
    m = np.abs(acts.astype(np.float64))
    return (m / m.sum(-1, keepdims=True)).sum(0)  # [F]


def normalized_magnitude_reference(acts: np.ndarray, n_keep: int) -> np.ndarray:
    return np.argsort(-normalized_magnitude_scores(acts), kind="stable")[:n_keep]


def distinct_magnitudes(rng: np.random.Generator, shape: tuple[int, ...], positive: float = 0.45) -> np.ndarray:
    """Activations whose magnitudes are all distinct, a fraction `positive` of them positive."""
    n = int(np.prod(shape))
    sign = np.where(rng.random(n) < positive, 1.0, -1.0)
    return (sign * (rng.permutation(n) + 1) / n).reshape(shape).astype(np.float32)


def run(rule: str, acts: np.ndarray, valid: np.ndarray, n_keep: int, token_keep: float = 0.2) -> np.ndarray:
    got = np.asarray(RULES[rule](jnp.asarray(acts), jnp.asarray(valid), n_keep, token_keep))
    assert got.dtype == np.int32 and got.shape == (acts.shape[0], n_keep)
    return got


LENGTHS = [23, 9, 1]


@pytest.mark.parametrize("n_keep,token_keep", [(38, 0.2), (19, 0.5), (96, 0.2), (5, 1.0), (60, 0.05)])
def test_magnitude_matches_numpy_restatement(n_keep: int, token_keep: float) -> None:
    acts = distinct_magnitudes(np.random.default_rng(0), (3, 23, 96))
    valid = np.arange(23)[None, :] < np.array(LENGTHS)[:, None]
    got = run("magnitude", acts, valid, n_keep, token_keep)
    for b, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(got[b], magnitude_reference(acts[b, :n], n_keep, token_keep))


def test_magnitude_votes_for_large_negative_activations() -> None:
    # Neuron 0 is strongly negative in every token: the paper's rule never keeps it, magnitude must.
    acts = distinct_magnitudes(np.random.default_rng(1), (1, 12, 40)) * 0.1
    acts[..., 0] = -5.0
    valid = np.ones((1, 12), bool)
    assert 0 in run("magnitude", acts, valid, 4)[0].tolist()
    assert 0 not in run("paper", acts, valid, 4)[0].tolist()


@pytest.mark.parametrize("n_keep", [1, 17, 40, 96])
def test_normalized_magnitude_matches_numpy_restatement(n_keep: int) -> None:
    acts = distinct_magnitudes(np.random.default_rng(2), (3, 23, 96))
    valid = np.arange(23)[None, :] < np.array(LENGTHS)[:, None]
    got = run("normalized_magnitude", acts, valid, n_keep)
    for b, n in enumerate(LENGTHS):
        scores = np.sort(normalized_magnitude_scores(acts[b, :n]))[::-1]
        # The data leave clear gaps between the scores, so float32 sums order them like float64.
        assert np.diff(scores[: n_keep + 1]).max() < -1e-6
        np.testing.assert_array_equal(got[b], normalized_magnitude_reference(acts[b, :n], n_keep))


def test_normalized_magnitude_weighs_every_token_equally() -> None:
    # Token 0 has outsized activations (like a sequence's first token) on neurons 0..3; the
    # other tokens agree on neurons 10..13. Unnormalised |a| sums would pick 0..3.
    acts = np.full((1, 8, 32), 0.01, np.float32)
    acts[0, 0, :4] = 100.0
    acts[0, 1:, 10:14] = 1.0
    got = run("normalized_magnitude", acts, np.ones((1, 8), bool), 4)[0]
    assert sorted(got.tolist()) == [10, 11, 12, 13]


@pytest.mark.parametrize("rule", list(RULES))
def test_padding_and_other_rows_never_count(rule: str) -> None:
    acts = distinct_magnitudes(np.random.default_rng(3), (3, 17, 64))
    valid = np.arange(17)[None, :] < np.array([17, 5, 1])[:, None]
    got = run(rule, acts, valid, 25)
    noisy = acts.copy()
    noisy[~valid] = -100.0
    np.testing.assert_array_equal(run(rule, noisy, valid, 25), got)
    np.testing.assert_array_equal(run(rule, acts[1:2], valid[1:2], 25)[0], got[1])
    for row in got:
        assert len(set(row.tolist())) == 25


@pytest.mark.parametrize("rule", list(RULES))
def test_ties_are_taken_in_index_order(rule: str) -> None:
    acts = np.ones((1, 6, 20), np.float32)  # every neuron scores the same
    assert run(rule, acts, np.ones((1, 6), bool), 7)[0].tolist() == list(range(7))


def numpy_top(scores: np.ndarray, n: int) -> np.ndarray:
    """The `n` highest of `scores` `[F]` in the order `lax.top_k` documents: by value, +0
    above -0, then lower id first."""
    return np.lexsort((np.arange(len(scores)), np.signbit(scores), -scores))[:n]


def tied_scores(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Few distinct values (ties in every row), -inf (the hybrid's core neurons), +inf, and
    both zeros."""
    rng = np.random.default_rng(seed)
    scores = (rng.integers(-2, 4, shape) / 4).astype(np.float32)
    for value, share in ((-np.inf, 0.15), (np.inf, 0.03), (-0.0, 0.1)):
        scores[rng.random(shape) < share] = value
    return scores


@pytest.mark.parametrize("form", ["cpu", "gpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n,shards,T", [(1, 1, 1), (5, 1, 1), (12, 1, 3), (24, 1, 1), (6, 2, 1), (12, 3, 3)])
def test_top_neurons_and_mask_equal_a_numpy_scatter(n: int, shards: int, T: int, dtype, form, forced) -> None:
    """The per-token choice's ids and mask in both forms (`top_k` and a scatter; a radix
    selection in a decode step for a GPU) against NumPy: a stable sort per neuron block, its
    ids set in a zero mask."""
    forced(form)
    scores = tied_scores(n * 10 + shards, (2, T, 24))  # [B, T, F]
    ids, mask = top_neurons_and_mask(jnp.asarray(scores, dtype), n, shards)
    block = 24 // shards
    want_ids = np.zeros((2, T, n), np.int64)
    want_mask = np.zeros((2, T, 24), bool)
    for b, t, s in np.ndindex(2, T, shards):
        top = s * block + numpy_top(scores[b, t, s * block:(s + 1) * block], n // shards)
        want_ids[b, t, s * (n // shards):(s + 1) * (n // shards)] = top
        want_mask[b, t, top] = True
    assert ids.dtype == jnp.int32 and mask.dtype == jnp.bool_
    if form == "gpu" and T == 1:  # radix selection: the same ids, each block's in increasing order
        want_ids = np.sort(want_ids.reshape(2, T, shards, -1), axis=-1).reshape(2, T, n)
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_array_equal(np.asarray(mask), want_mask)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("n", [1, 37, 299, 300])
def test_radix_selection_equals_numpy(n: int, dtype) -> None:
    """`radix_top` on rows of 300 scores, one row of distinct ones (every byte of the key
    decides), against NumPy's order."""
    scores = tied_scores(n, (3, 300))
    scores[2] = np.random.default_rng(n).standard_normal(300) * 10.0 ** np.random.default_rng(n + 1).integers(-4, 4, 300)
    scores = np.asarray(jnp.asarray(scores, dtype).astype(jnp.float32))  # the values `dtype` holds
    ids, mask = jax.jit(radix_top, static_argnums=1)(jnp.asarray(scores, dtype), n)
    for row, got_ids, got_mask in zip(scores, np.asarray(ids), np.asarray(mask)):
        want = np.sort(numpy_top(row, n))
        np.testing.assert_array_equal(got_ids, want)
        np.testing.assert_array_equal(np.flatnonzero(got_mask), want)


@pytest.mark.parametrize("keep", [0.05, 0.2, 0.4, 0.6, 1.0])
def test_paper_rule_is_select_core_neurons_bit_for_bit(keep: float) -> None:
    acts = np.random.default_rng(4).standard_normal((3, 23, 96)).astype(np.float32)
    valid = np.arange(23)[None, :] < np.array(LENGTHS)[:, None]
    want = np.asarray(select_core_neurons(jnp.asarray(acts), jnp.asarray(valid), keep, 0.2))
    np.testing.assert_array_equal(run("paper", acts, valid, int(96 * keep)), want)


def test_rules_compile_once_per_count() -> None:
    rng = np.random.default_rng(5)
    for rule in RULES:
        f = jax.jit(RULES[rule], static_argnames=("n_keep", "token_keep"))
        for shift in (0.0, 0.3):  # different positive counts: a different paper/magnitude limit
            acts = jnp.asarray(distinct_magnitudes(rng, (1, 16, 32)) + shift)
            f(acts, jnp.ones((1, 16), bool), n_keep=8, token_keep=0.2)
        assert f._cache_size() == 1


def test_unknown_rule_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown selection rule 'biggest'; choose one of: paper, magnitude"):
        Stability(rule="biggest")
    with pytest.raises(ValueError, match="applies to the stability and hybrid methods, not dense"):
        make_method("dense", rule="magnitude")
    with pytest.raises(ValueError, match="keep and layers apply to the sparse methods, not dense"):
        make_method("dense", keep=0.4)
    with pytest.raises(ValueError, match="keep and layers apply to the sparse methods, not dense"):
        make_method("dense", layers=(2, 5))
    assert Stability().rule == "paper" and Stability().name == "stability"
