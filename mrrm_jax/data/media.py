"""Decoding media files for scoring: images with PIL, videos with PyAV."""

from __future__ import annotations

import pathlib

import av
import numpy as np
from PIL import Image, ImageOps


def load_image(path: str | pathlib.Path) -> Image.Image:
    """RGB, or RGBA kept as is: Molmo2's image processor composites alpha onto white itself
    (transformers' `load_image` would drop the alpha instead). EXIF orientation is applied."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        image.load()
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode in ("RGB", "RGBA") else image.convert("RGB")


def load_video(path: str | pathlib.Path) -> tuple[np.ndarray, dict]:
    """All frames uint8 [T, H, W, 3] and the metadata Molmo2's video processor samples from."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        fps = float(stream.average_rate) if stream.average_rate else None
    if fps is None:
        raise ValueError(f"{path}: video has no frame rate")
    return frames, {"fps": fps, "total_num_frames": len(frames), "duration": len(frames) / fps}
