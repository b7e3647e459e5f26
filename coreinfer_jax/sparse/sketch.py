"""A 4-bit sketch of the FFN's input projections: the hybrid method's default per-token predictor.

Each weight of the gate and up projections rounded to 4 bits (symmetric, one float32 scale
per neuron row: `q = round(w / s)` in -7..7, `s = max |w_row| / 7`), the two projections
packed into one byte per weight pair (low nibble gate, high nibble up, each stored as
`q + 8`). A decode step ranks all F neurons by `|act(x Qg^T sg) * (x Qu^T su)|`, reading
`F * D` bytes plus `8 F` of scales per layer: a twelfth of the layer's float32 FFN bytes (a
sixth of bfloat16's); a batch of one ranks only the neurons outside its core, from their
rows gathered once per generation (`outside_rows`). A ReLU FFN (OPT) has one input
projection, `fc1`: its first and second halves of rows share the bytes instead, and the
sketch scores the pre-activation. Built with
`down`, it holds the down projection too (two outputs per byte, one scale per
neuron): the hybrid adds the neurons it leaves out as their estimated activation times these
weights (`rest="sketch"`, `sparse.token_step`).

Built from the weights alone (no data, no fitting, well under a second for SmolLM2), so it
is never stale and never belongs to another model. On SmolLM2-135M it ranks neurons almost
as the true activations do: static 0.25 + per-token 0.25 in layers 1..29, WikiText-2
perplexity 24.98 (true activations 25.25, rank-64 whitened SVD 37.86, dense 23.39;
docs/hybrid.md). XLA fuses the unpacking into each matrix-vector product, so a step reads
the nibbles, not float32 copies of them (docs/hybrid.md#speed); on a GPU the products are
written as reductions for that (`models.products`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from coreinfer_jax.models.params import Params
from coreinfer_jax.models.products import times_rows

QMAX = 7  # symmetric 4-bit levels -7..7; stored + 8 so a nibble is 1..15
OFFSET = 8


def sketch_rows(ffn: Params) -> int:
    """Rows of a layer's packed sketch: F (gated: gate and up share a byte) or ceil(F / 2)."""
    F = ffn["w_up"].shape[0]
    return F if "w_gate" in ffn else -(-F // 2)


def sketch_bytes(ffn: Params, down: bool = False, neurons: int | None = None) -> int:
    """Bytes one decode step reads of a layer's sketch: the packed nibbles and two scales per row
    (`down`: and the down projection's nibbles and one scale per neuron); of `neurons` of a
    gated layer's rows only (`outside_rows`) when given."""
    F, D = ffn["w_up"].shape
    rows, F = (sketch_rows(ffn), F) if neurons is None else (neurons, neurons)
    return rows * D + 2 * rows * 4 + (-(-D // 2) * F + F * 4 if down else 0)


@jax.jit
def quantize_rows(w: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`w` `[R, D]` as stored nibbles `uint8 [R, D]` (1..15) and per-row scales `float32 [R]`."""
    w = w.astype(jnp.float32)
    peak = jnp.max(jnp.abs(w), axis=1)  # [R]
    scale = jnp.where(peak > 0, peak / QMAX, 1.0)  # an all-zero row: any scale, its levels are 0
    q = jnp.clip(jnp.round(w / scale[:, None]), -QMAX, QMAX)  # [R, D]
    return (q + OFFSET).astype(jnp.uint8), scale


@jax.jit
def pack_layer(ffn: Params) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One layer's sketch: packed `uint8 [R, D]` and scales `float32 [2, R]` (low, high nibble)."""
    if "w_gate" in ffn:
        low, high = ffn["w_gate"], ffn["w_up"]
    else:
        w = ffn["w_up"]
        half = sketch_rows(ffn)
        low, high = w[:half], jnp.pad(w[half:], ((0, 2 * half - w.shape[0]), (0, 0)))  # [R, D] each
    q_low, s_low = quantize_rows(low)
    q_high, s_high = quantize_rows(high)
    return q_low | (q_high << 4), jnp.stack([s_low, s_high])


@jax.jit
def pack_down(w_down: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The down projection `[F, D]` as `uint8 [ceil(D / 2), F]`, output-major: byte `(e, j)`
    holds neuron j's weight to output e in the low nibble and to output `e + ceil(D / 2)` in
    the high one; and per-neuron scales `float32 [F]`.

    Output-major because XLA's CPU backend fuses the unpacking into a vector-matrix product
    only when it contracts the packed matrix's minor axis: with neuron pairs per byte
    (`[ceil(F / 2), D]`) it wrote the unpacked float32 matrix out first, 20.5 -> 2.6 ms per
    step for SmolLM2's 29 layers in a 16-step `fori_loop` (docs/hybrid.md#speed)."""
    q, scale = quantize_rows(w_down)  # [F, D], [F]
    q = jnp.pad(q, ((0, 0), (0, q.shape[1] % 2)), constant_values=OFFSET).T  # [D', F]; an odd D: a level-0 output
    half = q.shape[0] // 2
    return q[:half] | (q[half:] << 4), scale


@dataclasses.dataclass(frozen=True, eq=False)
class Sketch:
    """Per-layer sketches for layers `layers[0] .. layers[1] - 1` (equality: identity), kept as
    one array pair per layer: slicing a stacked array at every generation cost ~0.1 s."""

    layers: tuple[int, int]
    factors: tuple[Params, ...]  # per layer {"packed": uint8 [R, D], "scales": float32 [2, R]} (+ "down" ones)
    rank = None  # not a low-rank predictor (the hybrid's label names it "int4")

    @classmethod
    def build(cls, params: Params, layers: tuple[int, int], down: bool = False) -> Sketch:
        """The sketch of `params`' layers `layers`; `down`: with the 4-bit down projection too."""
        factors = []
        for i in range(*layers):
            ffn = params["layers"][i]["ffn"]
            q, s = pack_layer(ffn)
            factors.append({"packed": q, "scales": s})
            if down:
                q, s = pack_down(ffn["w_down"])
                factors[-1].update(down=q, down_scales=s)
        return cls(layers, tuple(factors))

    @property
    def down(self) -> bool:
        """Whether it holds the down projection (built with `down`)."""
        return all("down" in f for f in self.factors)

    def covers(self, first: int, end: int) -> bool:
        return self.layers[0] <= first and end <= self.layers[1]

    def layer_factors(self, first: int, end: int) -> list[Params]:
        """Per layer `first .. end - 1`: `{"packed": [R, D], "scales": [2, R]}` and, with `down`,
        `{"down": [ceil(D / 2), F], "down_scales": [F]}`."""
        return list(self.factors[first - self.layers[0]: end - self.layers[0]])


def outside_rows(factors: Params, ffn: Params, core_mask: jnp.ndarray, down_norm: jnp.ndarray | None, *,
                 size: int) -> Params:
    """A gated layer's sketch `factors` and input biases restricted to the `size` neurons
    outside one row's core (`core_mask` `bool [1, F]`), and those neurons' ids `int32 [size]`
    in increasing order (so `top_k`'s ties still go to the lower neuron id); with `down_norm`
    `[F]`, theirs. Gathered once per generation, so that a batch of one's decode step reads
    and ranks only the neurons it can choose (`token_step.TokenNeurons`)."""
    ids = jnp.nonzero(~core_mask[0], size=size)[0].astype(jnp.int32)  # [size]
    out = {"ids": ids, "packed": jnp.take(factors["packed"], ids, axis=0),  # [size, D]
           "scales": jnp.take(factors["scales"], ids, axis=1)}  # [2, size]
    if "down" in factors:
        out.update(down=jnp.take(factors["down"], ids, axis=1), down_scales=jnp.take(factors["down_scales"], ids))
    out.update({name: jnp.take(ffn[name], ids) for name in ("b_gate", "b_up") if name in ffn})
    if down_norm is not None:
        out["down_norm"] = jnp.take(down_norm, ids)  # [size]
    return out


@functools.partial(jax.jit, static_argnames=("sizes",))
def outside_layers(factors: list[Params], ffns: list[Params], core_masks: list[jnp.ndarray],
                   down_norms: list[jnp.ndarray] | None, *, sizes: tuple[int, ...]) -> list[Params]:
    """`outside_rows` of every sparse layer, in one program per generation as the core's
    gather (`gather.gather_core_layers`), not one dispatch per layer."""
    norms = down_norms or [None] * len(ffns)
    return [outside_rows(*args, size=size) for *args, size in zip(factors, ffns, core_masks, norms, sizes)]


def unpack(packed: jnp.ndarray, dtype: jnp.dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The low and high nibbles' levels (-7..7) as `dtype` `[R, D]` each."""
    return (packed & 0xF).astype(dtype) - OFFSET, (packed >> 4).astype(dtype) - OFFSET


def sketch_estimate(factors: Params, ffn: Params, x: jnp.ndarray, act, relu: bool,
                    row_scale: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Each neuron's predicted importance `[..., F]` for FFN inputs `x` `[..., D]` (larger: keep)
    and its estimated down-projection input `[..., F]`, from the layer's sketch `factors` and
    the full `ffn`'s biases (`relu`: one input projection, OPT's; `row_scale`: `x` is an
    unfinished norm, `models.products.times_rows`)."""
    with jax.named_scope("sketch_neurons"):
        # The barrier ties the nibbles to this step's input. Without it, XLA's while-loop
        # invariant code motion hoists the unpacking out of the decode loop and every step
        # reads float32 copies eight times the sketch's bytes (SmolLM2 decode: 63 -> 55 ms
        # per token; docs/hybrid.md#speed).
        packed, x = jax.lax.optimization_barrier((factors["packed"], x))
        low, high = unpack(packed, x.dtype)
        scales = factors["scales"].astype(x.dtype)
        first = times_rows(x, low, row_scale) * scales[0]  # [..., R]
        second = times_rows(x, high, row_scale) * scales[1]  # [..., R]
        if relu:
            F = ffn["w_up"].shape[0]
            up = jnp.concatenate([first, second], axis=-1)[..., :F]  # [..., F]
            up = up + ffn["b_up"] if "b_up" in ffn else up
            return up, act(up)  # ranked by the pre-activation: ReLU keeps its order
        gate = first + ffn["b_gate"] if "b_gate" in ffn else first
        up = second + ffn["b_up"] if "b_up" in ffn else second
        hidden = act(gate) * up  # [..., F]
        return jnp.abs(hidden), hidden


def rest_output(factors: Params, hidden: jnp.ndarray, width: int) -> jnp.ndarray:
    """`hidden` `[..., F]` (estimated down-projection inputs, 0 where not wanted) times the
    sketch's 4-bit down projection of `width` (D) outputs: `[..., D]`."""
    with jax.named_scope("sketch_rest"):
        # Scaled before the barrier, so that the multiply fuses with whatever made `hidden`
        # (on a GPU: one kernel fewer per layer-step).
        weighted = hidden * factors["down_scales"].astype(hidden.dtype)  # [..., F]
        packed, weighted = jax.lax.optimization_barrier((factors["down"], weighted))  # as in sketch_estimate
        low, high = unpack(packed, weighted.dtype)  # [ceil(D / 2), F] each
        return jnp.concatenate([times_rows(weighted, low), times_rows(weighted, high)], axis=-1)[..., :width]  # [..., D]
