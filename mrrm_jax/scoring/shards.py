"""One output written by several processes (`jax.distributed`): `score` and `evaluate` on a pod.

Scoring is data-parallel with nothing to share between records, so every process runs its own
`RewardModel` on its own devices and takes every `count`-th record (record i goes to process
i mod count: a file sorted by size still splits evenly). Each writes its lines to a part file beside the
output, `OUTPUT.part-PPPPP-of-CCCCC`, flushed line by line; when all are done (a barrier), process 0
joins the parts in record order into the output and deletes them. A rerun after a kill, with any
process count, skips the records some part already holds: the parts are the resume state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Iterable

import jax
from jax.experimental import multihost_utils


@dataclasses.dataclass(frozen=True)
class Share:
    """This process's share of the records."""
    index: int = 0
    count: int = 1

    @classmethod
    def of_this_process(cls) -> Share:
        return cls(jax.process_index(), jax.process_count())

    def holds(self, record_index: int) -> bool:
        return record_index % self.count == self.index

    @property
    def leader(self) -> bool:
        return self.index == 0


def part_path(output: pathlib.Path, share: Share) -> pathlib.Path:
    return output.with_name(f"{output.name}.part-{share.index:05d}-of-{share.count:05d}")


def _parts(output: pathlib.Path) -> list[pathlib.Path]:
    return sorted(output.parent.glob(f"{output.name}.part-*-of-*"))


def complete_lines(path: pathlib.Path, keep: Callable[[dict], bool]) -> list[dict]:
    """The lines of `path` that a finished record wrote (a line cut short by a kill is dropped)."""
    lines = []
    for text in path.read_text().splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict) and isinstance(line.get("index"), int) and keep(line):
            lines.append(line)
    return lines


def done_indices(output: pathlib.Path, keep: Callable[[dict], bool]) -> set[int]:
    """Records that a part of an earlier or this run holds."""
    return {line["index"] for part in _parts(output) for line in complete_lines(part, keep)}


def open_part(output: pathlib.Path, share: Share, keep: Callable[[dict], bool]):
    """This process's part, for appending: its complete lines of a killed run kept, a cut line dropped."""
    path = part_path(output, share)
    kept = complete_lines(path, keep) if path.exists() else []
    path.write_text("".join(json.dumps(line) + "\n" for line in kept))
    return path.open("a")


def wait_for_all(name: str) -> None:
    """Returns when every process has reached this point (no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def join(output: pathlib.Path, earlier: Iterable[dict] = ()) -> list[dict]:
    """The output, whole, from `earlier` lines and every part's: one line per record, in record order, a
    scored line before an error line of the same record; written under a temporary name and renamed,
    then the parts are deleted."""
    by_index: dict[int, dict] = {}
    parts = _parts(output)
    for line in [*earlier, *(line for part in parts for line in complete_lines(part, lambda _: True))]:
        held = by_index.get(line["index"])
        if held is None or ("scores" in line and "scores" not in held):
            by_index[line["index"]] = line
    lines = [by_index[i] for i in sorted(by_index)]
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    temporary.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(temporary, output)
    for part in parts:
        part.unlink()
    return lines
