"""Records in the paper's JSONL schema -> decoded media -> training examples, with counted skips.

A bad record never stops a run: it becomes a `Skip` with a reason and the record's id
(`file:line`), counted by reason and logged. Media paths are relative to the JSONL file, or to
`media_root` when given, and may not leave that root.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import pathlib

import av

from mrrm_jax.data import examples, media, preprocess
from mrrm_jax.data.examples import Skip

log = logging.getLogger(__name__)


def read_jsonl(path: str | pathlib.Path) -> list[tuple[str, dict | str]]:
    """(record id, record) per non-empty line; a line that is not a JSON object stays a string."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    out = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = line
            out.append((f"{path.name}:{number}", record if isinstance(record, dict) else line))
    return out


def _resolve(name: str, base: pathlib.Path, record_id: str, field: str) -> pathlib.Path:
    path = (base / name).resolve()
    if not path.is_relative_to(base.resolve()):
        raise Skip("path_outside_root", f"{record_id}: {field} {name!r} leaves the media root {base}")
    if not path.exists():
        raise Skip("missing_file", f"{record_id}: {field} {name!r} does not exist under {base}")
    return path


def load_media(record: dict, record_id: str, base: pathlib.Path, keep_frames=None) -> dict:
    """{"images": [...]} and/or {"video": frames, "video_metadata": {...}}; raises `Skip`.
    `keep_frames`: which video frames to decode (`media.load_video`'s `keep`); all when None."""
    loaded = {}
    names = record.get("image")
    names = [] if names is None else [names] if isinstance(names, str) else names
    images = []
    for name in names:
        path = _resolve(name, base, record_id, "image")
        try:
            images.append(media.load_image(path))
        except (OSError, ValueError) as error:
            raise Skip("bad_image", f"{record_id}: image {name!r} cannot be decoded ({error})") from error
    if images:
        loaded["images"] = images
    if record.get("video") is not None:
        path = _resolve(record["video"], base, record_id, "video")
        fps = record.get("fps") or (1 / record["sampling_interval"] if record.get("sampling_interval") else None)
        try:
            loaded["video"], loaded["video_metadata"] = media.load_video(path, fps, keep_frames)
        except (OSError, ValueError, av.error.FFmpegError) as error:
            reason = "no_frames" if "no decodable frames" in str(error) else "bad_video"
            raise Skip(reason, f"{record_id}: video {record['video']!r} cannot be used ({error})") from error
    return loaded


class SkipCounter(collections.Counter):
    """Counts skips and drops by reason and logs every skip with its record id."""

    def skip(self, error: Skip) -> None:
        self[error.reason] += 1
        log.warning("skipped %s", error)


def build_examples(path, processor, config, budget: examples.Budget, rng, counter: SkipCounter,
                   media_root: str | pathlib.Path | None = None) -> list[dict]:
    """Every usable record of a JSONL file as a training example; the rest counted in `counter`."""
    path = pathlib.Path(path)
    base = pathlib.Path(media_root) if media_root is not None else path.parent
    keep = functools.partial(examples.frames_to_keep, budget=budget,
                             options=preprocess.VisionOptions.from_processor(processor))
    out = []
    for record_id, record in read_jsonl(path):
        try:
            if not isinstance(record, dict):
                raise Skip("bad_json", f"{record_id}: not a JSON object")
            loaded = load_media(record, record_id, base, keep)
            out.append(examples.training_example(record, loaded, processor, config, budget, rng, counter, record_id))
        except Skip as error:
            counter.skip(error)
    return out
