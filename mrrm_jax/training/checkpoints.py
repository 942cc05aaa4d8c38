"""The training run's checkpoint directory: async saves, and a resume that survives a damaged latest step.

A checkpoint is one Orbax step directory holding three items: `state` (the pytree of arrays), `data`
(the data iterator's state, grain's handler) and `run` (a JSON dict: the config snapshot, skip counts).

What a save guarantees, read in Orbax 0.12.8's source (`_src/path/atomicity.py`,
`checkpoint_manager.py`); tests/test_run_checkpoints.py checks it on a local filesystem:
- A step is written under `<step>.orbax-checkpoint-tmp` and renamed to `<step>` once every item is
  written (on a local filesystem the rename is the commit; `_CHECKPOINT_METADATA` and
  `commit_success.txt` are written inside first, but only a gs:// directory is judged by the latter).
  Only directories named `<step>` are listed, so a save killed half-way is never a step.
- A save never writes over an existing step: the manager skips a step at or below its latest, and a
  forced save of a listed step raises `StepAlreadyExistsError`.
- The steps beyond `keep` are deleted by the save's finalize thread after the new step's rename, and
  not at all when its write failed: until a new step is complete the older ones are all there.
- The tmp directories a killed process left are deleted when the next `RunCheckpoints` opens the
  directory, before it returns. Not by Orbax's `cleanup_tmp_directories`: that runs in the
  background and races a save of the same step (a run resumed from the step before the killed save
  saves it again), which replaces its own leftover tmp directory; whichever deletes second raised
  FileNotFoundError and failed the save.

A listed step can still be unreadable (a truncated or deleted file, a disk or copy error).
`restore` then warns and takes the step before; the unreadable newer steps are set aside as
`<step>.unreadable-<time>` (kept for inspection, no longer listed), so the run's next saves of
those step numbers are not refused as existing. A directory whose every step is unreadable raises
`UnusableCheckpoints`: starting over from scratch would throw the run away without anyone noticing.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import signal
import threading
import time
from collections.abc import Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def stop_on_sigterm() -> threading.Event:
    """An event that SIGTERM (a preemption) sets: a run then saves a checkpoint and stops."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax 0.12.8's `atomicity.TMP_DIR_SUFFIX`: a step being written

# What Orbax raises for a step it lists but cannot read: tensorstore's NOT_FOUND, OUT_OF_RANGE and
# DATA_LOSS (a missing or truncated array file) and json's decode errors are ValueErrors, as is
# grain's missing iterator file; a missing metadata file is a FileNotFoundError, a missing item
# directory a KeyError.
_UNREADABLE = (OSError, ValueError, KeyError)


class UnusableCheckpoints(RuntimeError):
    """Every checkpoint in the directory is unreadable; nothing in it was changed."""


class _IteratorState:
    """A frozen copy of a data iterator's state for grain's checkpoint handler (the save may be async)."""

    def __init__(self, state: dict):
        self._state = json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self._state


def _brief(error: BaseException) -> str:
    # tensorstore appends its whole JSON spec ("[tensorstore_spec=..." or "[tensorstore_spec[1]=...")
    # to every error; the cause comes before it.
    return f"{type(error).__name__}: {error}".split(" [tensorstore_spec")[0]


def _on_every_process(read: Callable[[], object]) -> tuple[object, str | None]:
    """`read()`'s result and None, or None and why it failed. Each process reads its own array shards,
    so a step counts as read only when every process read it: all then resume from the same step."""
    try:
        result, failure = read(), None
    except _UNREADABLE as error:
        result, failure = None, _brief(error)
    if not multihost_utils.process_allgather(np.array(failure is None)).all() and failure is None:
        failure = "another process could not read it"
    return result, failure


class RunCheckpoints:
    """The Orbax CheckpointManager of a run's checkpoint directory, keeping the newest `keep` steps."""

    def __init__(self, directory: str | pathlib.Path, keep: int):
        self.directory = pathlib.Path(directory)
        if jax.process_index() == 0 and self.directory.is_dir():
            for leftover in self.directory.glob(f"*{TMP_SUFFIX}*"):  # a killed save's step (module doc)
                shutil.rmtree(leftover)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("run_checkpoints: leftover tmp directories deleted")
        self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        """The newest step, counting a save still being written."""
        return self._manager.latest_step()

    def save(self, step: int, state, data_iterator_state: dict, run: dict, force: bool = False) -> bool:
        """Start an async save of `step`; False when skipped (a step at or below the latest, unless `force`)."""
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorState(data_iterator_state)),
            run=ocp.args.JsonSave(run)), force=force)

    def restore(self, abstract_state, data_iterator, check_run: Callable[[dict], None]) -> tuple[int, object, dict] | None:
        """(step, state, run) of the newest readable step, with `data_iterator` set to its position;
        None in an empty directory.

        `check_run(run)` sees each step's run JSON before its arrays are read; what it raises (another
        config's checkpoints) propagates. `abstract_state`: ShapeDtypeStructs with their shardings.
        """
        failures = {}
        for step in sorted(self._manager.all_steps(), reverse=True):
            run, failure = _on_every_process(
                lambda: self._manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"])
            if failure is None:
                check_run(run)
                restored, failure = _on_every_process(lambda: self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data_iterator))))
            if failure is None:
                self._set_aside(list(failures))
                return step, restored["state"], run
            log.warning("checkpoint step %d in %s is unreadable (%s); trying the step before", step,
                        self.directory, failure)
            failures[step] = failure
        if failures:
            listed = "; ".join(f"step {step}: {failure}" for step, failure in failures.items())
            raise UnusableCheckpoints(f"no readable checkpoint in {self.directory} ({listed}). Nothing was "
                                      "changed; move the directory aside to start the run over.")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable steps out of Orbax's listing: the run will save those step numbers again."""
        if not steps:
            return
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                aside = self.directory / f"{step}.unreadable-{stamp}"
                (self.directory / str(step)).rename(aside)
                log.warning("set aside unreadable checkpoint step %d as %s", step, aside)
        multihost_utils.sync_global_devices("run_checkpoints: unreadable steps set aside")
        self._manager.reload()

    def wait(self) -> None:
        """Block until the async save in flight (if any) is committed; raises its error if it failed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
