"""`bench --batch`: bytes per decode step at batch sizes (derived by hand from the tiny model's
shapes) and the table's rows."""

from __future__ import annotations

import json

from coreinfer_jax import Dense, Generator, Stability
from coreinfer_jax.tools.batch_bench import batch_markdown, step_bytes
from coreinfer_jax.tools.cli import main


def test_step_bytes_count_per_row_copies_and_kv_per_row(tiny_checkpoint) -> None:
    """Tiny Llama: D = 64, F = 128, 2 layers, 2 KV heads of 16, float32. Keep 0.5 in both layers
    keeps 64 rows of each of w_gate, w_up, w_down: 3 * 64 * 64 * 4 = 49152 bytes per layer."""
    gen = Generator.load(tiny_checkpoint("llama"))
    cfg, params = gen.cfg, gen.params
    row = Stability(keep=0.5, layers=(0, 2)).validate(cfg)
    shared = Stability(keep=0.5, layers=(0, 2), share="batch").validate(cfg)
    slots = 100.0
    kv_per_row = 2 * 2 * slots * 2 * 16 * 4  # K and V, 2 layers, slots, 2 heads x 16, float32
    core = 2 * 49152
    assert step_bytes(cfg, params, row, slots, 3) - step_bytes(cfg, params, shared, slots, 3) == 2 * core
    assert step_bytes(cfg, params, Dense(), slots, 3) - step_bytes(cfg, params, shared, slots, 3) == core
    assert step_bytes(cfg, params, Dense(), slots, 3) - step_bytes(cfg, params, Dense(), slots, 1) == 2 * kv_per_row
    assert step_bytes(cfg, params, row, slots, 1) == step_bytes(cfg, params, shared, slots, 1)


def test_batch_table_has_dense_per_row_and_shared_at_each_batch(tiny_checkpoint, capsys) -> None:
    assert main(["bench", "--checkpoint", str(tiny_checkpoint("llama")), "--batch", "1", "3", "--keep", "0.5",
                 "--layers", "0:2", "--new-tokens", "4", "--reps", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    got = [(r["batch"], r["method"]) for r in report["rows"]]
    assert got == [(b, m) for b in (1, 3) for m in ("dense", "stability keep 0.5", "stability keep 0.5 shared")]
    for r in report["rows"]:
        assert r["decode_tokens_per_s"] > 0 and r["bytes_per_step"] > 0
    dense_1, row_1, shared_1, dense_3, row_3, shared_3 = (r["bytes_per_step"] for r in report["rows"])
    assert row_1 == shared_1 < dense_1 and shared_3 < dense_3 < row_3
    # The table names the bandwidth its bounds come from (the probe's median).
    assert report["bandwidth_gb_s"] > 0
    assert f"read bandwidth {report['bandwidth_gb_s']:.1f} GB/s" in batch_markdown(report).splitlines()[0]


def test_batch_sizes_are_checked(tiny_checkpoint, capsys) -> None:
    assert main(["bench", "--checkpoint", str(tiny_checkpoint("llama")), "--batch", "0", "--no-torch"]) == 2
    assert "batch sizes >= 1" in capsys.readouterr().err
