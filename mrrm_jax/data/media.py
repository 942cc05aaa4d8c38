"""Decoding media files: images with PIL, videos with PyAV, and directories of frames."""

from __future__ import annotations

import fractions
import pathlib

import av
import numpy as np
from PIL import Image, ImageOps

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_image(path: str | pathlib.Path) -> Image.Image:
    """RGB, or RGBA kept as is: Molmo2's image processor composites alpha onto white itself
    (transformers' `load_image` would drop the alpha instead). EXIF orientation is applied."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        image.load()
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode in ("RGB", "RGBA") else image.convert("RGB")


def load_video(path: str | pathlib.Path, fps: float | None = None) -> tuple[np.ndarray, dict]:
    """All frames uint8 [T, H, W, 3] and the metadata Molmo2's video processor samples from.

    A directory is a video of its image files in name order; its frame rate comes from `fps`
    (the record's `fps`, or 1 / `sampling_interval`), as the files carry none.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if fps is None:
            raise ValueError(f"{path}: a frame directory needs 'fps' or 'sampling_interval' in the record")
        frames = [np.asarray(load_image(f).convert("RGB")) for f in files]
    else:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = []
            for packet in container.demux(stream):
                try:
                    frames += [f.to_ndarray(format="rgb24") for f in packet.decode()]
                except av.error.InvalidDataError:
                    continue  # a corrupt packet: keep the frames around it
            fps = fps or (float(stream.average_rate) if stream.average_rate else None)
        if fps is None:
            raise ValueError(f"{path}: video has no frame rate")
    if not frames:
        raise ValueError(f"{path}: no decodable frames")
    return np.stack(frames), {"fps": fps, "total_num_frames": len(frames), "duration": len(frames) / fps}


def write_mp4(path: str | pathlib.Path, frames: np.ndarray, fps: float) -> None:
    """Encode uint8 frames [T, H, W, 3] (even H and W) as H.264 mp4; for generated data and tests.

    faststart puts the index before the frames, so a file cut short still opens.
    """
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
