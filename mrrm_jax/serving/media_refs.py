"""Media references in requests -> decoded media, without network access.

A reference is a path under `--media_root` (no `..`, no symlink leaving the root: `records.MediaDir`),
a `data:` URI, or bare base64. An http(s) URL is refused: the scorer never fetches. A video is a file
or a frame directory (path only).
"""

from __future__ import annotations

import base64
import binascii
import re

from mrrm_jax.data import records
from mrrm_jax.data.examples import Skip

_BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}")


class RefError(ValueError):
    """A reference that cannot be used (HTTP 400); `field` names where it was."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _inline_bytes(ref: str) -> bytes | None:
    """The bytes of a data: URI or of bare base64; None for anything else (a path)."""
    if ref.startswith("data:"):
        header, comma, payload = ref.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ValueError("a data: URI must be base64 (data:<type>;base64,<data>)")
        return base64.b64decode(payload, validate=True)
    # Bare base64: long, and only base64 characters (a path has a '.' or is short).
    if len(ref) >= 64 and _BASE64.fullmatch(ref):
        return base64.b64decode(ref, validate=False)
    return None


def load(images: list[str], video: str | None, media_root, field: str, keep_frames=None) -> dict:
    """`records.load_media`'s output ({"images": [...]} and/or {"video", "video_metadata"}) for the
    references of one group; raises `RefError` naming the field."""
    blobs, record = {}, {}
    names = []
    for index, ref in enumerate(images):
        names.append(_name(ref, f"{field}.image[{index}]", blobs, f"image{index}"))
    if names:
        record["image"] = names
    if video is not None:
        record["video"] = _name(video, f"{field}.video", blobs, "video")
    files = _Files(blobs, records.MediaDir(media_root) if media_root is not None else None)
    try:
        return records.load_media(record, field, files, keep_frames)
    except Skip as error:
        raise RefError(field, f"{error} ({error.reason})") from error


def _name(ref, field: str, blobs: dict, blob_name: str) -> str:
    if not isinstance(ref, str) or not ref:
        raise RefError(field, "must be a non-empty string: a path under the media root, a data: URI or base64")
    if ref.startswith(("http://", "https://")):
        raise RefError(field, "URLs are not fetched: send the media as a data: URI or base64, or a path under "
                              "--media_root")
    try:
        data = _inline_bytes(ref)
    except (ValueError, binascii.Error) as error:
        raise RefError(field, f"bad inline media ({error})") from error
    if data is None:
        return ref
    blobs[f"<inline {blob_name}>"] = data  # a name no path under the media root can take
    return f"<inline {blob_name}>"


class _Files:
    """Inline blobs by name, else paths under the media root (`records.MediaDir` confines them)."""

    def __init__(self, blobs: dict[str, bytes], media_dir: records.MediaDir | None):
        self.blobs, self.media_dir = records.MediaBlobs(blobs), media_dir

    def open(self, name: str, record_id: str, field: str):
        if name in self.blobs.blobs:
            return self.blobs.open(name, record_id, field)
        if self.media_dir is None:
            raise Skip("path_not_allowed", f"{record_id}: {field} {name!r} is a path, and the server has no "
                                           "--media_root")
        return self.media_dir.open(name, record_id, field)
