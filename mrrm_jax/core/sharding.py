"""The device mesh and how parameters, optimizer state and batches are laid out on it.

Mesh axes are ('data', 'fsdp', 'tensor'). Parameters get logical axes from their path (a kernel
maps the residual stream "embed" to a hidden "mlp" axis, or back); `LOGICAL_RULES` maps logical
axes to mesh axes: "embed" over 'fsdp' (the frozen base is sharded FSDP-style and gathered layer by
layer inside the scan), "mlp" / "vocab" over 'tensor'. A dimension that a mesh axis does not divide
stays replicated. Batches shard their row axis over ('data', 'fsdp').
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mrrm_jax.core import tree_paths

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_RULES = {"embed": "fsdp", "mlp": "tensor", "vocab": "tensor", "batch": ("data", "fsdp"), None: None}

# XLA:CPU runs all local devices' collectives on one shared thread pool (PJRT_NPROC or NPROC threads,
# else one per core), and a collective holds its thread until every participant has arrived. Devices
# reach independent collectives in different orders, so with too few threads all of them can be
# waiting at once: a silent deadlock. Measured with the trainer's step on 8 simulated devices, mesh
# (2, 4, 1): 2 and 8 threads deadlock, 16 and 32 do not. We ask for twice the least that worked.
CPU_THREADS_PER_DEVICE = 4

# (path regex, logical axes of the last two dims); leading (stacked layer) axes stay unsharded.
_MATRIX_AXES = (
    (r".*embed_tokens/embedding", ("vocab", "embed")),
    (r".*lm_head/kernel", ("embed", "vocab")),
    (r".*(o_proj|down_proj|fc2|attn/proj)/kernel", ("mlp", "embed")),  # back into the residual stream
    (r"(language_model|vision_tower|multi_modal_projector|visual)/.*kernel", ("embed", "mlp")),
)


def make_mesh(shape: dict, devices=None) -> Mesh:
    """`shape`: {'data': n, 'fsdp': n, 'tensor': n}; one entry may be -1 (the remaining devices)."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    sizes = [int(shape[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(shape)}: at most one axis may be -1")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        if devices.size % known:
            raise ValueError(f"mesh {dict(shape)} does not divide {devices.size} devices")
        sizes[sizes.index(-1)] = devices.size // known
    if int(np.prod(sizes)) != devices.size:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"there are {devices.size}")
    _check_cpu_threads(devices)
    return Mesh(devices.reshape(sizes), MESH_AXES)


def _check_cpu_threads(devices: np.ndarray) -> None:
    """Refuses a CPU mesh whose collectives could deadlock (see `CPU_THREADS_PER_DEVICE`)."""
    local = [d for d in devices.flat if d.platform == "cpu" and d.process_index == jax.process_index()]
    if len(local) < 2:
        return
    threads = next((int(os.environ[k]) for k in ("PJRT_NPROC", "NPROC") if os.environ.get(k, "").isdigit()),
                   len(os.sched_getaffinity(0)))
    needed = CPU_THREADS_PER_DEVICE * len(local)
    if threads < needed:
        raise ValueError(f"a mesh of {len(local)} CPU devices gets {threads} XLA threads; its collectives can "
                         f"deadlock with fewer than {needed}: start the process with PJRT_NPROC={needed}")


def _mesh_axis(mesh: Mesh, logical: str | None, size: int):
    axis = LOGICAL_RULES[logical]
    names = (axis,) if isinstance(axis, str) else axis or ()
    ways = int(np.prod([mesh.shape[n] for n in names]))
    return axis if axis is not None and size % ways == 0 else None


def matrix_axes(path: str) -> tuple[str, str] | None:
    """Logical axes of the last two dims of a parameter (None: replicate, e.g. norms, biases, head)."""
    for pattern, axes in _MATRIX_AXES:
        if re.fullmatch(pattern, path):
            return axes
    return None


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec of a parameter, or of a LoRA factor `path/kernel/{a,b}` (rank axis replicated)."""
    factor = re.fullmatch(r"(.*)/([ab])", path)
    axes = matrix_axes(factor.group(1) if factor else path)
    if axes is None or len(shape) < 2:
        return P()
    if factor:  # a: [in, rank], b: [rank, out]
        axes = (axes[0], None) if factor.group(2) == "a" else (None, axes[1])
    lead = [None] * (len(shape) - 2)
    return P(*lead, *(_mesh_axis(mesh, a, s) for a, s in zip(axes, shape[-2:])))


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs by their paths: parameters, LoRA
    factors and optimizer states alike (an Adam moment is laid out like its parameter).

    Paths are read from the first model part on ("opt/0/mu/lora/language_model|...|kernel/a"); LoRA
    factors are keyed by their kernel's path with "/" or "|" joins.
    """
    def spec(key_path, leaf):
        path = tree_paths.name(key_path).replace("|", "/")
        path = re.sub(r"^.*?(?=(language_model|vision_tower|multi_modal_projector|visual|lm_head)/)", "", path)
        return NamedSharding(mesh, param_spec(path, leaf.shape, mesh))
    return jax.tree_util.tree_map_with_path(spec, tree)


def rows_split(mesh, *arrays) -> bool:
    """Whether a mesh is set and its batch axes divide every array's leading (row) axis."""
    if mesh.empty:
        return False
    ways = int(np.prod([mesh.shape[a] for a in LOGICAL_RULES["batch"]]))
    return all(a.shape[0] % ways == 0 for a in arrays)


def constrain_rows(x: jax.Array) -> jax.Array:
    """Pin an activation's leading (row or crop) axis to the batch mesh axes, when a mesh is set
    (`jax.set_mesh`, as the trainer and the AOT tool do); a no-op otherwise.

    Without it XLA partitions the layers like the FSDP-sharded weights, along the hidden axis, and
    keeps every activation whole on every device: per-device memory then grows with the mesh (the
    Molmo2-4B step needed 34 GiB per v4 core at fsdp 8 instead of a few).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not rows_split(mesh, x):
        return x
    return jax.lax.with_sharding_constraint(x, P(LOGICAL_RULES["batch"]))


def map_rows(fn):
    """`fn` run on each device's own rows (`shard_map` over the batch axes) when a mesh is set.

    For a computation XLA cannot partition, such as a Pallas kernel: left to XLA, every device would
    gather every row (the 4B step held the whole batch's q, k and v on each device).
    """
    def on_rows(*args):
        mesh = jax.sharding.get_abstract_mesh()
        if not rows_split(mesh, *args):
            return fn(*args)
        axes = LOGICAL_RULES["batch"]
        return jax.shard_map(fn, mesh=mesh, in_specs=P(axes), out_specs=P(axes), check_vma=False)(*args)

    return on_rows


def batch_sharding(mesh: Mesh, ndim: int, leading: int = 0) -> NamedSharding:
    """Rows over ('data', 'fsdp'); `leading` unsharded axes before the row axis (e.g. micro-steps)."""
    return NamedSharding(mesh, P(*([None] * leading), LOGICAL_RULES["batch"], *([None] * (ndim - leading - 1))))
