"""Next-token sampling: greedy, temperature, top-k, top-p, and the seed of a sampled generation."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from coreinfer_jax import Generator
from coreinfer_jax.runtime.sampling import Sampling, sample

LOGITS = jnp.log(jnp.array([[0.05, 0.5, 0.3, 0.15]], jnp.float32))


def draws(sampling: Sampling, n: int = 4000) -> np.ndarray:
    keys = jax.random.split(jax.random.key(0), n)
    return np.asarray(jax.vmap(lambda k: sample(LOGITS, k, sampling)[0])(keys))


def test_greedy_is_argmax() -> None:
    logits = jax.random.normal(jax.random.key(1), (5, 100))
    np.testing.assert_array_equal(sample(logits, jax.random.key(2), Sampling()), np.argmax(logits, -1))


def test_greedy_takes_the_first_of_tied_maxima_and_the_first_nan_like_argmax() -> None:
    logits = np.array([[1.0, 3.0, 3.0, 2.0],
                       [-np.inf, -np.inf, -np.inf, -np.inf],
                       [0.0, np.nan, 5.0, np.nan],
                       [7.0, 7.0, 7.0, 7.0]], np.float32)
    chosen = sample(jnp.asarray(logits), jax.random.key(0), Sampling())
    assert chosen.dtype == jnp.int32
    np.testing.assert_array_equal(chosen, [1, 0, 1, 0])
    np.testing.assert_array_equal(chosen, jnp.argmax(jnp.asarray(logits), -1))


def test_temperature_one_follows_the_distribution() -> None:
    freq = np.bincount(draws(Sampling(temperature=1.0)), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.05, 0.5, 0.3, 0.15], atol=0.03)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_sharpens_or_flattens_the_distribution(temperature: float) -> None:
    # Logits divided by T: probabilities proportional to p ** (1 / T).
    p = np.array([0.05, 0.5, 0.3, 0.15]) ** (1 / temperature)
    freq = np.bincount(draws(Sampling(temperature=temperature)), minlength=4) / 4000
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.03)


def test_top_k_and_top_p_cut_the_tail() -> None:
    assert set(draws(Sampling(temperature=1.0, top_k=2))) == {1, 2}
    # Nucleus 0.7: tokens 1 (0.5) and 2 (0.3) reach it; 3 and 0 are cut.
    freq = np.bincount(draws(Sampling(temperature=1.0, top_p=0.7)), minlength=4) / 4000
    assert freq[0] == 0 and freq[3] == 0
    np.testing.assert_allclose(freq[1:3], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)
    assert set(draws(Sampling(temperature=2.0, top_p=0.01))) == {1}


def test_the_seed_decides_a_sampled_generation(tiny_checkpoint) -> None:
    """The same seed repeats a generation, another seed changes it, and every step draws
    afresh: with all-zero weights every logit is equal, so a step that reused its key would
    repeat the previous step's token."""
    gen = Generator.load(tiny_checkpoint("llama"))
    flat = Generator(gen.cfg, jax.tree.map(jnp.zeros_like, gen.params), gen.tokenizer)
    s = Sampling(temperature=1.0)
    prompts = [[5, 6, 7], [8, 9]]
    first = flat.generate_ids(prompts, 24, sampling=s, seed=1, stop_at_eos=False).tokens
    assert flat.generate_ids(prompts, 24, sampling=s, seed=1, stop_at_eos=False).tokens == first
    assert flat.generate_ids(prompts, 24, sampling=s, seed=2, stop_at_eos=False).tokens != first
    for row in first:  # 24 uniform draws from 320 tokens are ~23 distinct ones; a reused key gives 1 or 2
        assert len(set(row)) > 12
    assert first[0] != first[1]


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_settings_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Sampling(**kwargs)
