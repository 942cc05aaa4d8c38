"""Records in the paper's JSONL schema -> decoded media -> training examples, with counted skips.

A bad record never stops a run: it becomes a `Skip` with a reason and the record's id
(`file:line`), counted by reason and logged. Media paths are relative to the JSONL file, or to
`media_root` when given, and may not leave that root.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import pathlib
import posixpath

import av

from mrrm_jax.data import examples, media
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


def image_names(record: dict) -> list[str]:
    names = record.get("image")
    return [] if names is None else [names] if isinstance(names, str) else list(names)


def media_names(record: dict) -> list[str]:
    """The media file names a record refers to: its image(s), then its video."""
    return image_names(record) + ([record["video"]] if record.get("video") is not None else [])


def normalise_name(name: str) -> str:
    return posixpath.normpath(name.replace("\\", "/"))


class MediaDir:
    """Media files under a root directory (a JSONL corpus); a name may not leave the root."""

    def __init__(self, root: str | pathlib.Path):
        self.root = pathlib.Path(root)

    def open(self, name: str, record_id: str, field: str) -> pathlib.Path:
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise Skip("path_outside_root", f"{record_id}: {field} {name!r} leaves the media root {self.root}")
        if not path.exists():
            raise Skip("missing_file", f"{record_id}: {field} {name!r} does not exist under {self.root}")
        return path


class MediaBlobs:
    """Media stored with the record (a TFDS corpus): name -> bytes; a frame directory as `name/file`."""

    def __init__(self, blobs: dict[str, bytes]):
        self.blobs = blobs

    def open(self, name: str, record_id: str, field: str):
        key = normalise_name(name)
        if key == ".." or key.startswith("../") or posixpath.isabs(key):
            raise Skip("path_outside_root", f"{record_id}: {field} {name!r} leaves the media root")
        if key in self.blobs:
            return io.BytesIO(self.blobs[key])
        frames = sorted(k for k in self.blobs if k.startswith(key + "/"))
        if not frames:
            raise Skip("missing_file", f"{record_id}: {field} {name!r} is not in the record's media")
        return [io.BytesIO(self.blobs[k]) for k in frames]


def load_media(record: dict, record_id: str, files, keep_frames=None, pick_files=None) -> dict:
    """{"images": [...]} and/or {"video": frames, "video_metadata": {...}}; raises `Skip`.
    `files`: a `MediaDir` or `MediaBlobs`; `keep_frames`, `pick_files`: which video frames to decode
    (`media.load_video`'s `keep` and `pick_files`), all when None."""
    loaded, images = {}, []
    for name in image_names(record):
        source = files.open(name, record_id, "image")
        if isinstance(source, list):
            raise Skip("bad_image", f"{record_id}: image {name!r} is a directory of frames, not an image")
        try:
            images.append(media.load_image(source))
        except (OSError, ValueError) as error:
            raise Skip("bad_image", f"{record_id}: image {name!r} cannot be decoded ({error})") from error
    if images:
        loaded["images"] = images
    if record.get("video") is not None:
        source = files.open(record["video"], record_id, "video")
        fps = record.get("fps") or (1 / record["sampling_interval"] if record.get("sampling_interval") else None)
        try:
            loaded["video"], loaded["video_metadata"] = media.load_video(source, fps, keep_frames, pick_files)
        except (OSError, ValueError, av.error.FFmpegError) as error:
            reason = "no_frames" if "no decodable frames" in str(error) else "bad_video"
            raise Skip(reason, f"{record_id}: video {record['video']!r} cannot be used ({error})") from error
    return loaded


class SkipCounter(collections.Counter):
    """Counts skips and drops by reason and logs every skip with its record id."""

    def skip(self, error: Skip) -> None:
        self[error.reason] += 1
        log.warning("skipped %s", error)


def build_examples(path, processor, budget: examples.Budget, rng, counter: SkipCounter,
                   media_root: str | pathlib.Path | None = None) -> list[dict]:
    """Every usable record of a JSONL file as a training example; the rest counted in `counter`."""
    path = pathlib.Path(path)
    base = pathlib.Path(media_root) if media_root is not None else path.parent
    keep = examples.frames_to_keep(budget, processor)
    out = []
    for record_id, record in read_jsonl(path):
        try:
            if not isinstance(record, dict):
                raise Skip("bad_json", f"{record_id}: not a JSON object")
            loaded = load_media(record, record_id, MediaDir(base), keep)
            out.append(examples.training_example(record, loaded, processor, budget, rng, counter, record_id))
        except Skip as error:
            counter.skip(error)
    return out
