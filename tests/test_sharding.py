"""The same training steps on 1 CPU device and on 8 simulated devices in three mesh shapes agree.

The 8-device runs need XLA's host-platform device count (and enough XLA:CPU threads, see
`sharding.CPU_THREADS_PER_DEVICE`) set before JAX starts, so they run in a subprocess (this module
as a script); the 1-device reference runs in the test process. The trainer runs the same pinned step
(under `jax.set_mesh`) as on TPU.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

MESHES = {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2)}


def sharded_config(mesh, shared: pathlib.Path):
    """The small demo; corpus and processor made once in `shared` for every run."""
    from mrrm_jax.data import synthetic
    from tests.test_train import small_config

    corpus = synthetic.write_corpus(shared / "data", num_images=16, num_videos=16, seed=0)
    data, fsdp, tensor = mesh
    # A large learning rate, so the later steps' losses depend visibly on the earlier updates (at 1e-2
    # the 4 losses spanned only 5e-5 relative, under the tolerance below; at 5e-2 the tensor-parallel
    # mesh's step-4 gradient norm drifted 4e-4 from one device: rounding amplified by the large steps).
    return small_config(**{"mesh": dict(data=data, fsdp=fsdp, tensor=tensor), "train.rows_per_step": 8,
                           "train.num_steps": 4, "train.learning_rate": 2e-2, "data.train": str(corpus),
                           "data.eval": "", "data.num_workers": 0, "processor.dir": str(shared / "processor"),
                           "checkpoint.every_steps": 100})


def run(workdir: pathlib.Path, mesh) -> dict[int, list[float]]:
    """{step: [loss, gradient norm]}."""
    from mrrm_jax.training import spec as run_spec
    from mrrm_jax.training import trainer

    trainer.train(run_spec.parse(sharded_config(mesh, workdir.parent)), workdir)
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: [m["loss"], m["grad_norm"]] for m in lines if m["kind"] == "train"}


def pallas_on_rows_errors() -> list[float]:
    """Relative errors of the attention loss and its q/k/v gradients: Pallas kernel per device's rows
    on a (2, 4, 1) mesh vs the same kernel on one device (the kernel itself is tested against the
    dense reference in test_attention.py)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mrrm_jax.core import sharding
    from mrrm_jax.models.attention import segment_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(8, 256, heads, 32)), jnp.float32) for heads in (4, 2, 2))
    segments = jnp.asarray(np.repeat([[1] * 100 + [2] * 100 + [0] * 56], 8, 0), jnp.int32)
    vision = jnp.asarray(rng.random((8, 256)) < 0.3)
    loss = jax.jit(jax.value_and_grad(lambda *qkv: (segment_attention(*qkv, segments, vision, "pallas") ** 2).sum(),
                                      argnums=(0, 1, 2)))
    reference = jax.tree.leaves(loss(q, k, v))
    with jax.set_mesh(sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})):
        on_rows = jax.tree.leaves(loss(q, k, v))
    return [float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(on_rows, reference)]


@pytest.mark.slow
def test_losses_match_across_meshes(tmp_path):
    from configs import demo
    from mrrm_jax.training import spec as run_spec
    from mrrm_jax.training import data as training_data

    training_data.open_processor(run_spec.parse(demo.get_config()).processor, "", tmp_path)  # writes tmp_path/processor once
    reference = run(tmp_path / "one_device", (1, 1, 1))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PJRT_NPROC": "32"}  # enough XLA:CPU threads for 8 devices' collectives (sharding.make_mesh)
    result = subprocess.run([sys.executable, "-m", "tests.test_sharding", str(tmp_path)], env=env,
                            cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(sharded) == set(MESHES) | {"pallas_on_rows", "too_few_threads"}
    assert "PJRT_NPROC=32" in sharded.pop("too_few_threads")
    # The Pallas kernel under shard_map (sharding.map_rows), value and gradients, vs one device.
    assert all(error <= 1e-4 for error in sharded.pop("pallas_on_rows")), "pallas_on_rows"
    # The steps do change the losses, by more than the tolerance below (about 5e-4 relative by step 4).
    losses = [loss for loss, _ in reference.values()]
    assert max(losses) - min(losses) > 1e-4 * max(losses), losses
    for name, got in sharded.items():
        for step, expected in reference.items():
            assert got[str(step)] == pytest.approx(expected, rel=1e-4), (name, step)


if __name__ == "__main__":
    import jax
    from absl import flags

    from mrrm_jax.core import sharding

    flags.FLAGS.mark_as_parsed()
    assert jax.device_count() == 8, jax.devices()
    root = pathlib.Path(sys.argv[1])
    results = {name: run(root / name, mesh) for name, mesh in MESHES.items()}
    results["pallas_on_rows"] = pallas_on_rows_errors()
    os.environ["PJRT_NPROC"] = "16"  # read when a mesh is made: a mesh that could deadlock is refused
    with pytest.raises(ValueError) as too_few:
        sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    results["too_few_threads"] = str(too_few.value)
    print(json.dumps(results))
