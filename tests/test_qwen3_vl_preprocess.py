"""Our numpy Qwen3-VL preprocessing against transformers' own processors (the oracle), built from their
classes: images of odd sizes, extreme aspect ratios and every PIL mode; videos as frame arrays and as
PyAV-written mp4s of several lengths and frame rates, sampled by fps. Pixels must be EXACTLY equal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF
from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor
from transformers.video_utils import VideoMetadata, load_video

from mrrm_jax.data import media
from mrrm_jax.data.media import rgb_array
from mrrm_jax.backbones.qwen3_vl.preprocess import (Qwen3VLVisionOptions, image_patches, resize_bicubic,
                                               video_frame_indices, video_patches, video_timestamps)

# Qwen3-VL-4B-Instruct's released preprocessor_config.json and video_preprocessor_config.json.
RELEASED_IMAGE = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                  "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Qwen2VLImageProcessorFast",
                  "image_std": [0.5, 0.5, 0.5], "merge_size": 2, "patch_size": 16,
                  "processor_class": "Qwen3VLProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
                  "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "temporal_patch_size": 2}
RELEASED_VIDEO = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                  "do_sample_frames": True, "fps": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                  "max_frames": 768, "merge_size": 2, "min_frames": 4, "patch_size": 16,
                  "processor_class": "Qwen3VLProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
                  "return_metadata": False, "size": {"longest_edge": 25165824, "shortest_edge": 4096},
                  "temporal_patch_size": 2, "video_processor_type": "Qwen3VLVideoProcessor"}
# Small pixel budgets keep the tests fast and make most inputs shrink or grow.
TINY = Qwen3VLVisionOptions(image_min_pixels=4 * 32 * 32, image_max_pixels=40 * 32 * 32,
                            video_min_pixels=4 * 32 * 32, video_max_pixels=96 * 32 * 32)
# Qwen2.5-VL's settings (14-pixel patches, OpenAI CLIP's mean and std), for the general paths.
CLIP = Qwen3VLVisionOptions(patch_size=14, mean=(0.48145466, 0.4578275, 0.40821073),
                            std=(0.26862954, 0.26130258, 0.27577711), image_min_pixels=56 * 56,
                            image_max_pixels=28 * 28 * 60)
# (height, width, mode): odd, tiny, extreme aspect ratios (2x400 is exactly 200:1), sides that round
# half to even (48 = 1.5 * 32, 80 = 2.5 * 32), large (many taps per pixel), every PIL mode.
IMAGES = [(33, 47, "RGB"), (300, 201, "RGB"), (17, 900, "RGB"), (900, 17, "RGB"), (1, 1, "RGB"), (2, 400, "RGB"),
          (48, 80, "RGB"), (700, 1000, "RGB"), (57, 91, "L"), (64, 50, "RGBA"), (40, 70, "P"), (45, 30, "P+T")]
LENGTHS, RATES = (1, 3, 7, 40), (1.0, 2.5, 30.0)


def _reference_processors(options: Qwen3VLVisionOptions):
    common = {"patch_size": options.patch_size, "temporal_patch_size": options.temporal_patch_size,
              "merge_size": options.merge_size, "image_mean": list(options.mean), "image_std": list(options.std)}
    image = Qwen2VLImageProcessor(
        size={"shortest_edge": options.image_min_pixels, "longest_edge": options.image_max_pixels}, **common)
    video = Qwen3VLVideoProcessor(
        size={"shortest_edge": options.video_min_pixels, "longest_edge": options.video_max_pixels}, fps=options.fps,
        num_frames=options.num_frames, min_frames=options.min_frames, max_frames=options.max_frames,
        cap_pixels_per_frame=options.cap_pixels_per_frame, max_video_tokens=options.max_video_tokens, **common)
    return image, video


@pytest.fixture(scope="module", params=["released", "tiny", "clip"])
def image_setup(request):
    options = {"released": Qwen3VLVisionOptions(), "tiny": TINY, "clip": CLIP}[request.param]
    return options, _reference_processors(options)[0]


@pytest.fixture(scope="module", params=["released", "tiny"])
def video_setup(request):
    options = {"released": Qwen3VLVisionOptions(), "tiny": TINY}[request.param]
    return options, _reference_processors(options)[1]


def _pil_image(index: int, height: int, width: int, mode: str) -> Image.Image:
    pixels = np.random.RandomState(index).randint(0, 256, (height, width, 4), dtype=np.uint8)
    if mode == "RGBA":  # transparency over the whole range, composited onto white
        return Image.fromarray(pixels, "RGBA")
    if mode.startswith("P"):
        image = Image.fromarray(pixels[..., :3]).quantize(16)
        if mode == "P+T":  # a transparent palette colour
            image.info["transparency"] = 3
        return image
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels[..., :3], mode)


def _assert_pixels_equal(ours: np.ndarray, reference):
    reference = np.asarray(reference)
    assert ours.dtype == reference.dtype == np.float32 and ours.shape == reference.shape
    np.testing.assert_array_equal(ours, reference)  # exact


def test_images_equal_the_image_processor(image_setup):
    options, image_processor = image_setup
    for index, (height, width, mode) in enumerate(IMAGES):
        image = _pil_image(index, height, width, mode)
        reference = image_processor(images=[image], return_tensors="np")
        patches_px, grid_thw = image_patches(rgb_array(image), options)
        _assert_pixels_equal(patches_px, reference["pixel_values"])
        assert grid_thw == tuple(reference["image_grid_thw"][0]), (height, width, mode)


@pytest.mark.parametrize("height,width", [(1, 201), (201, 1), (3, 700)])
def test_an_image_past_200_to_1_is_refused_like_the_reference(height, width):
    image = _pil_image(0, height, width, "RGB")
    with pytest.raises(ValueError, match="aspect ratio"):
        _reference_processors(TINY)[0](images=[image], return_tensors="np")
    with pytest.raises(ValueError, match="aspect ratio"):
        image_patches(rgb_array(image), TINY)


def _frames(length: int, height: int = 48, width: int = 64) -> np.ndarray:
    return np.random.RandomState(length).randint(0, 256, (length, height, width, 3), dtype=np.uint8)


def _reference_video(video_processor, frames, fps, **kwargs):
    out = video_processor(videos=[frames], video_metadata=[VideoMetadata(total_num_frames=len(frames), fps=fps)],
                          return_tensors="np", return_metadata=True, **kwargs)
    metadata = out["video_metadata"][0]
    # The processor's own timestamp arithmetic (it needs no tokenizer state).
    timestamps = Qwen3VLProcessor._calculate_timestamps(None, metadata.frames_indices, metadata.fps,
                                                        video_processor.temporal_patch_size)
    return out, metadata.frames_indices, timestamps


def _assert_video_equal(options, video_processor, frames, fps, **kwargs):
    reference, reference_indices, reference_timestamps = _reference_video(video_processor, frames, fps, **kwargs)
    indices = video_frame_indices(len(frames), fps, options)
    np.testing.assert_array_equal(indices, reference_indices)
    patches_px, grid_thw = video_patches(frames[indices], options)
    _assert_pixels_equal(patches_px, reference["pixel_values_videos"])
    assert grid_thw == tuple(reference["video_grid_thw"][0])
    assert video_timestamps(indices, fps, options) == reference_timestamps  # exact floats
    assert len(reference_timestamps) == grid_thw[0]


@pytest.mark.parametrize("fps", RATES)
@pytest.mark.parametrize("length", LENGTHS[1:])
def test_frame_arrays_equal_the_video_processor(video_setup, length, fps):
    options, video_processor = video_setup
    _assert_video_equal(options, video_processor, _frames(length), fps)


def test_frames_smaller_than_a_merged_patch_and_the_per_frame_cap():
    """Sides under 32 pixels are scaled up before rounding; the qwen-vl-utils cap (off by default)."""
    for options in (TINY, dataclasses.replace(TINY, cap_pixels_per_frame=True, max_video_tokens=6)):
        video_processor = _reference_processors(options)[1]
        _assert_video_equal(options, video_processor, _frames(9, 20, 90), 2.5)
        _assert_video_equal(options, video_processor, _frames(40, 120, 160), 30.0)


def test_num_frames_instead_of_fps():
    options = dataclasses.replace(TINY, fps=None, num_frames=5)  # 5 of 3 frames: the reference repeats frames
    video_processor = _reference_processors(options)[1]
    for length in (3, 7, 40):
        _assert_video_equal(options, video_processor, _frames(length), 30.0)
    with pytest.raises(ValueError, match="mutually exclusive"):  # why the options refuse both
        _reference_video(_reference_processors(TINY)[1], _frames(7), 2.0, num_frames=5)
    with pytest.raises(ValueError, match="exclude each other"):
        dataclasses.replace(TINY, num_frames=5)


@pytest.mark.parametrize("fps", RATES)
def test_a_one_frame_video_is_refused_like_the_reference(fps):
    with pytest.raises(ValueError, match="temporal_factor"):
        _reference_video(_reference_processors(TINY)[1], _frames(1), fps)
    indices = video_frame_indices(1, fps, TINY)
    np.testing.assert_array_equal(indices, [0])
    with pytest.raises(ValueError, match="at least 2 frames"):
        video_patches(_frames(1)[indices], TINY)


@pytest.mark.parametrize("fps", RATES)
@pytest.mark.parametrize("length", LENGTHS[1:])
def test_mp4s_decoded_by_our_reader_equal_the_reference_decode(tmp_path, length, fps):
    """transformers decodes with PyAV (its `load_video`, sampling while decoding); we decode only the
    frames our sampler picks (media.load_video)."""
    options, video_processor = TINY, _reference_processors(TINY)[1]
    media.write_mp4(tmp_path / "clip.mp4", _frames(length), fps)
    frames, metadata = load_video(str(tmp_path / "clip.mp4"), backend="pyav",
                                  sample_indices_fn=lambda metadata, **_: video_processor.sample_frames(metadata))
    reference = video_processor(videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                                return_tensors="np")
    ours, our_metadata = media.load_video(
        tmp_path / "clip.mp4", keep=lambda m: video_frame_indices(m["total_num_frames"], m["fps"], options))
    assert our_metadata["fps"] == metadata.fps and our_metadata["total_num_frames"] == length
    np.testing.assert_array_equal(our_metadata["frames_indices"], metadata.frames_indices)
    patches_px, grid_thw = video_patches(ours, options)
    _assert_pixels_equal(patches_px, reference["pixel_values_videos"])
    assert grid_thw == tuple(reference["video_grid_thw"][0])
    assert video_timestamps(our_metadata["frames_indices"], our_metadata["fps"], options) == (
        Qwen3VLProcessor._calculate_timestamps(None, metadata.frames_indices, metadata.fps, 2))


def test_frame_indices_equal_the_sampler():
    video_processor = _reference_processors(Qwen3VLVisionOptions())[1]
    for total in (1, 2, 3, 4, 5, 17, 64, 301, 1000, 5000, 100000):
        for fps in (0.5, 1.0, 2.5, 23.976, 29.97, 30.0, 59.94, 120.0, None):
            reference = video_processor.sample_frames(VideoMetadata(total_num_frames=total, fps=fps))
            np.testing.assert_array_equal(video_frame_indices(total, fps, Qwen3VLVisionOptions()), reference,
                                          err_msg=str((total, fps)))


def test_resize_equals_torchvision_for_many_sizes_and_any_thread_count():
    """The kernel alone, a batch of frames at a time: random sizes up and down (up to 60x fewer pixels
    per side: 2 * 120 + 1 taps)."""
    rng = np.random.RandomState(0)
    sizes = [(1, 1, 7, 5), (3000, 40, 50, 3000), (13, 900, 64, 32)] + [tuple(rng.randint(1, 400, 4)) for _ in range(40)]
    threads = torch.get_num_threads()
    try:
        for index, (height, width, out_h, out_w) in enumerate(sizes):
            torch.set_num_threads(1 + index % 2)
            frames = rng.randint(0, 256, (2, height, width, 3), dtype=np.uint8)
            reference = tvF.resize(torch.from_numpy(frames).permute(0, 3, 1, 2), [out_h, out_w],
                                   interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
            np.testing.assert_array_equal(resize_bicubic(frames, out_h, out_w), reference.permute(0, 2, 3, 1).numpy(),
                                          err_msg=str((height, width, out_h, out_w)))
    finally:
        torch.set_num_threads(threads)


def test_options_from_the_released_configs_and_refusals():
    assert Qwen3VLVisionOptions.from_processor_dicts(RELEASED_IMAGE, RELEASED_VIDEO) == Qwen3VLVisionOptions()
    legacy = {**RELEASED_IMAGE, "min_pixels": 1024, "max_pixels": 4096}  # Qwen2-VL's keys override size
    options = Qwen3VLVisionOptions.from_processor_dicts(legacy, RELEASED_VIDEO)
    assert (options.image_min_pixels, options.image_max_pixels) == (1024, 4096)
    refused = [({**RELEASED_IMAGE, "resample": 2}, RELEASED_VIDEO, "resample"),
               ({**RELEASED_IMAGE, "do_pad": True}, RELEASED_VIDEO, "do_pad"),
               (RELEASED_IMAGE, {**RELEASED_VIDEO, "do_sample_frames": False}, "do_sample_frames"),
               (RELEASED_IMAGE, {**RELEASED_VIDEO, "min_pixels": 4096}, "min_pixels"),
               ({k: v for k, v in RELEASED_IMAGE.items() if k != "patch_size"}, RELEASED_VIDEO, "patch_size"),
               (RELEASED_IMAGE, {**RELEASED_VIDEO, "num_frames": 16}, "num_frames"),
               ({**RELEASED_IMAGE, "size": {"height": 448, "width": 448}}, RELEASED_VIDEO, "shortest_edge")]
    for image_cfg, video_cfg, key in refused:
        with pytest.raises(ValueError, match=key):
            Qwen3VLVisionOptions.from_processor_dicts(image_cfg, video_cfg)
