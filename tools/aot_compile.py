"""Compile the real train step of a config for a TPU slice, from a CPU host, and check that it fits.

    python tools/aot_compile.py --config=configs/molmo2_4b_v5p.py --topology=v5p:2x2x1

Needs libtpu (`pip install -e '.[tpu]'`); no TPU and no weights: parameters, optimizer state and
the batch are abstract (shapes, dtypes and shardings only). Prints the per-chip memory that XLA
plans (arguments, outputs, temporaries) against the chip's HBM and the step's FLOPs per chip, and
exits 1 if it does not fit. XLA's cost analysis counts a scanned layer once; `--unroll` compiles
every layer unrolled so the FLOPs are the whole step's (slower to compile).
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.experimental import topologies
from ml_collections import config_flags

from mrrm_jax import reward, sharding, trainer
from mrrm_jax.models.molmo2 import Molmo2

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file (configs/*.py)", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "e.g. v5p:2x2x1, v4:2x2x1, v5e:4x4")
_UNROLL = flags.DEFINE_bool("unroll", False, "unroll the layer scans so cost analysis counts every layer")

# HBM per chip, GiB.
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32}


def abstract_step(cfg, mesh, unroll: bool):
    """(jitted train step, abstract arguments) for `cfg` on `mesh`."""
    config = trainer.model_config(cfg)
    if unroll:
        config = config.replace(scan_unroll=max(config.text.num_layers, config.vision.num_layers))
    shard = lambda tree: jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                      tree, sharding.tree_shardings(tree, mesh))
    base = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(config.param_dtype)),
                        trainer.abstract_base(config))
    tx = trainer.optimizer(cfg)
    state = shard(jax.eval_shape(lambda b: trainer.init_state(cfg, config, b, tx), base))
    model = trainer.Model(Molmo2(config), reward.ValueHead(trainer.head_config(cfg)), trainer.lora_spec(cfg),
                          cfg.train.objective)
    micro = cfg.train.grad_accum
    rows = cfg.train.rows_per_step // micro
    p = cfg.packing
    shapes = {"tokens": (p.row_tokens,), "positions": (p.row_tokens,), "segment_ids": (p.row_tokens,),
              "crops": (p.row_crops, config.vision.num_patches, config.vision.patch_dim),
              "pooling": (p.row_pooled, p.pool_slots), "read_positions": (p.row_examples, p.max_responses),
              "response_starts": (p.row_examples, p.max_responses), "labels": (p.row_examples,)}
    batch = {k: jax.ShapeDtypeStruct((micro, rows, *s), jnp.float32 if k == "crops" else jnp.int32,
                                     sharding=sharding.batch_sharding(mesh, 2 + len(s), leading=1))
             for k, s in shapes.items()}
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                               sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    step = jax.jit(functools.partial(trainer.train_step, model, tx), donate_argnums=(0,))
    return step, (state, shard(base), batch, rng)


def main(argv) -> None:
    del argv
    cfg = _CONFIG.value
    devices = topologies.get_topology_desc(_TOPOLOGY.value, "tpu").devices
    mesh = sharding.make_mesh(cfg.mesh.to_dict(), devices)
    step, args = abstract_step(cfg, mesh, _UNROLL.value)
    compiled = step.lower(*args).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    kind = devices[0].device_kind
    hbm = HBM_GIB.get(kind)
    gib = lambda n: n / 2**30
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes \
        + memory.temp_size_in_bytes
    print(f"{_TOPOLOGY.value} ({len(devices)} x {kind}), mesh {dict(mesh.shape)}, "
          f"rows/step {cfg.train.rows_per_step} x {cfg.packing.row_tokens} tokens, grad_accum {cfg.train.grad_accum}")
    print(f"per chip: arguments {gib(memory.argument_size_in_bytes):.2f} GiB, outputs "
          f"{gib(memory.output_size_in_bytes):.2f} GiB (aliased {gib(memory.alias_size_in_bytes):.2f}), "
          f"temporaries {gib(memory.temp_size_in_bytes):.2f} GiB, total {gib(total):.2f} GiB of {hbm} GiB HBM")
    flops = cost.get("flops", float("nan"))
    note = "" if _UNROLL.value else " (scan bodies counted once; --unroll for the full step)"
    print(f"FLOPs per chip per step: {flops:.3e}{note}")
    if hbm is None:
        sys.exit(f"unknown HBM size for {kind!r}")
    if gib(total) > hbm:
        sys.exit(f"does not fit: {gib(total):.2f} GiB > {hbm} GiB")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main)
