"""The decode-time layout of gathered core neurons: gate|up as one matrix, rows padded to the
GPU's tile with zeros, equal to the plain gather token for token."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from coreinfer_jax import Generator, Hybrid, Stability
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.forward import ffn
from coreinfer_jax.sparse import gather
from coreinfer_jax.sparse.gather import fused_layout, gather_core_weights, padded_rows

PROMPTS = [[5, 17, 33, 100, 2, 9, 250, 41, 7, 61, 3, 90, 14, 15], [7, 8, 9, 10, 11]]


def test_padded_rows_by_hand() -> None:
    assert padded_rows(5734, 14336) == 5760  # Llama-3-8B keep 0.4: the pad the H200 run found
    assert padded_rows(614, 1536) == 640  # SmolLM2 keep 0.4
    assert padded_rows(1500, 1536) == 1536  # never past the layer's width
    assert padded_rows(1050, 1100) == 1100  # nor where the width is not a multiple of 128
    assert (padded_rows(100, 1024), padded_rows(100, 1023)) == (128, 100)  # tiled from 1024 on
    assert padded_rows(640, 1536) == 640
    assert padded_rows(0, 4096) == 0  # the hybrid's per-token-only mode
    assert padded_rows(51, 128) == 51  # test-sized widths stay unpadded


def numpy_ffn(w_gate, w_up, w_down, x, act):
    """A gated FFN over the given rows, in float64."""
    return (act(x @ w_gate.T) * (x @ w_up.T)) @ w_down


@pytest.mark.parametrize("per_row", [True, False])
def test_padding_rows_are_zero_and_contribute_nothing(per_row) -> None:
    rng = np.random.default_rng(0)
    F, D, K = 1536, 24, 614
    w = {n: rng.normal(size=(F, D)).astype(np.float32) for n in ("w_gate", "w_up", "w_down")}
    idx = np.stack([rng.permutation(F)[:K] for _ in range(2)]).astype(np.int32)  # [B, K]
    idx = idx if per_row else idx[0]
    out = jax.tree.map(np.asarray, fused_layout(w, idx))
    assert set(out) == {"w_gate_up", "w_down"}
    rows = np.concatenate([w["w_gate"][idx], np.zeros(idx.shape[:-1] + (640 - K, D), np.float32),
                           w["w_up"][idx], np.zeros(idx.shape[:-1] + (640 - K, D), np.float32)], axis=-2)
    np.testing.assert_array_equal(out["w_gate_up"], rows)  # gate rows, zeros, up rows, zeros
    np.testing.assert_array_equal(out["w_down"][..., :K, :], w["w_down"][idx])
    assert not out["w_down"][..., K:, :].any()

    cfg = ModelConfig(architecture="LlamaForCausalLM", family="llama", vocab_size=8, hidden_size=D,
                      intermediate_size=F, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=D,
                      hidden_act="silu", norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=8,
                      tie_word_embeddings=True)
    x = rng.normal(size=(2, 1, D)).astype(np.float32)
    got, _ = ffn(out, x, cfg)
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    for b in range(2):
        sel = idx[b] if per_row else idx
        want = numpy_ffn(*(w[n][sel].astype(np.float64) for n in ("w_gate", "w_up", "w_down")), x[b, 0], silu)
        np.testing.assert_allclose(np.asarray(got)[b, 0], want, rtol=2e-4, atol=2e-4)


METHODS = {
    "stability": Stability(keep=0.4, layers=(0, 2)),
    "shared": Stability(keep=0.4, layers=(0, 2), share="batch"),
    "compensated": Stability(keep=0.4, layers=(0, 2), compensate=True),
    "hybrid": Hybrid(keep=0.25, dynamic=0.25, layers=(0, 2), select_by="sketch"),
}


FAMILIES = ("llama", "qwen2", "phi3", "gemma3", "opt")


# One node per family and method (OPT has no compensation), so the device suite can name the few it runs.
@pytest.mark.parametrize("name, method", [(n, k) for n in FAMILIES for k in METHODS
                                          if not (n == "opt" and k == "compensated")])
def test_fused_padded_gather_equals_the_plain_gather_token_for_token(name, method, tiny_checkpoint,
                                                                     monkeypatch) -> None:
    gen = Generator.load(tiny_checkpoint(name))
    F = gen.cfg.intermediate_size

    def run():
        jax.clear_caches()  # the gather's layout is read when it is traced
        return gen.generate_ids(PROMPTS, 12, method=METHODS[method]).tokens

    # Pad every width to a tile of 32 rows, so the test-sized FFN (F=128) gets padding rows.
    monkeypatch.setattr(gather, "TILED_WIDTH", 0)
    monkeypatch.setattr(gather, "ROW_TILE", 32)
    padded = run()
    weights = Stability(keep=0.4, layers=(0, 2)).validate(gen.cfg).decode_weights(
        gen.params, np.zeros((2, 2, int(F * 0.4)), np.int32))
    layer = weights["layers"][0]["ffn"]
    assert layer["w_down"].shape[1] == 64 > int(F * 0.4)  # padded: 51 -> 64 rows
    assert ("w_gate_up" in layer) == (name != "opt")
    monkeypatch.setattr(gather, "fused_layout", gather_core_weights)
    plain = run()
    jax.clear_caches()
    assert padded == plain
