"""Our numpy Molmo2 preprocessing against transformers' processors (the oracle): images of many sizes,
aspect ratios and modes, and mp4 videos of several lengths and frame rates, decoded by our decoders."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from PIL import Image
from transformers.video_utils import VideoMetadata

from mrrm_jax.data import examples, media
from mrrm_jax.backbones.molmo2 import preprocess
from mrrm_jax.backbones import load_processor
from mrrm_jax.backbones.molmo2.processor_files import write_molmo2_processor_dir
from tests import oracle

# (height, width, mode): tiny, odd, exact crop size, panoramas, huge, and every mode load_image yields.
IMAGES = [(1, 1, "RGB"), (3, 5, "RGB"), (100, 150, "RGB"), (378, 378, "RGB"), (60, 900, "RGB"),
          (900, 60, "RGB"), (1500, 2000, "RGB"), (777, 333, "L"), (113, 200, "RGBA"), (240, 320, "P")]
# (frames, fps): shorter than max_fps sampling, long, high and fractional frame rates.
VIDEOS = [(5, 2.0), (13, 1.0), (40, 30.0), (97, 23.976)]


@pytest.fixture(scope="module", params=["molmo2", "tiny"])
def processor(request, tmp_path_factory, processor_dir):
    """Molmo2's own settings (378-pixel crops, 8 crops, 64 frames) and the tests' tiny ones."""
    if request.param == "tiny":
        return load_processor(processor_dir)
    return load_processor(write_molmo2_processor_dir(tmp_path_factory.mktemp("molmo2_processor")))


@pytest.fixture(scope="module")
def hf_processor(processor, tmp_path_factory):
    return oracle.hf_processor(processor, tmp_path_factory.mktemp("hf_processor"))


def _tiny_options() -> preprocess.VisionOptions:
    return preprocess.VisionOptions(crop_size=oracle.CROP, max_crops=4, overlap_margins=(2, 2), num_frames=4)


def _image_file(tmp_path, index, height, width, mode):
    pixels = np.random.RandomState(index).randint(0, 256, (height, width, 4), dtype=np.uint8)
    if mode == "RGBA":
        image = Image.fromarray(pixels, "RGBA")
    elif mode == "P":  # a palette image with a transparent colour: load_image makes it RGBA
        image = Image.fromarray(pixels[..., :3]).quantize(16)
        image.info["transparency"] = 3
    else:
        image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels[..., :3], mode)
    path = tmp_path / f"image{index}.png"
    image.save(path)
    return path


def _assert_equal_outputs(ours: dict, reference, keys):
    for key in keys:
        expected = np.asarray(reference[key])
        assert ours[key].dtype == expected.dtype and ours[key].shape == expected.shape, key
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)  # exact, pixels included


@pytest.mark.parametrize("max_crops", [None, 2, 1])
def test_images_equal_the_image_processor(processor, hf_processor, tmp_path, max_crops):
    options = processor.options
    images = [media.load_image(_image_file(tmp_path, i, *spec)) for i, spec in enumerate(IMAGES)]
    kwargs = {} if max_crops is None else {"max_crops": max_crops}
    reference = hf_processor.image_processor(images=images, return_tensors="np", **kwargs)
    ours = preprocess.image_inputs(images, options, max_crops)
    _assert_equal_outputs(ours, reference, ["pixel_values", "image_token_pooling", "image_grids", "image_num_crops"])
    for index in range(len(images)):
        assert preprocess.image_tokens(ours["image_grids"][index], options) == hf_processor.replace_image_token(
            {"image_grids": reference["image_grids"]}, index)


@pytest.mark.parametrize("num_frames", [None, 8, 2])
@pytest.mark.parametrize("length,fps", VIDEOS)
def test_videos_equal_the_video_processor(processor, hf_processor, tmp_path, length, fps, num_frames):
    """The reference samples from every decoded frame; ours decodes only what the budget can pick."""
    options = processor.options
    frames = np.random.RandomState(length).randint(0, 256, (length, 48, 64, 3), dtype=np.uint8)
    media.write_mp4(tmp_path / "clip.mp4", frames, fps)
    all_frames, metadata = media.load_video(tmp_path / "clip.mp4")
    assert len(all_frames) == metadata["total_num_frames"] == length

    kwargs = {} if num_frames is None else {"num_frames": num_frames}
    reference = hf_processor.video_processor(
        videos=[all_frames], video_metadata=[VideoMetadata(total_num_frames=length, fps=metadata["fps"])],
        return_tensors="np", return_metadata=True, **kwargs)

    budget = examples.Budget(max_frames=num_frames or options.num_frames)
    keep = examples.frames_to_keep(budget, processor)
    kept_frames, kept_metadata = media.load_video(tmp_path / "clip.mp4", keep=keep)
    sampled, timestamps = preprocess.sample_video(kept_frames, kept_metadata, options, num_frames)
    ours = preprocess.video_inputs(sampled, options)
    _assert_equal_outputs(ours, reference, ["pixel_values_videos", "video_token_pooling", "video_grids"])
    assert preprocess.video_tokens(ours["video_grids"][0], timestamps, options) == hf_processor.replace_video_token(
        reference, 0)
    assert len(kept_frames) <= len(all_frames)


def test_sample_frame_indices_equal_the_video_processor(processor, hf_processor):
    options = processor.options
    for total, fps, num_frames in [(1, 30.0, None), (7, 2.0, 4), (64, 2.0, None), (300, 29.97, None),
                                   (301, 30.0, 33), (1000, 24.0, 16), (9999, 59.94, 64), (5, 0.5, 64)]:
        reference = hf_processor.video_processor.sample_frames(
            VideoMetadata(total_num_frames=total, fps=fps), num_frames=num_frames).numpy()
        ours = preprocess.sample_frame_indices({"total_num_frames": total, "fps": fps}, options, num_frames)
        np.testing.assert_array_equal(ours, reference, err_msg=str((total, fps, num_frames)))


def test_frame_directory_sampling_keeps_both_ends_and_reads_only_those_files(tmp_path):
    directory = tmp_path / "frames"
    directory.mkdir()
    for index in range(10):
        Image.new("RGB", (32, 24), (index * 20, 0, 0)).save(directory / f"{index:03d}.png")
    (directory / "005.png").write_bytes(b"not an image")  # never sampled below, so never read
    options = dataclasses.replace(_tiny_options(), num_frames=4)
    keep = functools.partial(preprocess.sample_frame_indices, options=options)
    frames, metadata = media.load_video(directory, fps=2.0, keep=keep)
    np.testing.assert_array_equal(metadata["frames_indices"], [0, 3, 6, 9])
    sampled, timestamps = preprocess.sample_video(frames, metadata, options)
    assert [int(f[0, 0, 0]) for f in sampled] == [0, 60, 120, 180]
    np.testing.assert_allclose(timestamps, [0.0, 1.5, 3.0, 4.5])
    sampled, timestamps = preprocess.sample_video(frames, metadata, options, num_frames=2)
    np.testing.assert_allclose(timestamps, [0.0, 4.5])


def test_a_cut_video_is_sampled_from_the_frames_it_really_has(tmp_path):
    frames = np.random.RandomState(0).randint(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    media.write_mp4(tmp_path / "clip.mp4", frames, 10.0)
    data = (tmp_path / "clip.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 2 // 3])
    everything, metadata = media.load_video(tmp_path / "cut.mp4")
    assert 0 < metadata["total_num_frames"] < 60  # the container still says 60
    options = _tiny_options()
    kept, kept_metadata = media.load_video(
        tmp_path / "cut.mp4", keep=lambda m: preprocess.sample_frame_indices(m, options))
    assert kept_metadata["total_num_frames"] == metadata["total_num_frames"]
    np.testing.assert_array_equal(kept, everything[kept_metadata["frames_indices"]])


