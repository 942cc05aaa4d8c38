"""Molmo2 vision preprocessing in numpy, equal to transformers' `Molmo2ImageProcessor`,
`Molmo2VideoProcessor` and the token strings `Molmo2Processor` puts in place of `<|image|>` / `<|video|>`.

Why our own: it runs in the grain workers without torch, is thread-safe (the HF processors are not),
and lets the video decoder convert only the frames the sampler will pick.

An image becomes one global crop (the whole image resized to `crop_size`^2) plus up to `max_crops`
overlapping crops of a canvas the image is resized to; neighbouring crops overlap by the margins, and
the patches in the overlap belong to one crop only (the pooling indices skip the other's copy). A video
frame is one global crop. Patch features are pooled in windows of `pooling` patches; `-1` pads a window.

Exactness notes (where our code mirrors the reference's arithmetic):
- resize: torch's bilinear `interpolate` (align_corners=False, no antialias) in float32 on uint8
  values, rounded half to even and clamped back to uint8 (transformers resizes in float for that).
  The taps, the weights, the two 1-D passes and the fused multiply-adds follow torch's CPU kernel
  step by step, so the float32 results are bit-identical (float64 stands in for the fused operations:
  a double rounding could in principle differ in the last bit; the parity tests have seen none).
  That is the kernel torch runs with more than one intra-op thread; with one, torch switches to a
  channels-last kernel that rounds differently, so transformers' own output depends on its thread
  count (measured: a few values in a million, one grey level apart); the parity tests run torch with
  its default, all cores.
- normalise: (x - 255 * mean) / (255 * std) in float32 (transformers fuses the rescale into the
  normalisation that way). Our model batches carry the uint8 pixels instead (4x fewer bytes through
  packing and onto the device); the model looks each value up in `pixel_table`, the same arithmetic
  done once for the 256 values, so its inputs are bit-identical to these.
- frame sampling: `arange(0, total, total / target)` evaluated in float64, stored as float32, then
  truncated to int; timestamps index / fps in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import numpy as np
from PIL import Image

from mrrm_jax.data import media


@dataclasses.dataclass(frozen=True)
class VisionOptions:
    """The processors' settings (defaults: Molmo2's); `processor.load` reads a checkpoint's."""
    crop_size: int = 378
    patch_size: int = 14
    image_pooling: tuple[int, int] = (2, 2)
    video_pooling: tuple[int, int] = (3, 3)
    overlap_margins: tuple[int, int] = (4, 4)
    max_crops: int = 8
    num_frames: int = 64
    max_fps: float | None = 2
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    # How `Molmo2Processor` spells the media tokens.
    image_use_col_tokens: bool = True
    use_single_crop_col_tokens: bool | None = None
    use_single_crop_start_token: bool = True
    video_use_col_tokens: bool = False
    use_frame_special_tokens: bool = True


@functools.lru_cache(maxsize=256)
def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's `compute_source_index_and_lambda` (align_corners=False) in float32: for every output
    pixel the two source indices and their weights. Cached (video frames share a size): read-only."""
    if in_size == out_size:
        index = np.arange(out_size)
        taps = index, index, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
        # torch's CPU kernel computes scale * (i + 0.5) - 0.5 as one fused multiply-add: float64 holds the
        # product of two float32 exactly, so a float64 evaluation rounded once to float32 matches it.
        centres = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
        source = (np.float64(scale) * centres.astype(np.float64) - 0.5).astype(np.float32)
        source = np.maximum(source, np.float32(0))
        index0 = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
        weight1 = np.clip(source - index0.astype(np.float32), np.float32(0), np.float32(1))
        taps = index0, index0 + (index0 < in_size - 1), np.float32(1) - weight1, weight1
    for array in taps:
        array.flags.writeable = False
    return taps


def _lerp(value0, weight0, value1, weight1):
    """float32 `value0 * weight0 + value1 * weight1` as torch's kernel compiles it: a fused multiply-add
    onto the rounded second product (float64 holds the exact first product; one rounding at the end).
    `weight0` float64, `weight1` float32."""
    out = value0.astype(np.float64)
    out *= weight0
    out += value1 * weight1
    return out.astype(np.float32)


# Where the left source column is 128 or more, the float32 source coordinate keeps at most 16
# fractional bits, so both width weights are multiples of 2^-16 and x0 * w0 + x1 * w1 of 8-bit values
# is exact in float32: plain float32 arithmetic equals the fused multiply-add there, and only the
# output columns before need _lerp.
_PLAIN_FROM_COLUMN = 128
# Output values per block of rows: the float64 temporaries (256 KiB) stay in cache.
_BLOCK_VALUES = 1 << 15


def resize(image_hwc: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [height, width, C], bilinear exactly as the reference (module doc):
    the width pass, then the height pass over its float32 results, a block of output rows at a time
    (the width pass only on the source rows the block reads)."""
    in_h, in_w, channels = image_hwc.shape
    h0, h1, wh0, wh1 = _linear_taps(in_h, height)
    w0, w1, ww0, ww1 = _linear_taps(in_w, width)
    # The width pass runs on rows of W * C values: a source index and a weight per output value.
    cols0 = (w0[:, None] * channels + np.arange(channels)).ravel()
    cols1 = (w1[:, None] * channels + np.arange(channels)).ravel()
    ww0, ww1 = np.repeat(ww0, channels), np.repeat(ww1, channels)
    fused = channels * int(np.searchsorted(w0, _PLAIN_FROM_COLUMN))
    ww0_fused = ww0[:fused].astype(np.float64)
    # The source rows the height pass reads, and each output row's two taps numbered among them.
    read = np.zeros(in_h, bool)
    read[h0] = read[h1] = True
    rows_read = np.flatnonzero(read)
    rank = np.cumsum(read) - 1
    r0, r1 = rank[h0], rank[h1]
    wh0, wh1 = wh0.astype(np.float64)[:, None], wh1[:, None]

    pixels = image_hwc.reshape(in_h, in_w * channels)
    out = np.empty((height, width * channels), np.uint8)
    block = max(1, _BLOCK_VALUES // (width * channels))
    for start in range(0, height, block):
        end = min(start + block, height)
        first, last = r0[start], r1[end - 1] + 1
        source = pixels[rows_read[first:last]]
        x0, x1 = source[:, cols0], source[:, cols1]
        rows = x0 * ww0
        rows += x1 * ww1
        rows[:, :fused] = _lerp(x0[:, :fused], ww0_fused, x1[:, :fused], ww1[:fused])
        values = _lerp(rows[r0[start:end] - first], wh0[start:end], rows[r1[start:end] - first], wh1[start:end])
        # Round half to even; non-negative weights summing to 1 keep the values in [0, 255] (no clamp).
        out[start:end] = np.rint(values, out=values)
    return out.reshape(height, width, channels)


def _patches(crops_nhwc: np.ndarray, patch: int) -> np.ndarray:
    """uint8 [N, H, W, C] -> uint8 [N, (H / patch) * (W / patch), patch * patch * C]: patches in
    row-major order, channels innermost."""
    n, h, w, c = crops_nhwc.shape
    patches = crops_nhwc.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(n, (h // patch) * (w // patch), patch * patch * c)


def normalize(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 [..., D] (channels innermost, D a multiple of the channels) -> float32
    (x - 255 * mean) / (255 * std), as transformers computes it."""
    reps = pixels.shape[-1] // len(mean)
    # Per value of a patch, so numpy's inner loops run a whole patch long.
    mean_d = np.tile(np.asarray(mean, np.float32) * np.float32(255), reps)
    std_d = np.tile(np.asarray(std, np.float32) * np.float32(255), reps)
    out = np.subtract(pixels, mean_d, dtype=np.float32)
    out /= std_d
    return out


def pixel_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 [256, C]: `normalize` of every uint8 value in every channel. The model normalises uint8
    crops by looking them up here: XLA compiles a division by a constant into a multiplication by its
    reciprocal, which differs from transformers' float32 division in the last bit."""
    return normalize(np.repeat(np.arange(256, dtype=np.uint8)[:, None], len(mean), axis=1), mean, std)


def _pooling_windows(index_grid: np.ndarray, pool_h: int, pool_w: int) -> tuple[np.ndarray, int, int]:
    """[h, w] patch indices -> [rows * cols, pool_h * pool_w] windows, the grid centred in -1 padding."""
    pad_h, pad_w = -index_grid.shape[0] % pool_h, -index_grid.shape[1] % pool_w
    grid = np.pad(index_grid, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)), constant_values=-1)
    rows, cols = grid.shape[0] // pool_h, grid.shape[1] // pool_w
    windows = grid.reshape(rows, pool_h, cols, pool_w).transpose(0, 2, 1, 3).reshape(rows * cols, pool_h * pool_w)
    return windows, rows, cols


def select_tiling(height: int, width: int, window: int, max_crops: int) -> tuple[int, int]:
    """The (rows, cols) of crops that needs the least upscaling, or else the least downscaling;
    candidates ordered by crop count then rows (the reference's tie-break), float32 scales."""
    tilings = sorted(((h, w) for h, w in itertools.product(range(1, max_crops + 1), repeat=2) if h * w <= max_crops),
                     key=lambda t: (t[0] * t[1], t[0]))
    with np.errstate(divide="ignore"):  # an image no larger than the margins: the reference divides by 0 too
        scales = (np.asarray(tilings, np.float32) * np.float32(window) / np.asarray([height, width], np.float32)).min(-1)
    if np.all(scales < 1):
        return tilings[int(scales.argmax())]
    return tilings[int(np.where(scales < 1, np.float32(10e9), scales).argmin())]


def _image_inputs_one(rgb_hwc: np.ndarray, options: VisionOptions, max_crops: int):
    """One image -> (uint8 crops [1 + crops, crop, crop, C], global crop first; pooling [tokens, pool];
    grid [4])."""
    crop, patch = options.crop_size, options.patch_size
    left, right = options.overlap_margins
    crop_patches = crop // patch
    window = (crop_patches - left - right) * patch
    margin = (left + right) * patch
    tiles_h, tiles_w = select_tiling(rgb_hwc.shape[0] - margin, rgb_hwc.shape[1] - margin, window, max_crops)
    canvas = resize(rgb_hwc, tiles_h * window + margin, tiles_w * window + margin)
    tiles = [canvas[i * window: i * window + crop, j * window: j * window + crop]
             for i in range(tiles_h) for j in range(tiles_w)]
    crops = np.stack([resize(rgb_hwc, crop, crop)] + tiles)  # the global crop first

    # Each crop's patches, numbered crop by crop; the margins a neighbour also covers are dropped.
    index = np.arange(tiles_h * tiles_w * crop_patches ** 2, dtype=np.int32).reshape(
        tiles_h, tiles_w, crop_patches, crop_patches)
    if left:
        index[1:, :, :left, :] = -1
        index[:, 1:, :, :left] = -1
    if right:
        index[:-1, :, -right:, :] = -1
        index[:, :-1, :, -right:] = -1
    index = index.transpose(0, 2, 1, 3).reshape(-1)
    index = index[index >= 0].reshape((tiles_h * window + margin) // patch, -1)
    pooling_h, rows_h, cols_h = _pooling_windows(index, *options.image_pooling)

    whole_index = np.arange(crop_patches ** 2, dtype=np.int32).reshape(crop_patches, crop_patches)
    pooling_l, rows_l, cols_l = _pooling_windows(whole_index, *options.image_pooling)

    # The global crop comes first, so the tiled crops' patch indices shift by one crop.
    pooling_h = np.where(pooling_h >= 0, pooling_h + crop_patches ** 2, -1)
    return crops, np.concatenate([pooling_l, pooling_h]), np.asarray([rows_l, cols_l, rows_h, cols_h], np.int64)


def image_inputs(images: list[Image.Image], options: VisionOptions, max_crops: int | None = None,
                 normalized: bool = True) -> dict:
    """`Molmo2ImageProcessor` outputs (numpy) for a list of images: `pixel_values` float32
    [crops, P, D] (`normalized=False`: the uint8 pixels before normalisation), `image_token_pooling`
    int32 (indices over all the images' patches), `image_grids` int64 [n, 4] (low-res rows, cols,
    high-res rows, cols), `image_num_crops` int64 [n]."""
    max_crops = options.max_crops if max_crops is None else max_crops
    crops, pooling, grids, offset = [], [], [], 0
    patches_per_crop = (options.crop_size // options.patch_size) ** 2
    for image in images:
        image_crops, windows, grid = _image_inputs_one(media.rgb_array(image), options, max_crops)
        pooling.append(np.where(windows >= 0, windows + offset, -1))
        crops.append(image_crops)
        grids.append(grid)
        offset += len(image_crops) * patches_per_crop
    pixels = _patches(np.concatenate(crops), options.patch_size)
    return {"pixel_values": normalize(pixels, options.mean, options.std) if normalized else pixels,
            "image_token_pooling": np.concatenate(pooling), "image_grids": np.stack(grids),
            "image_num_crops": np.asarray([len(c) for c in crops], np.int64)}


def sample_frame_indices(metadata: dict, options: VisionOptions, num_frames: int | None = None) -> np.ndarray:
    """The frames (indices into the whole video) used for `num_frames` (default the processor's).

    A video file: as `Molmo2VideoProcessor.sample_frames`, evenly spaced from frame 0, fewer when the
    video is too short for them at `max_fps`. A frame directory (metadata "sampling": "ends"): evenly
    spaced with both ends included, as Molmo2's frame-directory reader.
    """
    total, fps = metadata["total_num_frames"], metadata["fps"]
    target = options.num_frames if num_frames is None else num_frames
    if metadata.get("sampling") == "ends":
        return np.unique(np.round(np.linspace(0, total - 1, min(target, total))).astype(np.int64))
    duration = metadata.get("duration") or total / fps
    if options.max_fps is not None and fps > options.max_fps:
        target = min(target, int(duration * options.max_fps))
    target = max(min(target, total), 1)
    step = total / target
    return (np.arange(math.ceil(total / step), dtype=np.float64) * step).astype(np.float32).astype(np.int64)


def sample_video(frames_thwc: np.ndarray, metadata: dict, options: VisionOptions,
                 num_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sampled frames, their timestamps in seconds). `frames_thwc` holds the frames at
    `metadata["frames_indices"]` (a decoder that kept only what sampling can pick), or every frame."""
    picked = sample_frame_indices(metadata, options, num_frames)
    # float32, as the reference divides its int32 index tensor by the fps: it prints them with ".1f".
    return media.picked_frames(frames_thwc, metadata, picked), picked.astype(np.float32) / np.float32(metadata["fps"])


def video_inputs(frames_thwc: np.ndarray, options: VisionOptions, normalized: bool = True) -> dict:
    """`Molmo2VideoProcessor` outputs (numpy) for one video's sampled frames: `pixel_values_videos`
    float32 [T, P, D] (`normalized=False`: uint8 pixels), `video_token_pooling` int64 [T * tokens, pool],
    `video_grids` int64 [1, 3]."""
    crop, patch = options.crop_size, options.patch_size
    patches = _patches(np.stack([resize(frame, crop, crop) for frame in frames_thwc]), patch)
    patches = normalize(patches, options.mean, options.std) if normalized else patches
    index = np.arange((crop // patch) ** 2, dtype=np.int32).reshape(crop // patch, crop // patch)
    windows, rows, cols = _pooling_windows(index, *options.video_pooling)
    offsets = (np.arange(len(patches), dtype=np.int64) * patches.shape[1])[:, None, None]
    pooling = np.where(windows >= 0, windows + offsets, -1).reshape(-1, windows.shape[-1])
    return {"pixel_values_videos": patches, "video_token_pooling": pooling,
            "video_grids": np.asarray([[len(patches), rows, cols]], np.int64)}


def image_tokens(grid, options: VisionOptions) -> str:
    """The text `Molmo2Processor` puts in place of one `<|image|>`: the global crop's rows of
    patches, then the high-resolution grid's."""
    rows_l, cols_l, rows_h, cols_h = (int(v) for v in grid)
    col = options.image_use_col_tokens if options.use_single_crop_col_tokens is None else options.use_single_crop_col_tokens
    start = "<low_res_im_start>" if options.use_single_crop_start_token else "<im_start>"
    low = start + ("<im_patch>" * cols_l + "<im_col>" * col) * rows_l + "<im_end>"
    high = "<im_start>" + ("<im_patch>" * cols_h + "<im_col>" * options.image_use_col_tokens) * rows_h + "<im_end>"
    return low + high


def video_tokens(grid, timestamps, options: VisionOptions) -> str:
    """The text in place of `<|video|>`: per frame its time in seconds, then its rows of patches."""
    _, rows, cols = (int(v) for v in grid)
    start, end = ("<frame_start>", "<frame_end>") if options.use_frame_special_tokens else ("<im_start>", "<im_end>")
    frame = start + ("<im_patch>" * cols + "<im_col>" * options.video_use_col_tokens) * rows + end
    return " ".join(f"{float(time):.1f} {frame}" for time in timestamps)
