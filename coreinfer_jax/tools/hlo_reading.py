"""Reading XLA's optimized HLO text: what the body of a while loop (the decode loop) writes
and reads at every iteration. Used by `tools.gpu_compile` on programs compiled for a GPU
without one; plain text parsing, so it reads any backend's `compiled.as_text()`."""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

import numpy as np

# A buffer of at least this many bytes written inside the decode loop is a copy of weights:
# a step's activations, logits and one layer's cache update are far smaller at batch 1.
WEIGHT_SIZED = 1 << 20


@dataclasses.dataclass(frozen=True)
class Write:
    """One buffer a loop body writes: the instruction, its op (a fusion's kind and fused root),
    shape text and bytes."""

    name: str
    op: str
    shape: str
    nbytes: int


_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b([a-z]+[0-9]+)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
# Ops that launch nothing: they name buffers or hold other computations.
_NO_KERNEL = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
              "after-all", "partition-id", "replica-id"}
# ... and the ones that write nothing new either (an in-place update of a loop-carried buffer).
_NOT_WRITES = _NO_KERNEL | {"dynamic-update-slice"}


def _bytes(shape: str) -> int:
    return sum(_ITEMSIZE.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
               for t, dims in _ARRAY.findall(shape))


def _computations(hlo: str) -> dict[str, list[str]]:
    """Each computation's instruction lines, by name."""
    out, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if head and line.rstrip().endswith("{"):
            name = head.group(1)
            out[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None and line.strip():
            out[name].append(line)
    return out


def _root_op(lines: list[str]) -> str:
    root = next(line for line in lines if line.lstrip().startswith("ROOT "))
    return _INSTRUCTION.match(root).group(3)


def _loop_instructions(hlo: str, skip: set[str] = _NOT_WRITES,
                       ) -> Iterator[tuple[dict[str, list[str]], dict[str, str], str, str, str, str]]:
    """`(computations, shapes of the instruction's computation, name, shape, op, rest of line)`
    of each instruction in the bodies of the while loops of the optimized `hlo` text and in
    the computations they call (not fused ones); fusions' ops are "fusion KIND ROOT_OP", and
    instructions whose op is in `skip` are left out."""
    comps = _computations(hlo)
    todo = [m for line in hlo.splitlines() for m in re.findall(r"\bbody=%(\S+?)[,\s]", line + " ")]
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        parsed = [m.groups() for m in map(_INSTRUCTION.match, comps[name]) if m]
        shapes = {inst: shape for inst, shape, _, _ in parsed}
        for inst, shape, op, rest in parsed:
            todo += re.findall(r"(?:body|to_apply|condition)=%([^,\s}]+)", rest)
            for branches in re.findall(r"branch_computations=\{([^}]*)\}", rest):
                todo += [b.strip().lstrip("%") for b in branches.split(",")]
            if op == "fusion":
                called = re.search(r"calls=%([^,\s}]+)", rest).group(1)
                kind = re.search(r"kind=(\w+)", rest).group(1)
                op = f"fusion {kind} {_root_op(comps[called])}"
            elif op in skip:
                continue
            yield comps, shapes, inst, shape, op, rest


def loop_writes(hlo: str, min_bytes: int = WEIGHT_SIZED) -> list[Write]:
    """Buffers of at least `min_bytes` that the decode loop's body writes at every iteration
    (`_loop_instructions`). A fusion rooted in a dynamic-update-slice updates its operand in
    place (the KV cache) and is not counted."""
    return [Write(inst, op, shape.split("{")[0] if shape[0] != "(" else shape, _bytes(shape))
            for _, _, inst, shape, op, _ in _loop_instructions(hlo)
            if not op.endswith("dynamic-update-slice") and _bytes(shape) >= min_bytes]


def loop_kernels(hlo: str) -> list[str]:
    """What the decode loop's body launches per iteration, in schedule order: the op of each
    instruction that runs on the device (a fusion, as "fusion KIND ROOT_OP", a library call,
    a copy, a sort). At batch 1 every kernel but the products is small, so their number is
    what a step spends outside reading weights."""
    return [op for *_, op, _ in _loop_instructions(hlo, skip=_NO_KERNEL)]


def loop_read_bytes(hlo: str) -> int:
    """Bytes the decode loop's body reads per iteration: each kernel's operands, except that
    an operand a fusion only gathers or slices from counts as the rows it takes (the hybrid's
    per-token rows are read where they lie), and in-place cache writes read nothing.

    XLA's own cost analysis reports nothing for a deviceless GPU compile (and on the CPU it
    counts each fused op's traffic, several times the weights), so the count is made here."""
    total = 0
    for comps, shapes, _, _, op, rest in _loop_instructions(hlo):
        if op.endswith("dynamic-update-slice"):
            continue
        operands = re.findall(r"%([^,\s)]+)", rest.split(")", 1)[0])
        fused = comps.get(m.group(1)) if op.startswith("fusion") and (m := re.search(r"calls=%([^,\s}]+)", rest)) else None
        for i, name in enumerate(operands):
            taken = _rows_taken(fused, i) if fused is not None else None
            total += _bytes(shapes.get(name, "")) if taken is None else taken
    return total


def _rows_taken(fused: list[str], index: int) -> int | None:
    """Bytes a fused computation takes of its parameter `index` when it only gathers or
    slices from it, else None."""
    param = next((m.group(1) for m in map(_INSTRUCTION.match, fused)
                  if m and m.group(3) == "parameter" and m.group(4).startswith(f"{index})")), None)
    users = [m for m in map(_INSTRUCTION.match, fused)
             if m and re.search(rf"%{re.escape(param)}[,)]", m.group(4).split(")", 1)[0] + ")")] if param else []
    if not users or any(u.group(3) not in ("gather", "dynamic-slice", "slice") or
                        u.group(4).split(",")[0].split(")")[0].strip() != f"%{param}" for u in users):
        return None
    return sum(_bytes(u.group(2)) for u in users)
