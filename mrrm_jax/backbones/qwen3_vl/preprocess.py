"""Qwen3-VL pixel preprocessing in numpy, equal to transformers' (5.24) `Qwen2VLImageProcessor` (the
torchvision backend `AutoImageProcessor` picks for qwen3_vl) and `Qwen3VLVideoProcessor`.

Why our own: it runs in the grain workers without torch, is thread-safe, and lets the video decoder
convert only the frames `video_frame_indices` picks (`media.load_video(keep=...)`).
tests/test_qwen3_vl_preprocess.py checks every array against transformers.

An image is resized to multiples of `patch * merge` = 32 pixels within a pixel budget, normalised, and
cut into 16x16 patches, each repeated over `temporal_patch` = 2 frames. A video keeps the frames
`video_frame_indices` picks (at `fps` per second, at least `min_frames`), resized together within the
video budget; an odd frame count is padded with the last frame. Patches come in merge-block order (the
2x2 patches of one merged token are consecutive, row by row within the block); each vector is laid out
(channel, time, row, col), so the ViT's Conv3d patch embedding is one matmul on it:

    grid (t, h, w) = (2, 4, 4) patches, merge 2: rows of patches_px in order
        t=0: block (0,0): (0,0) (0,1) (1,0) (1,1); block (0,1): (0,2) (0,3) (1,2) (1,3); block (1,0) ...
        t=1: the same

Exactness notes (where our code mirrors the reference's arithmetic):
- resize: torchvision resizes uint8 bicubic with antialias natively on CPU (no float round trip): torch's
  `_upsample_bicubic2d_aa` uint8 kernel. Per axis (width first, then height, each to uint8) it weights
  the taps of PIL's cubic filter (a = -0.5, support widened by the downscale factor), computed in
  float64 and normalised to sum 1, then rounded to int16 fixed point with the most fractional bits that
  keep the largest weight under 2^15; a pixel is (2^(bits-1) + sum pixel * weight) >> bits, clamped to
  [0, 255]. Integer sums: the AVX2, AVX-512 and generic kernels agree, and torch's thread count does not
  matter (all measured equal).
- normalise: (x - 255 * mean) / (255 * std) in float32 (transformers fuses the rescale into the
  normalisation that way).
- frame sampling: `linspace(0, total - 1, n)` rounded half to even (numpy's); timestamps in float64.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

BICUBIC = 3  # PIL's resample code; `resize_bicubic` is the only kernel implemented
Grid = tuple[int, int, int]  # (t, h, w) in patches: `image_grid_thw` / `video_grid_thw`


@dataclasses.dataclass(frozen=True)
class Qwen3VLVisionOptions:
    """The image and video processors' settings. Defaults: Qwen3-VL-4B-Instruct's released
    preprocessor_config.json and video_preprocessor_config.json (the class defaults of transformers'
    `Qwen2VLImageProcessor` / `Qwen3VLVideoProcessor` where those files do not set a key)."""
    patch_size: int = 16  # both files (Qwen2VLImageProcessor's class default is 14)
    temporal_patch_size: int = 2  # both files; class defaults
    merge_size: int = 2  # both files; class defaults
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # both files (the image class default is OpenAI CLIP's)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_min_pixels: int = 64 * 32 * 32  # preprocessor_config.json size.shortest_edge = 65536
    image_max_pixels: int = 16384 * 32 * 32  # size.longest_edge = 16777216
    video_min_pixels: int = 4 * 32 * 32  # video_preprocessor_config.json size.shortest_edge = 4096
    # size.longest_edge = 25165824: for all the frames together (they share one size)
    video_max_pixels: int = 24576 * 32 * 32
    fps: float | None = 2  # frames sampled per second of video; class default, in the file
    num_frames: int | None = None  # frames sampled per video instead of `fps`; class default
    min_frames: int = 4  # class defaults, in the file
    max_frames: int = 768
    # Qwen3VLVideoProcessor's qwen-vl-utils style per-frame cap; class default None = off (with a warning
    # that v5.22 turns it on; 5.24 has not), not in the file.
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768  # the cap's per-frame token ceiling; class default

    def __post_init__(self):
        if self.fps is not None and self.num_frames is not None:
            # The reference raises at every call then (its `fps` default stays set beside `num_frames`).
            raise ValueError("video processor settings 'fps' and 'num_frames' exclude each other: set one to null")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged token's side in pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_processor_dicts(cls, image_cfg: dict, video_cfg: dict) -> Qwen3VLVisionOptions:
        """From a checkpoint's preprocessor_config.json and video_preprocessor_config.json (parsed).
        Keys a file leaves out take transformers' class defaults; settings we do not implement are
        refused, naming the file and key."""
        image = _checked("preprocessor_config.json", {**IMAGE_CLASS_DEFAULTS, **image_cfg}, _IMAGE_VALUED)
        video = _checked("video_preprocessor_config.json", {**VIDEO_CLASS_DEFAULTS, **video_cfg}, _VIDEO_VALUED)
        image_size = legacy_sizes_moved(image)["size"]
        for key in _SHARED:
            if _as_tuple(image[key]) != _as_tuple(video[key]):
                raise ValueError(f"preprocessor_config.json and video_preprocessor_config.json differ in {key!r} "
                                 f"({image[key]} vs {video[key]}); we implement one value for both")
        return cls(
            patch_size=image["patch_size"], temporal_patch_size=image["temporal_patch_size"],
            merge_size=image["merge_size"], mean=_as_tuple(image["image_mean"]), std=_as_tuple(image["image_std"]),
            image_min_pixels=_edge("preprocessor_config.json", image_size, "shortest_edge"),
            image_max_pixels=_edge("preprocessor_config.json", image_size, "longest_edge"),
            video_min_pixels=_edge("video_preprocessor_config.json", video["size"], "shortest_edge"),
            video_max_pixels=_edge("video_preprocessor_config.json", video["size"], "longest_edge"),
            fps=video["fps"], num_frames=video["num_frames"], min_frames=video["min_frames"],
            max_frames=video["max_frames"], cap_pixels_per_frame=bool(video["cap_pixels_per_frame"]),
            max_video_tokens=video["max_video_tokens"])


# transformers 5.24's class defaults, which a file's keys override.
IMAGE_CLASS_DEFAULTS = {  # Qwen2VLImageProcessor
    "do_resize": True, "resample": BICUBIC, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "do_convert_rgb": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2,
}
VIDEO_CLASS_DEFAULTS = {  # Qwen3VLVideoProcessor
    "do_resize": True, "resample": BICUBIC, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "do_convert_rgb": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32}, "patch_size": 16,
    "temporal_patch_size": 2, "merge_size": 2, "do_sample_frames": True, "fps": 2, "num_frames": None,
    "min_frames": 4, "max_frames": 768, "cap_pixels_per_frame": None, "max_video_tokens": 768,
}
# Settings we implement for one value only (any other is refused).
_FIXED = {"do_resize": True, "resample": BICUBIC, "do_rescale": True, "rescale_factor": 1 / 255,
          "do_normalize": True, "do_convert_rgb": True, "do_sample_frames": True}
# Settings that do not change the arrays.
_INERT = {"image_processor_type", "video_processor_type", "processor_class", "return_metadata", "default_to_square",
          "max_image_size", "max_duration"}
# Settings read into the options.
_IMAGE_VALUED = {"image_mean", "image_std", "size", "patch_size", "temporal_patch_size", "merge_size", "min_pixels",
                 "max_pixels"}
_VIDEO_VALUED = {"image_mean", "image_std", "size", "patch_size", "temporal_patch_size", "merge_size", "fps",
                 "num_frames", "min_frames", "max_frames", "cap_pixels_per_frame", "max_video_tokens"}
_SHARED = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")


def legacy_sizes_moved(image_cfg: dict) -> dict:
    """`image_cfg` with Qwen2-VL-era `min_pixels` / `max_pixels` moved into `size`, as
    `Qwen2VLImageProcessor.__init__` moves them (the video processor has no such rule)."""
    image_cfg, size = dict(image_cfg), dict(image_cfg["size"])
    for key, size_key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if key in image_cfg:
            size[size_key] = image_cfg.pop(key)
    return {**image_cfg, "size": size}


def _checked(file: str, config: dict, valued: set) -> dict:
    for key, value in config.items():
        if key in _FIXED and value != _FIXED[key]:
            raise ValueError(f"{file}: {key}={value!r} is not implemented (only {_FIXED[key]!r})")
        if key not in _FIXED and key not in _INERT and key not in valued:
            raise ValueError(f"{file}: setting {key!r} is not implemented; remove it or implement it")
    return config


def _edge(file: str, size: dict, key: str) -> int:
    if not size.get(key):
        raise ValueError(f"{file}: size needs {key!r} (pixel budgets), got {size}")
    return int(size[key])


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def image_size(height: int, width: int, options: Qwen3VLVisionOptions) -> tuple[int, int]:
    """The resized (height, width): `qwen2_vl.image_processing_qwen2_vl.smart_resize` (Python's round
    halves to even, as there)."""
    factor, min_pixels, max_pixels = options.factor, options.image_min_pixels, options.image_max_pixels
    _check_aspect(height, width)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_size(num_frames: int, height: int, width: int, options: Qwen3VLVisionOptions) -> tuple[int, int]:
    """The resized (height, width) of all `num_frames` sampled frames: `qwen3_vl`'s `smart_resize` (the
    budget counts every frame; sides under `factor` are first scaled up, truncated to int) after
    `Qwen3VLVideoProcessor.resize`'s optional per-frame cap."""
    factor, temporal = options.factor, options.temporal_patch_size
    min_pixels, max_pixels = options.video_min_pixels, options.video_max_pixels
    if num_frames < temporal:
        raise ValueError(f"a video needs at least {temporal} frames (temporal_patch_size), got {num_frames}: "
                         "transformers refuses it too")
    if options.cap_pixels_per_frame:
        pixels_per_frame = max(min(options.max_video_tokens * factor * factor, max_pixels // num_frames),
                               int(min_pixels * 1.05))
        max_pixels = pixels_per_frame * num_frames
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    _check_aspect(height, width)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal) * temporal
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _check_aspect(height: int, width: int):
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio} ({height}x{width}; "
                         "transformers refuses it too)")


def _cubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic filter (Keys, a = -0.5), in float64 as torch's `HelperInterpCubic::aa_filter`."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=256)
def _cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """torch's `_compute_index_ranges_int16_weights` (antialias): per output pixel the source indices
    [out, taps] (clipped; taps past a pixel's range weigh 0), int16 weights as int32 [out, taps], and
    the fixed-point bits. Cached (frames share sizes): read-only."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0  # the filter's support (2) widened when downscaling
    taps = math.ceil(support) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size) + 0.5)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate toward zero
    count = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - first, 0, taps)
    tap = np.arange(taps)
    used = tap < count[:, None]
    weights = np.where(used, _cubic(((first[:, None] + tap) - center[:, None] + 0.5) * invscale), 0.0)
    total = np.zeros(out_size)
    for column in weights.T:  # summed tap by tap, in torch's order (numpy's sum is pairwise)
        total += column
    weights = np.where(total[:, None] != 0, weights / np.where(total != 0, total, 1)[:, None], weights)
    largest = weights.max(initial=0.0)
    bits = 0
    while bits < 22 and int(0.5 + largest * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    scaled = weights * (1 << bits)
    weights_i = np.where(scaled < 0, scaled - 0.5, scaled + 0.5).astype(np.int32)  # round half away from 0
    index = np.minimum(first[:, None] + tap, in_size - 1)
    for array in (index, weights_i):
        array.flags.writeable = False
    return index, weights_i, bits


# Output values per block of rows: the int32 sums (256 KiB) stay in cache (2.5x faster than whole images).
_BLOCK_VALUES = 1 << 16


def _resize_rows(pixels: np.ndarray, out_size: int) -> np.ndarray:
    """uint8 [in, N] -> uint8 [out, N]: one axis of `resize_bicubic` (rows are whole lines of pixels, so
    each tap is one gather of contiguous rows), a block of output rows at a time."""
    if pixels.shape[0] == out_size:
        return pixels
    index, weights, bits = _cubic_taps(pixels.shape[0], out_size)
    out = np.empty((out_size, pixels.shape[1]), np.uint8)
    block = max(1, _BLOCK_VALUES // pixels.shape[1])
    for start in range(0, out_size, block):
        rows = slice(start, start + block)
        acc = np.full((len(index[rows]), pixels.shape[1]), 1 << (bits - 1), np.int32)  # the rounding half
        product = np.empty_like(acc)
        for tap in range(index.shape[1]):
            np.multiply(pixels[index[rows, tap]], weights[rows, tap, None], out=product)
            acc += product
        acc >>= bits
        out[rows] = np.clip(acc, 0, 255, out=acc)
    return out


def resize_bicubic(frames_thwc: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [T, H, W, C] -> uint8 [T, height, width, C], exactly as torchvision's antialiased bicubic
    resize of uint8 tensors on CPU (module doc): the width pass, then the height pass."""
    frames, in_h, in_w, channels = frames_thwc.shape
    lines = np.ascontiguousarray(frames_thwc.transpose(2, 0, 1, 3)).reshape(in_w, -1)
    lines = _resize_rows(lines, width).reshape(width, frames, in_h, channels)
    lines = np.ascontiguousarray(lines.transpose(2, 1, 0, 3)).reshape(in_h, -1)
    return _resize_rows(lines, height).reshape(height, frames, width, channels).transpose(1, 0, 2, 3)


def _patches(frames_thwc: np.ndarray, options: Qwen3VLVisionOptions) -> tuple[np.ndarray, Grid]:
    """uint8 [T, H, W, C] (T a multiple of temporal_patch_size) -> (normalised patch vectors float32
    [t * h * w, C * temporal * patch * patch] in merge-block order, grid (t, h, w) in patches)."""
    frames, height, width, channels = frames_thwc.shape
    temporal, patch, merge = options.temporal_patch_size, options.patch_size, options.merge_size
    grid = (frames // temporal, height // patch, width // patch)
    blocks = frames_thwc.reshape(grid[0], temporal, grid[1] // merge, merge, patch, grid[2] // merge, merge, patch,
                                 channels)
    # -> (t, h / merge, w / merge, merge row, merge col, channel, time, patch row, patch col)
    blocks = blocks.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    shape = (channels, 1, 1, 1)
    mean = (np.asarray(options.mean, np.float32) * np.float32(255)).reshape(shape)
    std = (np.asarray(options.std, np.float32) * np.float32(255)).reshape(shape)
    patches_px = np.empty(blocks.shape, np.float32)
    np.subtract(blocks, mean, out=patches_px, dtype=np.float32)
    patches_px /= std
    return patches_px.reshape(math.prod(grid), -1), grid


def image_patches(image_hwc_uint8: np.ndarray, options: Qwen3VLVisionOptions) -> tuple[np.ndarray, Grid]:
    """One RGB image (uint8 [H, W, 3]; `media.rgb_array` converts a PIL image as transformers does,
    alpha onto white) -> (patches_px float32 [h * w, 3 * temporal * patch^2], image_grid_thw (1, h, w)).
    The image is its own frame `temporal_patch_size` times."""
    _check_rgb(image_hwc_uint8[None], "an image: [H, W, 3]")
    height, width = image_size(*image_hwc_uint8.shape[:2], options)
    resized = resize_bicubic(image_hwc_uint8[None], height, width)
    return _patches(np.broadcast_to(resized, (options.temporal_patch_size, *resized.shape[1:])), options)


def video_patches(frames_thwc_uint8: np.ndarray, options: Qwen3VLVisionOptions) -> tuple[np.ndarray, Grid]:
    """The sampled frames (uint8 [T, H, W, 3], at `video_frame_indices`) -> (patches_px float32
    [t * h * w, 3 * temporal * patch^2], video_grid_thw (t, h, w)); t = ceil(T / temporal_patch_size),
    an odd frame count padded with the last frame."""
    _check_rgb(frames_thwc_uint8, "a video: [T, H, W, 3]")
    height, width = video_size(len(frames_thwc_uint8), *frames_thwc_uint8.shape[1:3], options)
    resized = resize_bicubic(frames_thwc_uint8, height, width)
    pad = -len(resized) % options.temporal_patch_size
    if pad:
        resized = np.concatenate([resized, np.repeat(resized[-1:], pad, axis=0)])
    return _patches(resized, options)


def _check_rgb(frames_thwc: np.ndarray, expected: str):
    if frames_thwc.ndim != 4 or frames_thwc.shape[-1] != 3 or frames_thwc.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB pixels ({expected}), got {frames_thwc.dtype} with the frames shaped "
                         f"{frames_thwc.shape[1:]}; convert PIL images with media.rgb_array")


def video_frame_indices(total_frames: int, fps: float | None, options: Qwen3VLVisionOptions) -> np.ndarray:
    """The frames `Qwen3VLVideoProcessor.sample_frames` picks from a video of `total_frames` frames at
    `fps` (None: the reference assumes 24): `options.fps` per second, at least `min_frames` (no more
    than the video has), at most `max_frames`; or `options.num_frames` as given (repeats when past the
    end). Evenly spaced, first and last frame included."""
    fps = 24 if fps is None else fps
    num_frames = options.num_frames
    if num_frames is None and options.fps is not None:
        num_frames = min(max(int(total_frames / fps * options.fps), options.min_frames), options.max_frames,
                         total_frames)
    if num_frames is None:
        num_frames = min(max(total_frames, options.min_frames), options.max_frames)
    return np.linspace(0, total_frames - 1, num_frames).round().astype(int)


def video_timestamps(frame_indices, fps: float | None, options: Qwen3VLVisionOptions) -> list[float]:
    """Seconds per temporal patch, as `Qwen3VLProcessor._calculate_timestamps`: the mean of its first and
    last frame's time (the indices padded with the last, like the frames). The processor writes each as
    `f"<{t:.1f} seconds>"` before that patch's `<|vision_start|>`."""
    fps = 24 if fps is None else fps
    temporal = options.temporal_patch_size
    indices = [int(i) for i in frame_indices]
    indices += indices[-1:] * (-len(indices) % temporal)
    seconds = [index / fps for index in indices]
    return [(seconds[i] + seconds[i + temporal - 1]) / 2 for i in range(0, len(seconds), temporal)]
