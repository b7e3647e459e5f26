"""Stability-guided selection against a plain NumPy restatement of the method page."""

from __future__ import annotations

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from coreinfer_jax import select_core_neurons
from coreinfer_jax.sparse.selection import stability_counts
from method_reference import reference_select


def check_same_selection(got: np.ndarray, acts: np.ndarray, keep: float, token_keep: float) -> None:
    want, counts = reference_select(acts, keep, token_keep)
    assert got.shape == want.shape
    assert len(set(got.tolist())) == len(got), "duplicate neuron ids"
    # Ties at the cut-off may be broken either way: the counts of the kept sets must agree
    # as multisets, and every neuron strictly above the cut-off count must be kept.
    np.testing.assert_array_equal(np.sort(counts[got]), np.sort(counts[want]))
    cutoff = counts[want].min() if len(want) else 0
    assert set(np.flatnonzero(counts > cutoff)) <= set(got.tolist())


def run(acts: np.ndarray, valid: np.ndarray, keep: float, token_keep: float) -> np.ndarray:
    return np.asarray(select_core_neurons(jnp.asarray(acts), jnp.asarray(valid), keep, token_keep))


def distinct_activations(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random activations with all values distinct (a permutation, centred, scaled)."""
    n = int(np.prod(shape))
    return ((rng.permutation(n) - n * 0.6) / n).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("keep,token_keep", [(0.4, 0.2), (0.2, 0.2), (0.6, 0.5), (1.0, 1.0),
                                             (0.01, 0.01), (1.0, 0.05), (0.05, 1.0)])
def test_matches_numpy_restatement(keep: float, token_keep: float) -> None:
    rng = np.random.default_rng(0)
    acts = distinct_activations(rng, (2, 23, 96))
    valid = np.ones((2, 23), bool)
    got = run(acts, valid, keep, token_keep)
    assert got.dtype == np.int32 and got.shape == (2, int(96 * keep))
    for b in range(2):
        check_same_selection(got[b], acts[b], keep, token_keep)


def test_distinct_counts_give_identical_sets() -> None:
    # Neurons with a graded bias are core for graded numbers of tokens; search for a seed
    # where the counts around the cut-off are all distinct, so the kept set is unique.
    F, T, keep, token_keep = 40, 30, 0.25, 0.3
    for seed in range(200):
        rng = np.random.default_rng(seed)
        acts = (rng.standard_normal((T, F)) + np.linspace(2.0, -2.0, F)).astype(np.float32)
        want, counts = reference_select(acts, keep, token_keep)
        top = np.sort(counts)[::-1][: len(want) + 1]
        if len(set(top.tolist())) == len(top):
            break
    else:
        pytest.fail("no instance with distinct counts found")
    got = run(acts[None], np.ones((1, T), bool), keep, token_keep)[0]
    assert set(got.tolist()) == set(want.tolist())


def test_padding_and_batch_rows_of_different_lengths() -> None:
    rng = np.random.default_rng(1)
    acts = distinct_activations(rng, (3, 17, 64))
    lengths = [17, 5, 1]
    valid = np.arange(17)[None, :] < np.array(lengths)[:, None]
    got = run(acts, valid, 0.4, 0.2)
    for b, n in enumerate(lengths):
        check_same_selection(got[b], acts[b, :n], 0.4, 0.2)
    # Garbage in padding positions must not change anything.
    noisy = acts.copy()
    noisy[~valid] = 100.0
    np.testing.assert_array_equal(run(noisy, valid, 0.4, 0.2), got)
    # Nor may another row of the batch.
    np.testing.assert_array_equal(run(acts[1:2], valid[1:2], 0.4, 0.2)[0], got[1])


def test_ties_at_the_cutoff() -> None:
    # Integer-valued activations: many equal counts around the cut-off.
    rng = np.random.default_rng(2)
    acts = rng.integers(-3, 4, size=(1, 12, 50)).astype(np.float32) + rng.permutation(600).reshape(1, 12, 50) * 1e-4
    got = run(acts, np.ones((1, 12), bool), 0.3, 0.3)[0]
    check_same_selection(got, acts[0], 0.3, 0.3)


def test_no_positive_activation_still_returns_n_keep() -> None:
    acts = -np.abs(distinct_activations(np.random.default_rng(3), (1, 4, 20))) - 0.1
    got = run(acts, np.ones((1, 4), bool), 0.5, 0.2)[0]
    assert sorted(got.tolist()) == list(range(10))  # limit 0: every count is 0, filled by index


@pytest.mark.parametrize("acts_shape,valid_shape,keep,token_keep,words", [
    ((2, 5, 16), (2, 5), 0.0, 0.2, "keep must be in (0, 1], got 0.0"),  # was an empty selection
    ((2, 5, 16), (2, 5), 2.0, 0.2, "keep must be in (0, 1], got 2.0"),  # was top_k's error
    ((2, 5, 16), (2, 5), 0.5, 1.5, "token_keep must be in (0, 1], got 1.5"),
    ((2, 5, 16), (2, 4), 0.5, 0.2, "activations [B, T, F] and valid [B, T], got shapes (2, 5, 16) and (2, 4)"),
    ((5, 16), (5,), 0.5, 0.2, "got shapes (5, 16) and (5,)"),
])
def test_bad_arguments_are_named(acts_shape, valid_shape, keep, token_keep, words) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        select_core_neurons(jnp.ones(acts_shape), jnp.ones(valid_shape, bool), keep, token_keep)


def test_limit_is_data_dependent_without_recompiling() -> None:
    f = jax.jit(select_core_neurons, static_argnames=("keep", "token_keep"))
    rng = np.random.default_rng(4)
    for shift in (0.0, 0.3, -0.3):
        acts = distinct_activations(rng, (1, 16, 32)) + shift  # different positive counts
        got = np.asarray(f(jnp.asarray(acts), jnp.ones((1, 16), bool), keep=0.4, token_keep=0.2))[0]
        check_same_selection(got, acts[0], 0.4, 0.2)
    assert f._cache_size() == 1


@pytest.mark.parametrize("token_keep,T,F,positives,float32_limit", [
    (0.35, 1, 200, 180, 63),  # the reference's Python floats: 62
    (0.65, 1, 200, 180, 116),  # 117
    (0.29, 3, 100, 300, 29),  # 29 too, one more than int(0.29 * F): the static top-k must hold it
])
def test_token_limit_rounds_as_the_references_python_floats(token_keep, T, F, positives, float32_limit) -> None:
    # Distinct values, exactly `positives` of them above 0: each token's top `limit` is one set.
    flat = np.random.default_rng(5).permutation(T * F).astype(np.float32) - (T * F - positives) + 0.5
    acts = flat.reshape(T, F)
    limit = int(token_keep * positives / T)
    assert np.floor(np.float32(token_keep) * np.float32(positives) / np.float32(T)) == float32_limit
    counts = np.asarray(jax.jit(stability_counts, static_argnums=2)(jnp.asarray(acts[None]), jnp.ones((1, T), bool),
                                                                    token_keep))[0]
    assert counts.sum() == T * limit
    np.testing.assert_array_equal(counts, reference_select(acts, 1.0, token_keep)[1])
