"""Bytes a decode step reads, term by term, from the tiny models' shapes by hand.

Tiny models (tests/conftest.py): D = 64, F = 128, 2 layers, 4 heads of 16, vocabulary 320,
float32. "llama" has 2 KV heads and an LM head of its own, "llama_tied" 4 KV heads and the
embedding as its head; "opt_350m_like" has biases, 32-wide embeddings projected to D and
back, learned positions and no final norm (post-LN).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from coreinfer_jax import Dense, Generator, Stability
from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.tools import roofline
from coreinfer_jax.tools.roofline import bytes_per_token, decode_kv_slots, ffn_bytes_per_token

V, D, F, E, HD = 320, 64, 128, 32, 16
# Per layer, in elements.
LLAMA_ATTN = D * 4 * HD + 2 * D * 2 * HD + 4 * HD * D  # w_q, w_k and w_v (2 KV heads), w_o
TIED_ATTN = 4 * D * 4 * HD  # 4 KV heads: all four matrices D x 64
NORMS = 2 * D  # attention and FFN RMSNorm scales
GATED_FFN = 3 * F * D  # w_gate, w_up, w_down
OPT_ATTN = 4 * D * D + 4 * D  # four matrices and their biases
OPT_NORMS = 2 * 2 * D  # two LayerNorms, scale and bias
OPT_FFN = F * D + F + F * D + D  # fc1 and its bias, fc2 and its bias (per output)

# Whole model, in elements: layers, final norm, head and embedding.
LLAMA = 2 * (LLAMA_ATTN + NORMS + GATED_FFN) + D + V * D + D  # own head, plus one embedding row
TIED = 2 * (TIED_ATTN + NORMS + GATED_FFN) + D + V * D  # the head is the embedding, read whole
OPT = 2 * (OPT_ATTN + OPT_NORMS + OPT_FFN) + V * E + E * D + D * E + D  # projections, one position row
# Keep 0.5 in layer 1 only: half of its neuron rows (and fc1's bias entries).
LLAMA_SAVED = GATED_FFN // 2
OPT_SAVED = (F * D + F + F * D) // 2

# KV cache per slot, in elements: K and V, 2 layers, KV heads x 16.
KV_SLOT = {"llama": 2 * 2 * 2 * HD, "llama_tied": 2 * 2 * 4 * HD, "opt_350m_like": 2 * 2 * 4 * HD}
DENSE = {"llama": LLAMA, "llama_tied": TIED, "opt_350m_like": OPT}
SAVED = {"llama": LLAMA_SAVED, "llama_tied": LLAMA_SAVED, "opt_350m_like": OPT_SAVED}
FFN = {"llama": 2 * GATED_FFN, "llama_tied": 2 * GATED_FFN, "opt_350m_like": 2 * OPT_FFN}


@pytest.mark.parametrize("name", list(DENSE))
@pytest.mark.parametrize("kv_slots", [0, 64, 100.5])
def test_bytes_per_token_term_by_term(name, kv_slots, tiny_checkpoint) -> None:
    gen = Generator.load(tiny_checkpoint(name))
    assert gen.cfg.vocab_size == V
    sparse = Stability(keep=0.5, layers=(1, 2)).validate(gen.cfg)
    kv = KV_SLOT[name] * kv_slots * 4
    assert bytes_per_token(gen.cfg, gen.params, Dense(), kv_slots) == round(DENSE[name] * 4 + kv)
    assert bytes_per_token(gen.cfg, gen.params, sparse, kv_slots) == round((DENSE[name] - SAVED[name]) * 4 + kv)
    assert ffn_bytes_per_token(gen.cfg, gen.params, Dense()) == FFN[name] * 4
    assert ffn_bytes_per_token(gen.cfg, gen.params, sparse) == (FFN[name] - SAVED[name]) * 4


def test_padding_bytes_are_the_zero_rows_the_gather_adds() -> None:
    # A 1536-neuron FFN (SmolLM2's width, 8-wide rows here): keep 0.4 keeps int(1536 * 0.4) = 614
    # neurons, which the gather rounds up to 640 rows (5 tiles of 128); bfloat16 gate, up and down
    # rows of 8 and a float32 gate bias: 3 * 8 * 2 + 4 = 52 bytes per neuron.
    ffn = {"w_gate": np.zeros((1536, 8), jnp.bfloat16), "w_up": np.zeros((1536, 8), jnp.bfloat16),
           "w_down": np.zeros((1536, 8), jnp.bfloat16), "b_gate": np.zeros(1536, np.float32)}
    params = {"layers": [{"ffn": ffn}] * 4}
    assert roofline.padding_bytes(params, Stability(keep=0.4, layers=(1, 3))) == 2 * (640 - 614) * 52
    assert roofline.padding_bytes(params, Dense()) == 0
    narrow = {"layers": [{"ffn": {name: w[:512] for name, w in ffn.items()}}] * 4}  # under 1024: no tiles
    assert roofline.padding_bytes(narrow, Stability(keep=0.4, layers=(1, 3))) == 0


def test_kv_slots_are_the_cache_lengths_decode_runs_on() -> None:
    # 50-token prompt (bucket 64), 256 new tokens: 255 steps at positions 50..304, those
    # before 256 on the first 256-slot cache, the rest on 320 slots (64 + 256, a multiple of 64).
    assert decode_kv_slots(50, 256, 8192) == pytest.approx((206 * 256 + 49 * 320) / 255)
    # 47 + 2048 (the bench's prompt): positions 47..2093 on 256, 512, 1024, 2048 and 2112 slots.
    steps = 209 * 256 + 256 * 512 + 512 * 1024 + 1024 * 2048 + 46 * 2112
    assert decode_kv_slots(47, 2048, 8192) == pytest.approx(steps / 2047)
    assert decode_kv_slots(7, 8, 128) == 64  # one segment: 16-token bucket + 8, rounded to 64
    with pytest.raises(CoreInferError, match="a generation of 1 token"):
        decode_kv_slots(7, 1, 128)


def test_the_probe_is_sized_by_the_largest_cpu_cache_listed(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = {"cpu0/cache/index0/size": "48K", "cpu0/cache/index2/size": "2048K",
             "cpu0/cache/index3/size": "307200K", "cpu1/cache/index3/size": "1M", "cpu1/cache/index9/size": "4096"}
    for name, size in sizes.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(size + "\n")
    assert roofline.largest_cpu_cache(tmp_path) == 300 * 2**20
    assert roofline.largest_cpu_cache(tmp_path / "cpu1") == 0  # no cpu*/ under it
    assert roofline.largest_cpu_cache(tmp_path / "none") == 0
    monkeypatch.setattr(roofline, "CPU_CACHES", tmp_path)
    assert roofline.probe_bytes("cpu") == 2400 * 2**20  # 8 x 300 MiB
    assert roofline.probe_bytes("gpu") == roofline.probe_bytes("cuda") == 2**30  # a CPU's caches are not its
    (tmp_path / "cpu0/cache/index3/size").write_text("32768K")
    assert roofline.probe_bytes("cpu") == 2**30  # 8 x 32 MiB is under the floor
    probe = roofline.BandwidthProbe(4 * 1024 * 3 + 1)  # rounded up to whole rows of 1024 float32
    assert probe.w.shape == (4, 1024) and probe.nbytes == 16384


def h200_l2() -> int:
    text = (Path(roofline.__file__).parent / "gpu_targets" / "h200.txtpb").read_text()
    return int(re.search(r"l2_cache_size:\s*(\d+)", text).group(1))


def test_probe_buffer_exceeds_eight_times_the_caches_it_reads_past() -> None:
    assert h200_l2() == 62914560  # the 60 MB the H200 run's README names
    probe = roofline.bandwidth_probe()  # the default, as bench builds it
    assert probe.nbytes == probe.w.nbytes >= roofline.PROBE_BYTES
    assert roofline.probe_bytes("gpu") >= 8 * h200_l2()
    assert probe.nbytes >= 8 * roofline.largest_cpu_cache()  # its reading of sysfs is checked by hand above
    bandwidth = probe()
    assert math.isfinite(bandwidth) and bandwidth > 0
    assert probe.calls >= 1
