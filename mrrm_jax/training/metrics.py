"""Training records: a console progress line, TensorBoard event files, `metrics.jsonl`, `skips.jsonl`.

Only process 0 writes metrics. `metrics.jsonl` (one JSON object per logged step) is what tests and
scripts read; TensorBoard reads the event files under `workdir/tensorboard`. Every process names
the records its data shard skipped in its own skips file.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import jax
from tensorboardX import SummaryWriter


class MetricsWriter:
    def __init__(self, workdir: str | pathlib.Path, total_steps: int):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.start = time.time()
        if self.enabled:
            workdir = pathlib.Path(workdir)
            self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))
            self._jsonl = open(workdir / "metrics.jsonl", "a")

    def write(self, step: int, scalars: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self._tensorboard.add_scalar(f"{prefix}/{name}", value, step)
        self._jsonl.write(json.dumps({"step": step, "kind": prefix, **scalars}) + "\n")
        self._jsonl.flush()

    def progress(self, step: int, scalars: dict, prefix: str = "train") -> None:
        """One console line: step / total, elapsed, and the scalars."""
        if not self.enabled:
            return
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scalars.items())
        elapsed = time.time() - self.start
        print(f"[{prefix}] step {step}/{self.total_steps}  {elapsed:6.0f}s  {shown}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._jsonl.close()


class SkipLog:
    """`skips.jsonl` (`skips.process<i>.jsonl` on several processes): one line per skipped training
    record, {"step": the step that read it, "record_id", "reason", "detail"}."""

    def __init__(self, workdir: str | pathlib.Path, from_step: int):
        name = "skips.jsonl" if jax.process_count() == 1 else f"skips.process{jax.process_index()}.jsonl"
        self.path = pathlib.Path(workdir) / name
        if self.path.exists():
            # A run resumed from `from_step` reads the records after it again: the lines an interrupted
            # run wrote for them go, so each skip is named once.
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= from_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")

    def write(self, step: int, skips: list) -> None:
        for skip in skips:
            self._file.write(json.dumps({"step": step, **skip._asdict()}) + "\n")
        if skips:
            self._file.flush()

    def close(self) -> None:
        self._file.close()
