"""One device mesh (``data``, ``fsdp``, ``tensor``) and one table of logical-axis rules.

Every parameter carries logical axis names (``("embed", "mlp")``); activations are constrained with names
such as ``("batch", "length", "act_embed")``. This module alone maps names to mesh axes, so changing the
parallelism layout means editing :data:`LOGICAL_RULES` and nothing else.

A dimension whose size does not divide the mesh axes it maps to is replicated instead, so tiny test models
and odd vocab sizes shard as far as they can; :func:`report_unsharded` logs every such parameter (which one,
which mesh axis) and can refuse them (``strict``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None for replicated)
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),  # flattened num_heads * head_dim
    ("kv_heads", "tensor"),  # flattened num_kv_heads * head_dim
    ("norm", None),
    ("positions", None),
    ("rel_buckets", None),
    ("lora_rank", None),
    ("head_out", None),  # reward / value head outputs
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
)
_RULES = dict(LOGICAL_RULES)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """Build a ``(data, fsdp, tensor)`` mesh. One axis may be -1: it takes the remaining devices.

    Works on 1 CPU, 8 fake CPU devices, a GPU host, or a multi-host TPU slice (``jax.devices()`` is global).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise ValueError(f"{n} devices cannot be split into data={data}, fsdp={fsdp}, tensor={tensor}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh data*fsdp*tensor = {math.prod(sizes)} but {n} devices are available")
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # non-TPU topologies or fake devices: plain reshape is fine
        arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def _axis_size(mesh: Mesh, mesh_axis: Any) -> int:
    if mesh_axis is None:
        return 1
    if isinstance(mesh_axis, str):
        return mesh.shape[mesh_axis]
    return math.prod(mesh.shape[a] for a in mesh_axis)


def logical_to_spec(
    logical_axes: Sequence[str | None] | None, mesh: Mesh, shape: Sequence[int] | None = None
) -> PartitionSpec:
    """Map logical names to a PartitionSpec; with ``shape``, non-dividing dimensions are replicated.

    A mesh axis is used at most once per array (the first dimension that claims it wins).
    """
    if logical_axes is None:
        return PartitionSpec()
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical_axes):
        if name is not None and name not in _RULES:
            raise KeyError(f"logical axis {name!r} has no rule in jaxrlhf.sharding.LOGICAL_RULES")
        mesh_axis = _RULES.get(name) if name is not None else None
        if mesh_axis is not None:
            axes = (mesh_axis,) if isinstance(mesh_axis, str) else tuple(mesh_axis)
            axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
            if shape is not None:
                # drop trailing axes until the product divides the dimension
                while axes and shape[i] % _axis_size(mesh, axes):
                    axes = axes[:-1]
            used.update(axes)
            mesh_axis = None if not axes else (axes[0] if len(axes) == 1 else axes)
        out.append(mesh_axis)
    return PartitionSpec(*out)


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def named_shardings(axes_tree: Any, mesh: Mesh, shapes_tree: Any | None = None) -> Any:
    """Tree of logical-axis tuples (+ optional tree of arrays / ShapeDtypeStructs) -> NamedShardings."""
    if shapes_tree is None:
        return jax.tree.map(
            lambda a: NamedSharding(mesh, logical_to_spec(a, mesh)), axes_tree, is_leaf=_is_axes
        )
    return jax.tree.map(
        lambda a, x: NamedSharding(
            mesh, logical_to_spec(a, mesh, np.shape(x) if not hasattr(x, "shape") else x.shape)
        ),
        axes_tree,
        shapes_tree,
        is_leaf=_is_axes,
    )


def unsharded_dims(axes_tree: Any, shapes_tree: Any, mesh: Mesh) -> list[str]:
    """``"path: dim i (size n, logical 'x') not split over mesh axis 'a' (size k)"`` for every parameter
    dimension whose mesh axes were dropped because the size does not divide them."""
    out = []
    flat_axes = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=_is_axes)[0]
    flat_shapes = jax.tree.leaves(shapes_tree)
    for (path, axes), x in zip(flat_axes, flat_shapes, strict=True):
        shape = tuple(x.shape)
        got = logical_to_spec(axes, mesh, shape)
        want = logical_to_spec(axes, mesh)
        for i, (g, w) in enumerate(zip(got, want, strict=False)):
            if w is not None and g != w:
                wanted = (w,) if isinstance(w, str) else tuple(w)
                have = () if g is None else ((g,) if isinstance(g, str) else tuple(g))
                lost = [a for a in wanted if a not in have]
                out.append(
                    f"{jax.tree_util.keystr(path)}: dim {i} (size {shape[i]}, logical {axes[i]!r}) not split "
                    f"over mesh axis {'/'.join(lost)} (size {_axis_size(mesh, tuple(lost))})"
                )
    return out


def report_unsharded(axes_tree: Any, shapes_tree: Any, mesh: Mesh, *, strict: bool = False) -> list[str]:
    """Log (or, with ``strict``, refuse) parameters that stay replicated along a mesh axis."""
    import logging

    found = unsharded_dims(axes_tree, shapes_tree, mesh)
    if found and strict:
        raise ValueError(
            f"{len(found)} parameter dimension(s) do not divide their mesh axes (train.mesh.strict=true): "
            + "; ".join(found[:8])
        )
    log = logging.getLogger("jaxrlhf.sharding")
    for line in found[:20]:
        log.warning("replicated instead of sharded: %s", line)
    if len(found) > 20:
        log.warning("... and %d more replicated dimensions", len(found) - 20)
    return found


def shard_params(params: Any, axes_tree: Any, mesh: Mesh) -> Any:
    """Place a params tree on the mesh according to its logical axes (no whole-array gather afterwards)."""
    shardings = named_shardings(axes_tree, mesh, params)
    return jax.tree.map(jax.device_put, params, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch-major array: leading dim over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Put a host-local batch (same on every process, single-host) onto the mesh, batch-sharded."""
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), batch)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names when a mesh is in context, else identity.

    The mesh comes from ``jax.set_mesh(mesh)`` / :func:`use_mesh` (jax >= 0.7) or the legacy ``with mesh:``.
    """
    mesh = current_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return x
    spec = logical_to_spec(logical_axes, mesh, x.shape)
    if isinstance(mesh, Mesh):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return jax.lax.with_sharding_constraint(x, spec)  # abstract mesh from jax.set_mesh: a bare spec suffices


def use_mesh(mesh: Mesh):
    """Context manager putting ``mesh`` in context for tracing and running (``jax.set_mesh``)."""
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    if hasattr(jax.sharding, "use_mesh"):
        return jax.sharding.use_mesh(mesh)
    return mesh


def current_mesh() -> Any:
    """The mesh in context (``jax.set_mesh`` / :func:`use_mesh`, or the legacy ``with mesh:``), else None."""
    get_abstract = getattr(jax.sharding, "get_abstract_mesh", None)
    if get_abstract is not None:
        m = get_abstract()
        return None if m is None or m.empty else m
    try:  # jax < 0.5: only the legacy ``with mesh:`` context exists
        from jax.interpreters import pxla

        m = pxla.thread_resources.env.physical_mesh
        return None if m.empty else m
    except Exception:
        return None


def is_fully_replicated(x: jax.Array) -> bool:
    return bool(x.sharding.is_fully_replicated)


def host_array(tree: Any) -> Any:
    """An array tree (possibly sharded over several hosts) as numpy on every process: arrays that are not
    fully addressable are gathered (``process_allgather``, every process must call this), others copied."""

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(jax.device_get(a))

    return jax.tree.map(one, tree)


def global_max(x: int) -> int:
    """The largest of every process's ``x`` (``x`` itself on one process); every process must call this."""
    if jax.process_count() == 1:
        return int(x)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(x))))
