"""The Pallas kernel compiles for a real TPU from this CPU host (needs libtpu: `pip install -e '.[tpu]'`)."""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")


def compile_for_tpu(fn, arg_shapes, topology: str = "v5p:2x2x1"):
    """AOT-compile `fn` for one chip of `topology`; returns the compiled executable."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology, "tpu").devices
    mesh = Mesh(np.array(devices[:1]), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=replicated) for shape, dtype in arg_shapes]
    return jax.jit(fn).lower(*args).compile()


def test_segment_flash_attention_compiles_at_molmo2_4b_shapes():
    from mrrm_jax.models.segment_flash import segment_flash_attention

    seq_len, heads, kv_heads, head_dim = 8192, 32, 8, 128

    def forward_and_backward(q, k, v, segment_ids, is_vision):
        def loss(q, k, v):
            out = segment_flash_attention(q, k, v, segment_ids, is_vision, interpret=False)
            return jnp.sum(out.astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    compiled = compile_for_tpu(forward_and_backward, [
        ((1, seq_len, heads, head_dim), jnp.bfloat16), ((1, seq_len, kv_heads, head_dim), jnp.bfloat16),
        ((1, seq_len, kv_heads, head_dim), jnp.bfloat16), ((1, seq_len), jnp.int32), ((1, seq_len), jnp.bool_)])
    memory = compiled.memory_analysis()
    print(f"v5p: temp {memory.temp_size_in_bytes / 2**20:.0f} MiB, args {memory.argument_size_in_bytes / 2**20:.0f} MiB")
    assert memory.temp_size_in_bytes < 2**30


def test_the_train_step_compiles_for_a_tpu_slice():
    """tools/aot_compile.py's path on the demo model: sharded (fsdp x tensor), Pallas attention, bf16."""
    from configs import demo
    from mrrm_jax.training import aot
    from mrrm_jax.training import spec as run_spec

    cfg = demo.get_config()
    cfg.mesh = dict(data=1, fsdp=2, tensor=2)
    cfg.model.attention, cfg.model.dtype, cfg.model.param_dtype = "pallas", "bfloat16", "bfloat16"
    report = aot.compile_for(run_spec.parse(cfg), "v5p:2x2x1")
    assert report.chips == 4 and report.fits and report.flops > 0


@pytest.mark.slow
def test_step_costs_extrapolated_over_depth_match_the_unrolled_step():
    """aot.step_costs (three shallow compiles, linear in depth) == XLA's count of the whole step's FLOPs
    and the collectives' bytes compiled unrolled, on the demo model made deeper (4 ViT and 5 LM layers),
    with 2 micro-steps."""
    from configs import demo
    from mrrm_jax.training import aot
    from mrrm_jax.training import spec as run_spec

    cfg = demo.get_config()
    cfg.mesh = dict(data=1, fsdp=2, tensor=2)
    cfg.model.attention, cfg.model.dtype, cfg.model.param_dtype = "pallas", "bfloat16", "bfloat16"
    cfg.model.dims.vision.num_layers, cfg.model.dims.text.num_layers = 4, 5
    cfg.model.dims.adapter.feature_layers = (3, 1)
    cfg.train.grad_accum = 2
    spec = run_spec.parse(cfg)
    unrolled = aot._compile(dataclasses.replace(spec, model=spec.model.replace(scan_unroll=5)), aot.topology_devices("v5p:2x2x1"),
                            aot.COUNTING_OPTIONS)
    # XLA counts the micro-step loop's body once: one micro-step of every layer, plus the update.
    costs = aot.step_costs(spec, "v5p:2x2x1")
    np.testing.assert_allclose(costs.flops, 2 * aot._flops(unrolled), rtol=5e-3)
    whole = aot.collective_bytes(unrolled)
    assert whole["all-gather"] > 0  # FSDP gathers each layer's weights
    for op, n in whole.items():
        np.testing.assert_allclose(costs.collective_bytes[op], 2 * n, rtol=1e-2, atol=1024, err_msg=op)


def test_collective_bytes_of_a_hand_written_program():
    """An all-gather of f32[8, 128] (4 KiB) and an all-reduce of f32[16] (64 B) over 4 chips."""
    from jax.experimental import topologies

    from mrrm_jax.training import aot

    mesh = Mesh(np.array(topologies.get_topology_desc("v5p:2x2x1", "tpu").devices), ("x",))

    def program(x, y):
        gathered = jax.lax.with_sharding_constraint(x * 2, NamedSharding(mesh, PartitionSpec()))
        summed = jax.shard_map(lambda b: jax.lax.psum(b, "x"), mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec())(y)
        return gathered, summed
    compiled = jax.jit(program).lower(
        jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("x"))),
        jax.ShapeDtypeStruct((16,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))).compile()
    found = aot.collective_bytes(compiled)
    assert found["all-gather"] == 8 * 128 * 4 and found["all-reduce"] == 16 * 4, found
    assert found["reduce-scatter"] == found["all-to-all"] == found["collective-permute"] == 0
