"""Records -> examples: good records become examples; every bad input is a counted skip with its id."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mrrm_jax.data import examples, media, pipeline, records, tfds_records
from mrrm_jax import backbones


def write_mp4(path, num_frames=6, size=(64, 48), fps=4):
    frames = np.random.RandomState(0).randint(0, 256, (num_frames, size[1], size[0], 3), dtype=np.uint8)
    media.write_mp4(path, frames, fps)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "media").mkdir()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(root / "media" / "ok.png")
    (root / "media" / "empty.png").write_bytes(b"")
    write_mp4(root / "media" / "ok.mp4")
    data = (root / "media" / "ok.mp4").read_bytes()
    (root / "media" / "truncated.mp4").write_bytes(data[:600])  # not even the index is left
    # The index survives, the frames are cut away after their first bytes: nothing decodes.
    (root / "media" / "no_frames.mp4").write_bytes(data[: data.find(b"mdat") + 8])
    frames = root / "media" / "frames"
    frames.mkdir()
    for i in range(4):
        Image.fromarray(np.full((30, 30, 3), 40 * i, np.uint8)).save(frames / f"{i:03d}.jpg")
    (root / "outside.png").write_bytes((root / "media" / "ok.png").read_bytes())
    good = {"prompt": "What is it?", "responses": ["A.", "B."], "rankings": [1, 2]}
    lines = [
        {**good, "image": "ok.png"},
        {**good, "video": "ok.mp4"},
        {**good, "video": "frames", "sampling_interval": 0.5},
        good,
        {**good, "image": "empty.png"},
        {**good, "image": "missing.png"},
        {**good, "image": "../outside.png"},
        {**good, "video": "truncated.mp4"},
        {**good, "video": "no_frames.mp4"},
        {"prompt": "x", "rankings": [1, 2]},
        {**good, "rankings": [1, 2, 3]},
        {**good, "image": "frames"},  # a frame directory named as an image
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n{not json\n"
    (root / "train.jsonl").write_text(text)
    return root


def test_bad_inputs_are_counted_skips_and_the_rest_is_used(corpus, processor_dir, caplog):
    processor = backbones.load_processor(processor_dir)
    counter = records.SkipCounter()
    built = records.build_examples(corpus / "train.jsonl", processor, examples.Budget(),
                                   np.random.default_rng(0), counter, media_root=corpus / "media")
    assert len(built) == 4
    assert counter["bad_image"] == 2 and counter["missing_file"] == 1 and counter["path_outside_root"] == 1
    assert counter["bad_video"] == 1 and counter["no_frames"] == 1
    assert counter["bad_responses"] == 1 and counter["bad_rankings"] == 1 and counter["bad_json"] == 1
    assert "train.jsonl:5" in caplog.text and "empty.png" in caplog.text


def test_frame_directory_needs_a_rate(corpus):
    files = records.MediaDir(corpus / "media")
    with pytest.raises(examples.Skip, match="needs 'fps' or 'sampling_interval'"):
        records.load_media({"video": "frames"}, "r:1", files)
    loaded = records.load_media({"video": "frames", "fps": 2}, "r:1", files)
    assert loaded["video"].shape == (4, 30, 30, 3) and loaded["video_metadata"]["duration"] == 2.0


def test_a_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        records.read_jsonl(tmp_path / "nope.jsonl")


def test_the_tfds_build_of_a_corpus_gives_the_same_examples_and_skips(corpus, processor_dir, tmp_path):
    """The ArrayRecord dataset (media inside, read through `as_data_source`) against the JSONL it came from."""
    jsonl_dir = tmp_path / "jsonl"
    shutil.copytree(corpus / "media", jsonl_dir)  # the builder reads media relative to the JSONL
    shutil.copy(corpus / "train.jsonl", jsonl_dir / "train.jsonl")
    builder = tfds_records.MultiResponseRecords(data_dir=tmp_path / "tfds")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(jsonl_dir)))
    shutil.rmtree(jsonl_dir)  # the dataset needs none of the files it was built from
    source = tfds_records.RecordSource(
        tfds_records.MultiResponseRecords(data_dir=tmp_path / "tfds").as_data_source("train"))
    from_jsonl = records.read_jsonl(corpus / "train.jsonl")
    assert len(source) == len(from_jsonl) == 13

    prepare = pipeline.PrepareExample(processor_dir, backbones.load_processor, examples.Budget(), seed=0, media_root=corpus / "media")
    used = 0
    for index, jsonl_item in enumerate(from_jsonl):
        tfds_item = source[index]
        assert tfds_item[:2] == jsonl_item
        ours, reference = prepare(index, tfds_item), prepare(index, jsonl_item)
        np.testing.assert_array_equal(ours["counts"], reference["counts"], err_msg=jsonl_item[0])
        assert (ours["example"] is None) == (reference["example"] is None)
        if reference["example"] is not None:
            used += 1
            for key, value in reference["example"].items():
                np.testing.assert_array_equal(ours["example"][key], value, err_msg=f"{jsonl_item[0]} {key}")
    assert used == 4
