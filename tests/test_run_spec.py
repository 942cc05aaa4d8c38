"""The run spec: every config check is a ConfigError that names the key, from the library and from the CLI."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import types

import pytest

from configs import demo
from mrrm_jax.training import spec as run_spec
from tests.test_train import small_config

REPO = pathlib.Path(__file__).resolve().parents[1]

# (--config.key=value flags, what the error must say); each breaks the demo config in one way.
BROKEN = [
    ({"budget.max_tokens": 1024}, "budget.max_tokens=1024 exceeds packing.row_tokens=512"),
    ({"budget.max_vision_tokens": 400}, "budget.max_vision_tokens=400 exceeds packing.row_pooled=160"),
    ({"packing.max_responses": 1}, "packing.max_responses=1: an example has 2 responses or more"),
    ({"train.objective": "listwise"}, r"train.objective='listwise': expected one of \('cross_entropy', 'plackett_luce'\)"),
    ({"model.type": "llava"}, r"model.type='llava': expected one of \['molmo2'"),
    ({"model.attention": "flash"}, "model.attention='flash': expected one of"),
    ({"model.remat": "some"}, "model.remat='some': expected one of"),
    ({"model.dtype": "float33"}, "model.dtype='float33' is not a dtype name"),
    ({"train.grad_accum": 3}, "train.rows_per_step=4 is not a multiple of train.grad_accum=3"),
    ({"eval.controls": ("black", "grey")}, r"eval.controls has \['grey'\]"),
    ({"head.pooling": "middle"}, "head: pooling='middle': expected one of"),
    ({"log_every": 0}, "log_every=0 must be at least 1"),
    ({"data.train": ""}, "data.train is empty"),
    ({"data.mixture": (("/prepared/a", 1.0),)}, "data.train='synthetic' and data.mixture are both set"),
    ({"data.train": "", "data.mixture": (("/prepared/a", 0.0),)}, r"data.mixture entry \('/prepared/a', 0.0\)"),
    ({"data.train": "", "data.mixture": (("/prepared/a", 1.0),), "data.num_epochs": 3},
     "data.num_epochs must be -1"),
]


def _config(overrides: dict):
    return small_config(**overrides)


@pytest.mark.parametrize("overrides, message", BROKEN, ids=[next(iter(o)) for o, _ in BROKEN])
def test_each_broken_key_is_a_config_error_naming_it(overrides, message):
    with pytest.raises(run_spec.ConfigError, match=message):
        run_spec.parse(_config(overrides))


def test_a_preset_of_another_backbone_is_refused():
    with pytest.raises(run_spec.ConfigError, match=r"model.preset='qwen3_vl_4b': expected one of \('molmo2_4b'"):
        run_spec.parse(_config({"model.preset": "qwen3_vl_4b"}), training=False)


def test_the_demo_parses_into_its_parts():
    spec = run_spec.parse(demo.get_config())
    assert spec.lora is None and spec.head.pooling == "response_mean" and spec.model.text.num_layers == 3
    assert spec.row.row_tokens == 512 and spec.micro_rows == 4 and spec.data.num_epochs is None
    assert "train.learning_rate" in spec.fingerprint and "train.num_steps" not in spec.fingerprint


def test_rows_must_divide_over_processes_and_devices():
    spec = run_spec.parse(demo.get_config())
    with pytest.raises(run_spec.ConfigError, match="train.rows_per_step=4 does not split over 3 processes"):
        run_spec.check_mesh(spec, types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1}), process_count=3)
    run_spec.check_mesh(spec, types.SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 1}), process_count=2)
    with pytest.raises(run_spec.ConfigError, match="must be a multiple of data x fsdp x grad_accum = 8"):
        run_spec.check_mesh(spec, types.SimpleNamespace(shape={"data": 4, "fsdp": 2, "tensor": 1}), process_count=1)


def test_a_row_without_room_for_one_image_or_one_video_is_a_config_error():
    """Checked once the processor is loaded: its max_crops is in its files, not in the config."""
    spec = run_spec.parse(demo.get_config())
    processor = lambda max_crops: types.SimpleNamespace(options=types.SimpleNamespace(max_crops=max_crops))
    run_spec.check_row_media(spec, processor(8))
    with pytest.raises(run_spec.ConfigError, match="packing.row_crops=40 holds neither an image of the processor's "
                                                   "max_crops=40 .* raise row_crops to 41"):
        run_spec.check_row_media(spec, processor(40))
    with pytest.raises(run_spec.ConfigError, match="budget.max_frames=64"):
        run_spec.check_row_media(run_spec.parse(_config({"budget.max_frames": 64})), processor(1))


def test_the_cli_reports_a_config_error_in_one_line(tmp_path):
    """A row, a name and a data error through `python -m mrrm_jax.train` (side by side); every ConfigError
    takes that same path (parsed before JAX starts, one `error:` line)."""
    runs = []
    for number, (overrides, message) in enumerate(BROKEN[i] for i in (0, 4, 11)):
        flags = [f"--config.{key}={value!r}" if isinstance(value, tuple) else f"--config.{key}={value}"
                 for key, value in overrides.items()]
        workdir = tmp_path / str(number)
        runs.append((message, workdir, subprocess.Popen(
            [sys.executable, "-m", "mrrm_jax.train", "--config=configs/demo.py", *flags, f"--workdir={workdir}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for message, workdir, process in runs:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 1, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
        assert re.search(message, lines[0]), lines[0]
        assert not workdir.exists()  # refused before anything was written
