"""`tools.product_bench`: every layout computes the same products (NumPy), and the timing
reads distinct copies past the budget and reports each form against its group's first."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from coreinfer_jax.tools import product_bench
from coreinfer_jax.tools.shapes import model_config


@pytest.mark.parametrize("name", sorted(product_bench.FORMS))
def test_each_form_computes_the_groups_products(name) -> None:
    cfg, _ = model_config("llama-3-8b", tiny=True)
    form = product_bench.FORMS[name]
    rng = np.random.default_rng(0)
    base = [rng.normal(size=s).astype(np.float32) for s in product_bench.base_shapes(cfg)[form.group]]
    x = rng.normal(size=(1, product_bench.input_width(cfg, form.group))).astype(np.float32)
    if form.group == "gate|up":
        want = (x @ base[0].T, x @ base[1].T)
    else:  # down: h D; qkv: x W
        want = (x @ base[0],)
    out = form.canonical(form.product(jnp.asarray(x), form.layout(*map(jnp.asarray, base))))
    assert len(out) == len(want)
    for got, w in zip(out, want):
        np.testing.assert_allclose(np.asarray(got), w, rtol=1e-5, atol=1e-4)


def test_timing_reads_distinct_copies_past_the_budget() -> None:
    budget = 1 << 20
    rows = product_bench.run("llama-3-8b", tiny=True, budget=budget)
    assert [r["form"] for r in rows] == list(product_bench.FORMS)
    for r in rows:
        assert r["copies"] * r["weight_bytes"] >= budget and r["copies"] >= 2
        assert r["us_per_product"] > 0 and np.isfinite(r["gb_s"]) and r["gb_s"] > 0
        # bytes over time: GB/s and microseconds describe the same measurement
        assert r["gb_s"] == pytest.approx(r["weight_bytes"] / (r["us_per_product"] * 1e-6) / 1e9)
    firsts = {}
    for r in rows:
        firsts.setdefault(r["group"], r)
        assert r["vs_first"] == pytest.approx(firsts[r["group"]]["us_per_product"] / r["us_per_product"])
    assert {g: f["form"] for g, f in firsts.items()} == {"gate|up": "two [F, D] (dense today)",
                                                          "down": "[F, D] along F", "qkv": "[D, E] (decode today)"}


def test_a_relu_family_has_no_gate_up_forms(capsys) -> None:
    cfg, _ = model_config("opt-6.7b", tiny=True)
    assert {f.group for f in product_bench.forms(cfg).values()} == {"down", "qkv"}
    assert product_bench.main(["--shapes", "opt-6.7b", "--tiny"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + 3  # the header, down and two qkv forms


def test_an_unknown_shape_is_a_clear_error(capsys) -> None:
    assert product_bench.main(["--shapes", "llama-9-tera"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("error:") and "llama-9-tera" in out
