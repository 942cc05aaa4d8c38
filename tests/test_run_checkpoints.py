"""Run checkpoints: a damaged or half-written newest step falls back to the one before, never silently to scratch."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import grain
import jax
import jax.numpy as jnp
import pytest

from mrrm_jax.training.checkpoints import RunCheckpoints, UnusableCheckpoints

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES_PER_STEP = 10


def _iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _state(step: int) -> dict:
    return {"step": jnp.int32(step), "w": jnp.full((4,), float(step))}


def _abstract() -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0))


def _save_steps(directory: pathlib.Path, steps=(1, 2, 3)) -> None:
    """Step s holds w = s and the iterator after s * EXAMPLES_PER_STEP examples."""
    checkpoints, iterator = RunCheckpoints(directory, keep=5), _iterator()
    for step in steps:
        for _ in range(EXAMPLES_PER_STEP):
            next(iterator)
        checkpoints.save(step, _state(step), iterator.get_state(), {"step": step})
    checkpoints.close()


def _restore(directory: pathlib.Path, check_run=lambda run: None):
    checkpoints, iterator = RunCheckpoints(directory, keep=5), _iterator()
    try:
        return checkpoints.restore(_abstract(), iterator, check_run), next(iterator), checkpoints.latest_step()
    finally:
        checkpoints.close()


def _assert_step_2(restored, next_example) -> None:
    step, state, run = restored
    assert (step, int(state["step"]), run) == (2, 2, {"step": 2})
    assert state["w"].tolist() == [2.0] * 4
    assert next_example == 2 * EXAMPLES_PER_STEP


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[:3])


def test_a_truncated_array_file_falls_back_to_the_step_before(tmp_path, caplog):
    _save_steps(tmp_path)
    # The arrays live in an OCDBT store: its data files are the `d/` folders under `state/`.
    data_files = [p for p in (tmp_path / "3" / "state").rglob("*") if p.parent.name == "d"]
    assert data_files
    for path in data_files:
        _truncate(path)
    restored, next_example, latest = _restore(tmp_path)
    _assert_step_2(restored, next_example)
    warning, = [r for r in caplog.records if "unreadable (" in r.getMessage()]
    assert warning.levelname == "WARNING" and f"step 3 in {tmp_path}" in warning.getMessage()
    assert "OUT_OF_RANGE" in warning.getMessage() and "tensorstore_spec" not in warning.getMessage()
    # Step 3 is set aside, so the resumed run can save step 3 again.
    assert latest == 2 and [p.name.split("-")[0] for p in tmp_path.glob("3.*")] == ["3.unreadable"]
    checkpoints = RunCheckpoints(tmp_path, keep=5)
    assert checkpoints.save(3, _state(3), _iterator().get_state(), {"step": 3})
    checkpoints.close()
    assert RunCheckpoints(tmp_path, keep=5).latest_step() == 3


def test_without_its_metadata_and_commit_files_a_step_is_still_committed(tmp_path):
    """On a local filesystem the rename out of the tmp name is Orbax's commit: the marker files are
    not consulted, and the data, intact, restore."""
    _save_steps(tmp_path)
    for name in ("_CHECKPOINT_METADATA", "commit_success.txt"):
        (tmp_path / "3" / name).unlink()
    (step, state, run), next_example, _ = _restore(tmp_path)
    assert (step, state["w"].tolist(), run, next_example) == (3, [3.0] * 4, {"step": 3}, 3 * EXAMPLES_PER_STEP)


def test_a_step_left_under_its_tmp_name_is_not_a_step_and_is_cleaned_up(tmp_path):
    _save_steps(tmp_path)
    tmp = tmp_path / "3.orbax-checkpoint-tmp"  # as a killed save leaves it
    (tmp_path / "3").rename(tmp)
    restored, next_example, latest = _restore(tmp_path)
    _assert_step_2(restored, next_example)
    assert latest == 2
    checkpoints = RunCheckpoints(tmp_path, keep=5)
    assert not tmp.exists()  # deleted on opening, before any save of step 3 can race the deletion
    checkpoints.save(3, _state(3), _iterator().get_state(), {"step": 3})
    checkpoints.close()
    assert not tmp.exists() and (tmp_path / "3").is_dir()


def test_unreadable_run_json_falls_back(tmp_path, caplog):
    _save_steps(tmp_path)
    _truncate(tmp_path / "3" / "run" / "metadata")
    restored, next_example, _ = _restore(tmp_path)
    _assert_step_2(restored, next_example)
    assert any("step 3" in r.getMessage() and "JSONDecodeError" in r.getMessage() for r in caplog.records)


def test_every_step_unreadable_is_an_error_naming_the_directory(tmp_path):
    _save_steps(tmp_path)
    _truncate(tmp_path / "3" / "run" / "metadata")
    (tmp_path / "2" / "data" / "process_0-of-1.json").unlink()
    for path in (tmp_path / "1" / "state").rglob("*"):
        if path.parent.name == "d":
            _truncate(path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UnusableCheckpoints, match=rf"no readable checkpoint in {tmp_path} \(step 3: JSONDecodeError.*; "
                                                  r"step 2: ValueError: File .* does not exist.*; step 1: ValueError"):
        _restore(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_empty_directory_restores_nothing(tmp_path):
    assert _restore(tmp_path)[0] is None


class RefusedConfig(ValueError):
    pass


def test_an_error_of_check_run_propagates_without_fallback(tmp_path):
    _save_steps(tmp_path)
    seen = []

    def check_run(run):
        seen.append(run["step"])
        raise RefusedConfig("another config")

    with pytest.raises(RefusedConfig):
        _restore(tmp_path, check_run)
    assert seen == [3]


# A run keeping 2 steps saves steps 1 and 2, then step 3 with ~200 MB of arrays, and is killed during
# that save. The commit (the rename of the tmp directory) is made to wait forever, so the kill always
# lands before it however fast the write is; step 1, due for deletion, must outlive the unfinished save.
_KILLED_RUN = textwrap.dedent("""
    import asyncio, pathlib, sys
    import grain, jax.numpy as jnp, numpy as np
    from orbax.checkpoint._src.path import atomicity
    from mrrm_jax.training.checkpoints import RunCheckpoints

    async def never_commit(self):
        await asyncio.sleep(3600)

    directory, started = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    checkpoints, iterator = RunCheckpoints(directory, keep=2), iter(grain.MapDataset.range(100).to_iter_dataset())
    for step in (1, 2):
        next(iterator)
        checkpoints.save(step, {"step": jnp.int32(step), "w": jnp.full((4,), float(step))}, iterator.get_state(), {})
    checkpoints.wait()
    atomicity.AtomicRenameTemporaryPath.finalize = never_commit
    big = np.random.default_rng(0).random(50_000_000, dtype=np.float32)  # incompressible: ~200 MB written
    checkpoints.save(3, {"step": jnp.int32(3), "w": jnp.asarray(big)}, iterator.get_state(), {})
    started.touch()
    checkpoints.wait()
""")


def _bytes_written(tmp: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in tmp.rglob("*") if f.parent.name == "d")


def test_a_run_killed_during_an_async_save_leaves_the_steps_before_intact(tmp_path):
    directory, started, log = tmp_path / "checkpoints", tmp_path / "started", tmp_path / "log"
    tmp = directory / "3.orbax-checkpoint-tmp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    with log.open("w") as log_file:  # a file, not a pipe: a full pipe would stall the run
        run = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(directory), str(started)], env=env,
                               stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        # Killed once step 3's array data is being written (or, on a slow machine, written).
        while not (started.exists() and _bytes_written(tmp) > 2**20):
            assert run.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never started writing step 3"
            time.sleep(0.01)
        run.send_signal(signal.SIGKILL)
        assert run.wait(timeout=30) == -signal.SIGKILL
    finally:
        run.kill()
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2", tmp.name]
    checkpoints, iterator = RunCheckpoints(directory, keep=2), _iterator()
    step, state, _ = checkpoints.restore(_abstract(), iterator, lambda run: None)
    assert (step, state["w"].tolist(), next(iterator)) == (2, [2.0] * 4, 2)
    checkpoints.close()
