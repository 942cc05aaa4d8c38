"""Decoding media files: images with PIL, videos with PyAV, and directories of frames."""

from __future__ import annotations

import fractions
import pathlib
from collections.abc import Callable

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


def load_video(path: str | pathlib.Path, fps: float | None = None,
               keep: Callable[[dict], np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
    """Frames uint8 [K, H, W, 3] and metadata (fps, total_num_frames, duration, frames_indices [K]).

    `keep(metadata)` names the frames the sampler may pick (`preprocess.sample_frame_indices`); only
    those are converted to RGB (the costly part) and held; every frame when `keep` is None. A
    directory is a video of its image files in name order, sampled with both ends included
    (metadata "sampling": "ends"); only the kept files are read. Its frame rate comes from `fps` (the
    record's `fps`, or 1 / `sampling_interval`), as the files carry none.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if fps is None:
            raise ValueError(f"{path}: a frame directory needs 'fps' or 'sampling_interval' in the record")
        if not files:
            raise ValueError(f"{path}: no decodable frames (no image files)")
        metadata = _metadata(len(files), fps, sampling="ends")
        indices = np.arange(len(files)) if keep is None else np.asarray(keep(metadata))
        frames = [np.asarray(load_image(files[i]).convert("RGB")) for i in indices]
        return np.stack(frames), {**metadata, "frames_indices": indices}

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = fps or (float(stream.average_rate) if stream.average_rate else None)
        if fps is None:
            raise ValueError(f"{path}: video has no frame rate")
        wanted = None if keep is None or not stream.frames else keep(_metadata(stream.frames, fps))
        frames, indices, total = _decode(container, stream, wanted)
    if not total:
        raise ValueError(f"{path}: no decodable frames")
    if keep is not None and total != stream.frames:
        # The container's frame count was missing or wrong (a cut file): sample from the real count.
        wanted = np.asarray(keep(_metadata(total, fps)))
        if len(indices) == total:  # every frame is at hand
            frames, indices = [frames[i] for i in wanted], wanted
        else:
            with av.open(str(path)) as container:
                frames, indices, total = _decode(container, container.streams.video[0], wanted)
    return np.stack(frames), {**_metadata(total, fps), "frames_indices": np.asarray(indices)}


def _metadata(total: int, fps: float, **extra) -> dict:
    return {"fps": fps, "total_num_frames": total, "duration": total / fps, **extra}


def _decode(container, stream, wanted) -> tuple[list[np.ndarray], list[int], int]:
    """(RGB frames at the `wanted` indices, or all of them, their indices, the number of frames)."""
    wanted = None if wanted is None else set(np.asarray(wanted).tolist())
    frames, indices, total = [], [], 0
    for packet in container.demux(stream):
        try:
            decoded = packet.decode()
        except av.error.InvalidDataError:
            continue  # a corrupt packet: keep the frames around it
        for frame in decoded:
            if wanted is None or total in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
                indices.append(total)
            total += 1
    return frames, indices, total


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
