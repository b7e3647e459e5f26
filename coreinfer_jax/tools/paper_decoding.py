"""The paper's PyTorch decoding, as its public reference runs it: `bench`'s row for "faster than
the paper's code", beside Transformers' dense row.

The reference swaps each sparse layer's FFN linears in a Transformers model for its own
module. Pre-fill (more than one token) runs them whole and picks the core neurons; from then
on, for the whole generation, each one multiplies by a copy of the core neurons' rows (gate,
up, `fc1` and its bias) or columns (down, `fc2`, whose bias stays whole), made once per
generation with an index-select. `core_neuron_linears` does the same with given core neurons:
`bench` hands it the ones this project's pre-fill picks for the same prompt by the same rule,
so both rows read the same FFN weights per token and only the decoding differs.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

# A layer's FFN linears, by Transformers' module names (Llama, Mistral, Qwen, Gemma 3: gate,
# up, down; Phi-3: gate and up as one; OPT: fc1, fc2).
FFN_LINEAR = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:mlp\.)?(gate_proj|up_proj|gate_up_proj|down_proj|fc1|fc2)$")
NEURON_INPUTS = ("down_proj", "fc2")  # the neurons are their input columns, not output rows


class CoreLinear(nn.Module):
    """One FFN linear of a sparse layer as the reference runs it: whole in pre-fill, which also
    copies out this generation's core rows (`columns`: input columns; the bias then stays whole),
    and from then on a product with that copy only."""

    def __init__(self, full: nn.Linear, neurons: torch.Tensor, columns: bool):
        super().__init__()
        self.full, self.columns = full, columns
        self.register_buffer("neurons", neurons, persistent=False)
        self.core_weight: torch.Tensor | None = None
        self.core_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, D_in]
        if x.shape[-2] > 1 or self.core_weight is None:  # pre-fill: whole, and the copy made
            self.core_weight = self.full.weight.index_select(1 if self.columns else 0, self.neurons)  # [K, D] / [D, K]
            bias = self.full.bias
            self.core_bias = bias if bias is None or self.columns else bias.index_select(0, self.neurons)
            return self.full(x)
        return nn.functional.linear(x, self.core_weight, self.core_bias)


@contextlib.contextmanager
def core_neuron_linears(model: nn.Module, core: Mapping[int, Sequence[int]]) -> Iterator[nn.Module]:
    """Within the block, `model` decodes as the reference does: in each layer of `core` (layer
    index -> its core neuron ids), the FFN linears are `CoreLinear`s. Put back on exit."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    layers: set[int] = set()
    try:
        for name, module in list(model.named_modules()):
            found = FFN_LINEAR.search(name)
            if found is None or int(found.group(1)) not in core:
                continue
            layer, kind = int(found.group(1)), found.group(2)
            ids = torch.as_tensor(list(core[layer]), dtype=torch.long, device=module.weight.device)  # [K]
            if kind == "gate_up_proj":  # [2F, D]: gate rows, then up rows
                ids = torch.cat([ids, ids + module.weight.shape[0] // 2])
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, CoreLinear(module, ids, columns=kind in NEURON_INPUTS))
            swapped.append((parent, attr, module))
            layers.add(layer)
        if set(core) - layers:
            raise ValueError(f"{type(model).__name__} has no FFN linears named like Transformers' in layers "
                             f"{sorted(set(core) - layers)}")
        yield model
    finally:
        for parent, attr, module in reversed(swapped):
            setattr(parent, attr, module)
