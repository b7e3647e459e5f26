"""Memory-limited mode: FFN in host memory, streamed pre-fill, host-gathered core weights.

Everything must match the all-on-device path exactly: tokens, core neurons, pre-fill logits.
On CPU both host storages are covered: NumPy (the CPU default) and pinned_host (what an
accelerator gets), forced.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coreinfer_jax import Dense, Generator, Stability
from coreinfer_jax.runtime import engine, offload
from coreinfer_jax.sparse.gather import NEURON_ROWS
from coreinfer_jax.runtime.offload import _layer, device_bytes, host_kind, place_core_weights, prefill_streamed, split_params
from coreinfer_jax.models.params import param_shapes

PROMPTS = [[5, 17, 33, 100, 2, 9, 250, 41, 7, 61, 3, 90, 14, 15], [7, 8, 9, 10, 11]]
HOSTS = ["numpy", "pinned_host"]


@pytest.fixture(scope="module", params=["llama", "opt"])
def gen(request, tiny_checkpoint) -> Generator:
    return Generator.load(tiny_checkpoint(request.param))


def random_deep_model(gen: Generator, num_layers: int) -> Generator:
    """`gen`'s architecture with `num_layers` random layers (the tiny checkpoints have two)."""
    cfg = dataclasses.replace(gen.cfg, num_layers=num_layers)
    shapes, treedef = jax.tree.flatten(param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(jax.random.key(0), len(shapes))
    leaves = [0.1 * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)]
    return Generator(cfg, jax.tree.unflatten(treedef, leaves), gen.tokenizer)


def test_cpu_keeps_numpy_unless_pinned_is_forced(gen) -> None:
    device = jax.devices()[0]
    assert host_kind(device) == "numpy"
    _, host_ffn = split_params(gen.params, gen.cfg, host="pinned_host")
    assert {w.sharding.memory_kind for w in jax.tree.leaves(host_ffn)} == {"pinned_host"}
    _, host_ffn = split_params(gen.params, gen.cfg)
    assert all(isinstance(w, np.ndarray) for w in jax.tree.leaves(host_ffn))
    with pytest.raises(ValueError, match="host must be one of"):
        host_kind(device, "disk")


@pytest.mark.parametrize("host", HOSTS)
def test_offloaded_generation_matches_on_device_generation(gen, host, monkeypatch) -> None:
    method = Stability(keep=0.4, token_keep=0.2)  # default range on 2 layers: layer 0 dense, layer 1 sparse
    want = gen.generate_ids(PROMPTS, max_new_tokens=12, method=method, stop_at_eos=False, return_logits=True)
    host_gathers = []
    gather = offload._gather_on_host
    monkeypatch.setattr(offload, "_gather_on_host", lambda *a: host_gathers.append(1) or gather(*a))
    offloaded = Generator(gen.cfg, gen.params, gen.tokenizer, offload=True, host_memory=host)
    got = offloaded.generate_ids(PROMPTS, max_new_tokens=12, method=method, stop_at_eos=False, return_logits=True)
    # pinned_host storage gathers its one sparse layer's rows on the host (what a GPU runs).
    assert len(host_gathers) == (1 if host == "pinned_host" else 0)
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(got.core_neurons, want.core_neurons)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-5, rtol=0)
    assert got.method == want.method and got.decode_steps == want.decode_steps
    assert got.prefill_s > 0 and got.decode_s > 0


def test_all_layers_sparse_and_eos_stop(gen) -> None:
    method = Stability(keep=0.7, layers=(0, gen.cfg.num_layers))
    want = gen.generate_ids(PROMPTS, max_new_tokens=8, method=method)
    got = Generator(gen.cfg, gen.params, gen.tokenizer, offload=True).generate_ids(PROMPTS, max_new_tokens=8,
                                                                                  method=method)
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(got.core_neurons, want.core_neurons)


@pytest.mark.parametrize("host", HOSTS)
def test_streamed_prefill_equals_engine_prefill(gen, host) -> None:
    method = Stability(keep=0.4).validate(gen.cfg)
    tokens, lengths, cache_len = gen._pack(PROMPTS, 8)
    want_logits, want_cache, want_core = engine.prefill(gen.params, tokens, lengths, cfg=gen.cfg, method=method,
                                                        cache_len=cache_len)
    device_params, host_ffn = split_params(gen.params, gen.cfg, host=host)
    logits, cache, core = prefill_streamed(device_params, host_ffn, tokens, lengths, cfg=gen.cfg, method=method,
                                           cache_len=cache_len)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(core, want_core)
    for ours, theirs in zip(cache, want_cache):
        for name in ("k", "v"):
            np.testing.assert_allclose(ours[name], theirs[name], atol=1e-5, rtol=0)


def test_layer_function_compiles_once_per_variant_for_all_layers(gen) -> None:
    deep = random_deep_model(gen, 6)
    method = Stability(keep=0.4, layers=(2, 5)).validate(deep.cfg)
    tokens, lengths, cache_len = deep._pack(PROMPTS, 8)
    device_params, host_ffn = split_params(deep.params, deep.cfg)
    before = _layer._cache_size()
    logits, _, core = prefill_streamed(device_params, host_ffn, tokens, lengths, cfg=deep.cfg, method=method,
                                       cache_len=cache_len)
    assert _layer._cache_size() - before == 2  # six layers: one dense-layer and one selecting compile
    prefill_streamed(device_params, host_ffn, tokens, lengths, cfg=deep.cfg, method=method, cache_len=cache_len)
    assert _layer._cache_size() - before == 2
    want_logits, _, want_core = engine.prefill(deep.params, tokens, lengths, cfg=deep.cfg, method=method,
                                               cache_len=cache_len)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(core, want_core)


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS])
def test_resident_bytes_drop_by_the_unkept_ffn_rows(gen, host, prompts) -> None:
    cfg = gen.cfg
    method = Stability(keep=0.4).validate(cfg)
    full = device_bytes(gen.params)
    ffn_bytes = [sum(w.nbytes for w in layer["ffn"].values()) for layer in gen.params["layers"]]
    device_params, host_ffn = split_params(gen.params, cfg, host=host)
    assert device_bytes(host_ffn) == 0
    assert device_bytes(device_params) == full - sum(ffn_bytes)

    tokens, lengths, cache_len = gen._pack(prompts, 4)
    _, _, core = prefill_streamed(device_params, host_ffn, tokens, lengths, cfg=cfg, method=method,
                                  cache_len=cache_len)
    placed = place_core_weights(device_params, host_ffn, core, method)
    B, _, K = core.shape
    F = cfg.intermediate_size
    saved = sum(w.nbytes * (F - B * K) // F for i in method.sparse_layers()
                for name, w in gen.params["layers"][i]["ffn"].items() if name in NEURON_ROWS)
    assert saved > 0
    assert device_bytes(placed) == full - saved


def test_dense_method_is_refused(gen) -> None:
    with pytest.raises(ValueError, match="offload mode needs a sparse method"):
        Generator(gen.cfg, gen.params, gen.tokenizer, offload=True).generate_ids(PROMPTS, max_new_tokens=4,
                                                                                 method=Dense())


def test_load_offloaded_keeps_the_ffn_off_the_device(tiny_checkpoint) -> None:
    path = tiny_checkpoint("llama")
    gen = Generator.load(path, offload=True)
    device_params, host_ffn = gen.offloaded
    assert all(isinstance(w, np.ndarray) for w in jax.tree.leaves(host_ffn))
    assert "ffn" not in device_params["layers"][0]
    method = Stability(keep=0.5, layers=(0, 2))
    want = Generator.load(path).generate("The cat sat on the", max_new_tokens=8, method=method)
    assert gen.generate("The cat sat on the", max_new_tokens=8, method=method).tokens == want.tokens


def _pinned_ffn(gen: Generator) -> tuple[dict, np.ndarray]:
    _, host_ffn = split_params(gen.params, gen.cfg, host="pinned_host")
    idx = np.array([[3, 0, 77, 12], [127, 5, 5, 64]], np.int32)  # [B, K], a repeat included
    return host_ffn[1], idx


def _expect_rows(ffn: dict, idx: np.ndarray) -> dict:
    return {name: np.asarray(w)[idx] if name in NEURON_ROWS else np.asarray(w) for name, w in ffn.items()}


def test_host_gather_runs_on_the_host_and_returns_device_rows(gen) -> None:
    ffn, idx = _pinned_ffn(gen)
    ids = jax.device_put(idx, ffn["w_up"].sharding)
    got = offload._gather_on_host(ffn, ids)
    assert {w.sharding.memory_kind for w in jax.tree.leaves(got)} == {"device"}
    for name, want in _expect_rows(ffn, idx).items():
        np.testing.assert_array_equal(got[name], want)
    assert '_xla_compute_type = "host"' in offload._gather_on_host.lower(ffn, ids).as_text()


def test_host_compute_transform_is_chosen_by_signature(gen, monkeypatch) -> None:
    """JAX 0.11's `compute_on(f, *, compute_type, out_memory_spaces, compiler_options=None)`
    (0.10's `compute_on2` under that name; no `compute_on2`), stood in for by the installed
    JAX's transform of that signature, so that the choice is tested under either version."""
    real = offload._compute_on_module
    transform = getattr(real, "compute_on2", real.compute_on)  # 0.10's, else 0.11's
    calls = []

    def compute_on(f=None, *, compute_type, out_memory_spaces, compiler_options=None):
        calls.append(compute_type)
        return transform(f, compute_type=compute_type, out_memory_spaces=out_memory_spaces,
                         compiler_options=compiler_options)

    monkeypatch.setattr(offload, "_compute_on_module", types.SimpleNamespace(compute_on=compute_on))
    ffn, idx = _pinned_ffn(gen)
    ids = jax.device_put(idx, ffn["w_up"].sharding)
    # A new function, so that it is traced afresh (JAX caches traces by function), with the 0.11 form.
    got = jax.jit(lambda f, i: offload._gather_on_host.__wrapped__(f, i))(ffn, ids)
    assert calls == ["device_host"]
    for name, want in _expect_rows(ffn, idx).items():
        np.testing.assert_array_equal(got[name], want)
    # And JAX 0.10's own module: a context-manager `compute_on` beside the `compute_on2` transform.
    monkeypatch.setattr(offload, "_compute_on_module", real)
    new = tuple(map(int, jax.__version__.split(".")[:2])) >= (0, 11)
    assert offload._host_compute() is (real.compute_on if new else real.compute_on2)
