"""Placing a model on a device mesh: one table of logical axes, one of logical -> mesh axes.

A mesh `DATAxTENSOR` has two axes: `data` splits the batch, `tensor` splits what dense tensor
parallelism splits (Megatron-style): attention heads (the columns of `w_q/w_k/w_v`, the rows
of `w_o`, the KV cache), FFN neurons (the rows of the neuron-major `[F, D]` matrices) and
the vocabulary (embedding and LM head rows). Each attention block and each FFN then ends in
one all-reduce over `tensor`, which XLA inserts from these placements; the jitted programs
themselves are unchanged. Everything else (norms, `b_down`, `b_o`) is replicated.

    mesh = make_mesh("1x4")                 # 4 devices, tensor-parallel
    shardings = param_shardings(cfg, mesh)  # a NamedSharding per parameter, same tree
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from coreinfer_jax.errors import CoreInferError
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import Params, is_shape, param_shapes

DATA, TENSOR = "data", "tensor"

# Each parameter's axes by name (the last key of its path; norms are "scale"/"bias").
LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", None), "lm_head": ("vocab", None),
    "pos_embed": (None, None), "project_in": (None, None), "project_out": (None, None),
    "w_q": (None, "heads"), "w_k": (None, "kv_heads"), "w_v": (None, "kv_heads"), "w_o": ("heads", None),
    "b_q": ("heads",), "b_k": ("kv_heads",), "b_v": ("kv_heads",), "b_o": (None,),
    "q_norm": (None,), "k_norm": (None,), "scale": (None,), "bias": (None,),
    "w_gate": ("neurons", None), "w_up": ("neurons", None), "w_down": ("neurons", None),
    "b_gate": ("neurons",), "b_up": ("neurons",), "b_down": (None,),
}
MESH_AXES = {"vocab": TENSOR, "heads": TENSOR, "kv_heads": TENSOR, "neurons": TENSOR, "batch": DATA}
# The KV cache `[B, Hkv, hd, S]`: batch over data, KV heads over tensor.
CACHE_AXES = ("batch", "kv_heads", None, None)


class MeshError(CoreInferError):
    """A mesh that the devices or the model cannot take."""


def parse_mesh(text: str) -> tuple[int, int]:
    """"2x4" -> (2, 4): data and tensor sizes."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise MeshError(f"mesh must be DATAxTENSOR with positive sizes, e.g. 1x4; got {text!r}")
    return int(parts[0]), int(parts[1])


def make_mesh(spec: str | tuple[int, int] | Mesh) -> Mesh:
    """A `(data, tensor)` mesh over the first `data * tensor` devices (all processes' devices)."""
    if isinstance(spec, Mesh):
        if tuple(spec.axis_names) != (DATA, TENSOR):
            raise MeshError(f"mesh axes must be ({DATA!r}, {TENSOR!r}), got {tuple(spec.axis_names)}")
        return spec
    data, tensor = parse_mesh(spec) if isinstance(spec, str) else spec
    devices = jax.devices()
    if data * tensor > len(devices):
        raise MeshError(f"mesh {data}x{tensor} needs {data * tensor} devices but {len(devices)} are available "
                        f"({devices[0].platform}); on CPU, set JAX_NUM_CPU_DEVICES before starting Python")
    return Mesh(np.array(devices[: data * tensor]).reshape(data, tensor), (DATA, TENSOR))


def check_model_fits(cfg: ModelConfig, mesh: Mesh) -> None:
    """Raise MeshError unless the tensor axis divides heads, KV heads and FFN neurons."""
    n = mesh.shape[TENSOR]
    for what, size in (("attention heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                       ("FFN neurons", cfg.intermediate_size)):
        if size % n:
            raise MeshError(f"tensor size {n} does not divide the model's {size} {what}; choose a tensor size "
                            f"that divides {cfg.num_heads} heads, {cfg.num_kv_heads} KV heads and "
                            f"{cfg.intermediate_size} neurons")


def spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of logical `axes`; an axis the mesh does not divide stays whole (the
    vocabulary of a tiny model; heads and neurons are checked by `check_model_fits`)."""
    out = []
    for name, size in zip(axes, shape):
        axis = MESH_AXES.get(name) if name else None
        out.append(axis if axis and size % mesh.shape[axis] == 0 else None)
    return P(*out)


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Params:
    """A `NamedSharding` per parameter (`param_shapes`' tree), from `LOGICAL_AXES`."""
    check_model_fits(cfg, mesh)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=is_shape)
    out = []
    for path, shape in leaves:
        name = str(getattr(path[-1], "key", path[-1]))
        out.append(NamedSharding(mesh, spec(LOGICAL_AXES[name], shape, mesh)))
    return jax.tree_util.tree_unflatten(treedef, out)


def place_params(params: Params, cfg: ModelConfig, mesh: Mesh) -> Params:
    """`params` moved onto `mesh` (each device receives only its shard)."""
    return jax.device_put(params, param_shardings(cfg, mesh))


def mesh_tensor_size() -> int:
    """The tensor axis's size in the current mesh (`jax.set_mesh`); 1 outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or TENSOR not in mesh.axis_names else mesh.shape[TENSOR]


def constrain_cache(x: Any) -> Any:
    """One layer's K or V cache `[B, Hkv, hd, S]` split by `CACHE_AXES` under the current mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or TENSOR not in mesh.axis_names:
        return x
    return jax.lax.with_sharding_constraint(x, spec(CACHE_AXES, x.shape, mesh))
