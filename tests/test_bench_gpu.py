"""bench/gpu.py (the one-GPU benchmark) at tiny dimensions on CPU: every part runs and reports numbers.

The GPU machine it is written for has no grain, ml_collections, PyAV or tensorflow_datasets, so the run
here has them blocked (a `sitecustomize` in the children's path sets `sys.modules[name] = None`, which
makes `import name` fail and `importlib.util.find_spec(name)` answer None, as for a package that is not
installed). No timing is asserted.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ABSENT_ON_THE_GPU_MACHINE = ("grain", "ml_collections", "av", "tensorflow_datasets")


def _blocked_env(tmp_path: pathlib.Path) -> dict:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import sys\nfor name in {ABSENT_ON_THE_GPU_MACHINE!r}:\n    sys.modules[name] = None\n")
    path = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")


@pytest.mark.slow
def test_the_tiny_run_reports_every_part_without_the_missing_packages(tmp_path):
    env = _blocked_env(tmp_path)
    for name in ABSENT_ON_THE_GPU_MACHINE:  # the block works (these are installed here)
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, (name, probe.stderr[-500:])

    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    logs = "".join(p.read_text()[-3000:] for p in tmp_path.glob("gpu.*.log"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    assert set(parts) == {"ours_train", "ours_score", "ours_xla_flops", "torch_train", "torch_score"}
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part, logs)

    for name in ("ours_train", "torch_train"):
        for key in ("first_call_s", "median_s", "min_s", "tokens_per_s", "mfu", "model_tflops_per_step"):
            assert parts[name][key] > 0, (name, key)
    for name in ("ours_score", "torch_score"):
        for mode in ("multi", "single"):
            assert parts[name][mode]["groups_per_s"] > 0, (name, mode)
        assert parts[name]["multi_over_single"] > 0
    assert parts["ours_xla_flops"]["xla_flops"] > 0 and parts["ours_xla_flops"]["xla_over_executed"] > 0
    assert "ours (JAX)" in run.stdout and "PyTorch" in run.stdout  # the table was printed
