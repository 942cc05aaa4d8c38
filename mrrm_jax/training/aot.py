"""Ahead-of-time compilation of the real train step: for a TPU slice from any host (tools/aot_compile.py),
and for `model.remat="auto"`, which picks the rematerialisation policy from XLA's memory plan.

Parameters, optimizer state and the batch are abstract (shapes, dtypes, shardings), so neither a TPU
nor weights are needed, only libtpu.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from mrrm_jax.core import sharding
from mrrm_jax.training import step
from mrrm_jax.training.spec import ConfigError, RunSpec, check_mesh

log = logging.getLogger(__name__)

# HBM per device that XLA lets a program use, GiB, as its out-of-memory errors name it.
HBM_GIB = {"TPU v4": 30.75, "TPU v5 lite": 15.75, "TPU v5": 95.74}
# A v4 chip's two TensorCores run as one device ("megacore"), as JAX presents them on a real v4 slice;
# a topology made on a CPU host would otherwise list each core as a device with half the chip's HBM.
CHIP_CONFIG = {"v4": "megacore"}


def abstract_step(spec: RunSpec, mesh):
    """(jitted train step, abstract arguments) for `spec` on `mesh`."""
    shard = lambda tree: jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                      tree, sharding.tree_shardings(tree, mesh))
    base = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(spec.model.param_dtype)),
                        step.abstract_base(spec.model))
    tx = step.optimizer(spec)
    state = shard(jax.eval_shape(lambda b: step.init_state(spec, b, tx), base))
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), leading=1))
             for k, (shape, dtype) in step.batch_shapes(spec).items()}
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                               sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    step_fn = jax.jit(functools.partial(step.train_step, step.model(spec), tx), donate_argnums=(0,))
    return step_fn, (state, shard(base), batch, rng)


@dataclasses.dataclass
class Report:
    topology: str
    chips: int
    kind: str
    argument_gib: float
    output_gib: float
    alias_gib: float
    temp_gib: float
    flops: float
    hbm_gib: float | None

    @property
    def total_gib(self) -> float:
        return self.argument_gib + self.output_gib - self.alias_gib + self.temp_gib

    @property
    def fits(self) -> bool:
        return self.hbm_gib is not None and self.total_gib <= self.hbm_gib


# Remat policies from the least recomputation to the most (`models/decoder.py`): "auto" takes the first
# whose compiled step fits. "dots" keeps every matmul output, "dots_no_batch" those without a batch axis
# (the weights' products), "full" only the layer inputs.
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")
# Device memory "auto" leaves outside XLA's plan: the runtime's own buffers, the input pipeline's
# transfers, and the plan's error.
REMAT_MARGIN = 0.1


def planned_bytes(spec: RunSpec, devices) -> int | None:
    """Per-device bytes XLA plans for the step (arguments + outputs - donated + temporaries); None when
    the compiler refuses it for memory (TPU compiles check the chip's HBM themselves)."""
    try:
        memory = _compile(spec, devices).memory_analysis()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return None
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)


def device_memory_bytes(spec: RunSpec, device) -> int:
    """The memory "auto" plans against: `model.remat_budget_gib`, else a TPU chip's HBM (`HBM_GIB`; a
    topology's devices report no memory), else the device's allocator limit (GPUs)."""
    if spec.remat_budget_gib:
        return int(spec.remat_budget_gib * 2**30)
    if device.device_kind in HBM_GIB:
        return int(HBM_GIB[device.device_kind] * 2**30)
    stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    raise ConfigError(f"model.remat='auto' needs the device's memory, and a {device.device_kind!r} device reports "
                      "none: set model.remat_budget_gib")


def resolve_remat(spec: RunSpec, devices) -> tuple[RunSpec, dict[str, int | None]]:
    """`spec` with `model.remat="auto"` replaced by the first of `REMAT_ORDER` whose step fits the device
    with `REMAT_MARGIN` to spare, and the plan: policy -> planned bytes per device (None: refused), for
    the policies tried. No policy fitting is a `ConfigError` with the plan."""
    budget = (1 - REMAT_MARGIN) * device_memory_bytes(spec, devices[0])
    plan = {}
    gib = lambda n: "refused" if n is None else f"{n / 2**30:.2f} GiB"
    for policy in REMAT_ORDER:
        candidate = dataclasses.replace(spec, model=spec.model.replace(remat=policy))
        plan[policy] = planned_bytes(candidate, devices)
        if plan[policy] is not None and plan[policy] <= budget:
            log.info("model.remat='auto': %s (per device, of %s usable: %s)", policy, gib(budget),
                     ", ".join(f"{p} {gib(b)}" for p, b in plan.items()))
            return candidate, plan
    raise ConfigError(f"model.remat='auto': no policy's step fits {gib(budget)} per device (the device's memory "
                      f"less {REMAT_MARGIN:.0%}): " + ", ".join(f"{p} {gib(b)}" for p, b in plan.items()))


def topology_devices(topology: str):
    from jax.experimental import topologies

    chip_config = CHIP_CONFIG.get(topology.split(":")[0])
    return topologies.get_topology_desc(topology, "tpu", **({"chip_config_name": chip_config} if chip_config else {})).devices


# For counting only. At larger meshes the TPU compiler rewrites an all-gather or reduce-scatter that feeds a
# matmul into a loop of collective-permutes overlapped with partial matmuls ("windowed einsum"); XLA's cost
# analysis, and `collective_bytes`, see a loop body once, so they would count one step of it (measured on
# Molmo2-4B at 2/2 layers on v5p:2x2x4: 76 loops, 2.14e13 FLOPs and 0.32 GiB gathered per chip with it,
# 11 loops, 3.51e13 and 1.06 GiB without). The counting compiles turn it off: the same math and the same
# bytes moved, each collective whole.
COUNTING_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def _compile(spec: RunSpec, devices, compiler_options: dict | None = None):
    mesh = sharding.make_mesh(spec.mesh, devices)
    check_mesh(spec, mesh, 1)  # compiled for the slice as one program
    step_fn, args = abstract_step(spec, mesh)
    with jax.set_mesh(mesh):  # as in training: activations pinned to the batch axes (constrain_rows)
        return step_fn.lower(*args).compile(compiler_options)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost).get("flops", float("nan"))


def compile_for(spec: RunSpec, topology: str) -> Report:
    """Per-device memory of the real step; `flops` as XLA counts them: each loop body (a layer stack's
    scan, the micro-step loop) once."""
    devices = topology_devices(topology)
    compiled = _compile(spec, devices)
    memory = compiled.memory_analysis()
    gib = lambda n: n / 2**30
    kind = devices[0].device_kind
    return Report(topology, len(devices), kind, gib(memory.argument_size_in_bytes), gib(memory.output_size_in_bytes),
                  gib(memory.alias_size_in_bytes), gib(memory.temp_size_in_bytes), _flops(compiled),
                  HBM_GIB.get(kind))


# Collective opcodes of compiled HLO. An async pair (`all-gather-start` / `-done`) is counted at its -done,
# whose result is the collective's; an `async-start` wrapper calls a computation holding the plain op.
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (?P<type>.+?) (?P<op>" + "|".join(COLLECTIVES)
                         + r")(?P<part>-start|-done)?\(")
_ARRAY = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f(?:16|32|64))\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def collective_bytes(compiled) -> dict[str, int]:
    """Per device, the bytes of every collective's result in the compiled program, by opcode (each loop
    body counted once, as XLA's cost analysis counts FLOPs). The bytes a chip sends are about the result
    x (n-1)/n for an all-gather over n devices, the input x (n-1)/n for a reduce-scatter and twice the
    result x (n-1)/n for an all-reduce (ring algorithms)."""
    totals = dict.fromkeys(COLLECTIVES, 0)
    for line in compiled.as_text().splitlines():
        match = _COLLECTIVE.match(line)
        if match is not None and match["part"] != "-start":
            totals[match["op"]] += sum(_BYTES[dtype] * math.prod(int(n) for n in dims.split(",") if n)
                                       for dtype, dims in _ARRAY.findall(match["type"]))
    return totals


@dataclasses.dataclass(frozen=True)
class StepCosts:
    flops: float  # per device
    collective_bytes: dict[str, float]  # per device, by opcode (`collective_bytes`)


def step_costs(spec: RunSpec, topology: str) -> StepCosts:
    """FLOPs and collective bytes per device of one whole optimizer step: every layer and micro-step counted.

    XLA counts a loop body once, and compiling the full depth unrolled takes too long; but the layers
    of a stack are identical, so the step's FLOPs and collectives are linear in each stack's depth. Three shallow
    unrolled compiles (2/2, 3/2 and 2/3 ViT/LM layers) give the intercept and the cost of one more
    layer of each stack; times `grad_accum` micro-steps (the optimizer update, counted with each, is
    under 1e-6 of a micro-step). Depth 1 is avoided: a lone LM layer is also the first, whose backward
    needs no input gradient, and a lone ViT layer would serve every feature layer. Measured on the demo
    model, the extra layers' counts vary by ~0.3% (XLA's fusion choices), hence the test's tolerance.
    """
    devices, config = topology_devices(topology), spec.model

    def count(vision_layers: int, text_layers: int) -> np.ndarray:
        compiled = _compile(dataclasses.replace(spec, model=config.shallow(vision_layers, text_layers)), devices,
                            COUNTING_OPTIONS)
        return np.array([_flops(compiled), *collective_bytes(compiled).values()], np.float64)
    base = count(2, 2)
    per_vision_layer, per_text_layer = count(3, 2) - base, count(2, 3) - base
    one_micro_step = (base + (config.vision.num_layers - 2) * per_vision_layer
                      + (config.text.num_layers - 2) * per_text_layer)
    step = spec.train.grad_accum * one_micro_step
    return StepCosts(float(step[0]), dict(zip(COLLECTIVES, step[1:].tolist())))
