"""Where every parameter lives on a device mesh with `data`, `expert` and `model` axes.

One table (`KERNEL_RULES`) names the mesh axis of each dimension of every kernel's logical shape
[..., d_in, d_out]: stacked experts along `expert`, attention and dense-MLP kernels
tensor-parallel along `model` (Megatron style: q/k/v, gate/up split their outputs, o_proj and
down split their inputs), embeddings and norms replicated. A `CodebookWeight` is sharded like the
kernel it replaces: its packed codes [..., d_out, bytes] and centroids [..., d_out, groups, C]
take the kernel's expert, d_out and d_in axes (a laid-out one's planes and alpha, of the same
shapes, as they do: `cqjax.lay_out_bitplanes`). A dimension the mesh axis does not divide stays
replicated, so any model runs on any mesh (tiny test models included).

The MoE forward (`cqjax.moe`) and K-means (`cqjax.kmeans`) read the mesh from the context
(`with jax.set_mesh(mesh):`) and run experts where they are stored.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from cqjax.errors import CqjaxError

MESH_AXES = ("data", "expert", "model")

# (regex on the kernel's path, mesh axis of each dimension of [..., d_in, d_out]).
KERNEL_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"/moe/(gate_proj|up_proj|gate_up_proj|down_proj)$", ("expert", None, None)),
    (r"/attn/(q_proj|k_proj|v_proj)/kernel$", (None, "model")),
    (r"/attn/o_proj/kernel$", ("model", None)),
    (r"/mlp/(gate_proj|up_proj)/kernel$", (None, "model")),
    (r"/mlp/down_proj/kernel$", ("model", None)),
    (r"^lm_head/kernel$", (None, "model")),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Axis sizes; 0 derives one: `expert` = the largest divisor of the device count (over
  `model`) that divides the number of experts, `data` = the devices left."""

  data: int = 0
  expert: int = 0
  model: int = 1


def make_mesh(config: MeshConfig, num_experts: int, devices=None) -> jax.sharding.Mesh:
  """A `Mesh` over `devices` (default: all) with axes `MESH_AXES`."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if config.model < 1 or n % config.model:
    raise CqjaxError(f"MeshConfig.model={config.model} does not divide the {n} devices")
  expert = config.expert or math.gcd(n // config.model, num_experts)
  if num_experts % expert:
    raise CqjaxError(f"MeshConfig.expert={expert} does not divide the model's {num_experts} experts")
  data = config.data or n // (expert * config.model)
  if data * expert * config.model != n:
    raise CqjaxError(f"MeshConfig data={data} x expert={expert} x model={config.model} "
                     f"needs {data * expert * config.model} devices, {n} are given")
  return jax.make_mesh((data, expert, config.model), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def expert_axis_size() -> int:
  """Size of the context mesh's `expert` axis (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty or "expert" not in mesh.axis_names else mesh.shape["expert"]


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _kernel_axes(kernel_path: str, ndim: int) -> tuple[str | None, ...]:
  for pattern, axes in KERNEL_RULES:
    if re.search(pattern, kernel_path):
      return (None,) * (ndim - len(axes)) + axes
  return (None,) * ndim


def _leaf_spec(mesh, path: str, shape) -> P:
  """The spec of one array leaf: a dense kernel, or a CodebookWeight's packed / centroids (a laid-out
  one's planes / alpha)."""
  field = path.rsplit("/", 1)[-1]
  if field in ("packed", "planes"):  # [..., d_out, bytes] of a kernel [..., d_in, d_out]
    *lead, d_in, d_out = _kernel_axes(path.rsplit("/", 1)[0], len(shape))
    axes = (*lead, d_out, d_in)
  elif field in ("centroids", "alpha"):  # [..., d_out, groups, C]
    *lead, d_in, d_out = _kernel_axes(path.rsplit("/", 1)[0], len(shape) - 1)
    axes = (*lead, d_out, d_in, None)
  else:
    axes = _kernel_axes(path, len(shape))
  return P(*(a if a is not None and size % mesh.shape[a] == 0 else None for a, size in zip(axes, shape)))


def param_shardings(params, mesh: jax.sharding.Mesh):
  """A pytree like `params` (CodebookWeights included) of `NamedSharding`s from `KERNEL_RULES`."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  return jax.tree_util.tree_unflatten(
      treedef, [NamedSharding(mesh, _leaf_spec(mesh, _path_str(p), leaf.shape)) for p, leaf in flat])


def shard_params(params, mesh: jax.sharding.Mesh):
  """params placed on `mesh` as `param_shardings` says."""
  return jax.device_put(params, param_shardings(params, mesh))


def shard_batch(x: jax.Array) -> jax.Array:
  """x [n, ...] split along the context mesh's `data` axis (unchanged without a mesh, or where
  the axis does not divide n)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "data" not in mesh.axis_names or x.shape[0] % mesh.shape["data"]:
    return x
  return jax.lax.with_sharding_constraint(x, P("data"))
