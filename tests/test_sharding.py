"""The same training steps on 1 CPU device and on 8 simulated devices in three mesh shapes agree.

The 8-device runs need XLA's host-platform device count set before JAX starts, so they run in a
subprocess (this module as a script); the 1-device reference runs in the test process.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

MESHES = {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2)}


def sharded_config(mesh):
    from tests.test_train import small_config

    data, fsdp, tensor = mesh
    return small_config(**{"mesh": dict(data=data, fsdp=fsdp, tensor=tensor), "train.rows_per_step": 8,
                           "train.num_steps": 3, "data.eval": "", "checkpoint.every_steps": 100})


def run(workdir: pathlib.Path, mesh) -> dict[int, float]:
    from mrrm_jax import trainer
    from tests.test_train import losses

    trainer.train(sharded_config(mesh), workdir)
    return losses(workdir)


@pytest.mark.slow
def test_losses_match_across_meshes(tmp_path):
    reference = run(tmp_path / "one_device", (1, 1, 1))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "tests.test_sharding", str(tmp_path)], env=env,
                            cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(sharded) == set(MESHES)
    for name, got in sharded.items():
        for step, loss in reference.items():
            assert got[str(step)] == pytest.approx(loss, rel=2e-5), (name, step)


if __name__ == "__main__":
    import jax

    assert jax.device_count() == 8, jax.devices()
    root = pathlib.Path(sys.argv[1])
    print(json.dumps({name: run(root / name, mesh) for name, mesh in MESHES.items()}))
