"""Decoding media files: images with PIL, videos with PyAV, and directories of frames.

PyAV is imported where a video file is opened, not here: what only handles images or frames already
decoded (the preprocessors' `picked_frames`, the GPU bench) runs where PyAV is not installed.
"""

from __future__ import annotations

import fractions
import pathlib
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3]; transparency composited onto white, as transformers does for PIL input."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def load_image(path) -> Image.Image:
    """RGB, or RGBA kept as is: Molmo2's image processor composites alpha onto white itself
    (transformers' `load_image` would drop the alpha instead). EXIF orientation is applied.
    `path`: a path or a binary file object."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        image.load()
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode in ("RGB", "RGBA") else image.convert("RGB")


def load_video(source, fps: float | None = None, keep: Callable[[dict], np.ndarray] | None = None,
               pick_files: Callable[[list], list] | None = None) -> tuple[np.ndarray, dict]:
    """Frames uint8 [K, H, W, 3] and metadata (fps, total_num_frames, duration, frames_indices [K]).

    `source`: a video file (path or binary file object), or frames: a directory of image files (name
    order) or a list of image files. `keep(metadata)` names the frames the sampler may pick
    (`preprocess.sample_frame_indices`); only those are converted to RGB (the costly part) and held;
    every frame when `keep` is None. Frames are sampled with both ends included (metadata
    "sampling": "ends"), and only the kept files are read; their frame rate comes from `fps` (the
    record's `fps`, or 1 / `sampling_interval`), as image files carry none. `pick_files(files)`: a
    benchmark's own sampling of a frame directory before ours (MM-RLHF's 32 evenly spaced files); the
    picked files then stand for the whole video.
    """
    if isinstance(source, (str, pathlib.Path)) and pathlib.Path(source).is_dir():
        source = sorted(p for p in pathlib.Path(source).iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not source:
            raise ValueError("no decodable frames (no image files in the directory)")
    if isinstance(source, list):
        source = pick_files(source) if pick_files is not None else source
        if fps is None:
            raise ValueError("a frame directory needs 'fps' or 'sampling_interval' in the record")
        metadata = _metadata(len(source), fps, sampling="ends")
        indices = np.arange(len(source)) if keep is None else np.asarray(keep(metadata))
        frames = [np.asarray(load_image(source[i]).convert("RGB")) for i in indices]
        return np.stack(frames), {**metadata, "frames_indices": indices}

    import av

    with av.open(_rewound(source)) as container:
        stream = container.streams.video[0]
        fps = fps or (float(stream.average_rate) if stream.average_rate else None)
        if fps is None:
            raise ValueError("the video has no frame rate")
        wanted = None if keep is None or not stream.frames else keep(_metadata(stream.frames, fps))
        frames, indices, total = _decode(container, stream, wanted)
        expected = stream.frames
    if not total:
        raise ValueError("no decodable frames")
    if keep is not None and total != expected:
        # The container's frame count was missing or wrong (a cut file): sample from the real count.
        wanted = np.asarray(keep(_metadata(total, fps)))
        if len(indices) == total:  # every frame is at hand
            frames, indices = [frames[i] for i in wanted], wanted
        else:
            with av.open(_rewound(source)) as container:
                frames, indices, total = _decode(container, container.streams.video[0], wanted)
    return np.stack(frames), {**_metadata(total, fps), "frames_indices": np.asarray(indices)}


def _rewound(source):
    """A path as a string, or the file object back at its start (it may be read twice)."""
    if isinstance(source, (str, pathlib.Path)):
        return str(source)
    source.seek(0)
    return source


def _metadata(total: int, fps: float, **extra) -> dict:
    return {"fps": fps, "total_num_frames": total, "duration": total / fps, **extra}


def _decode(container, stream, wanted) -> tuple[list[np.ndarray], list[int], int]:
    """(RGB frames at the `wanted` indices, or all of them, their indices, the number of frames)."""
    import av

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
    import av

    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def picked_frames(frames_thwc: np.ndarray, metadata: dict, picked: np.ndarray) -> np.ndarray:
    """The frames at source indices `picked`, from `frames_thwc`: the frames at `metadata["frames_indices"]`
    (a decoder that kept only what sampling can pick, `load_video(keep=...)`), or every frame."""
    kept = np.asarray(metadata.get("frames_indices", np.arange(len(frames_thwc))))
    positions = np.minimum(np.searchsorted(kept, picked), len(kept) - 1)
    if not np.array_equal(kept[positions], picked):
        missing = sorted(set(np.asarray(picked).tolist()) - set(kept.tolist()))
        raise ValueError(f"video frames {missing[:8]} are needed but were not decoded")
    return frames_thwc[positions]
