"""Our Qwen3-VL processor directory, its torch-free reader, token expansion and rope index against
transformers: `AutoProcessor` (`Qwen3VLProcessor`, torchvision) on the same directory, and
`Qwen3VLModel.get_rope_index` of a tiny random model."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen3VLConfig, Qwen3VLModel

from mrrm_jax import backbones
from mrrm_jax.data import formatting
from mrrm_jax.backbones.qwen3_vl import preprocess as qwen3_vl_preprocess
from mrrm_jax.backbones.qwen3_vl import processor as processor_lib
from mrrm_jax.backbones.qwen3_vl.positions import rope_index
from mrrm_jax.backbones.qwen3_vl.processor_files import (QWEN3_VL_4B_IMAGE, QWEN3_VL_4B_VIDEO,
                                                         write_qwen3_vl_processor_dir)
from mrrm_jax.data.tokenizer import QWEN_ADDED_TOKENS

# Qwen3-VL-4B-Instruct's released preprocessor_config.json and video_preprocessor_config.json, verbatim.
RELEASED_IMAGE = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                  "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                  "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                  "image_processor_type": "Qwen2VLImageProcessorFast"}
RELEASED_VIDEO = {"size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16,
                  "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                  "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                  "video_processor_type": "Qwen3VLVideoProcessor"}
# Small pixel budgets (in pixels; a merged token is 32 x 32): a few tokens per image and video frame.
PROCESSOR_KWARGS = dict(image_processor_kwargs=dict(size={"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 12}),
                        video_processor_kwargs=dict(size={"shortest_edge": 32 * 32 * 2, "longest_edge": 32 * 32 * 24}))
RNG = np.random.default_rng(0)
IMAGES = {"wide": Image.fromarray(RNG.integers(0, 256, (100, 150, 3), np.uint8)),
          "small": Image.fromarray(RNG.integers(0, 256, (64, 96, 3), np.uint8))}
# name: (source frames, source fps); transformers samples them at its default 2 fps, at least 4 frames.
VIDEOS = {"4@2fps": (4, 2.0), "9@1fps": (9, 1.0), "40@30fps": (40, 30.0)}
FRAMES = {name: RNG.integers(0, 256, (num_frames, 48, 80, 3), np.uint8) for name, (num_frames, _) in VIDEOS.items()}
CASES = {  # name: (message parts in order, with image / video names)
    "text": [("text", "Just words, no pictures.")],
    "image": [("image", "wide"), ("text", "Describe it.")],
    "two_images": [("text", "Compare"), ("image", "wide"), ("image", "small"), ("text", "Which is brighter?")],
    **{f"video_{name}": [("video", name), ("text", "What happens?")] for name in VIDEOS},
    "image_video": [("image", "small"), ("video", "9@1fps"), ("text", "Same scene?")],
    "two_images_video": [("image", "wide"), ("text", "then"), ("video", "40@30fps"), ("image", "small"),
                         ("text", "Which came first?")],
}


def _seconds(frame_indices, fps) -> list[float]:
    return qwen3_vl_preprocess.video_timestamps(frame_indices, fps, qwen3_vl_preprocess.Qwen3VLVisionOptions())


def _messages(parts) -> list[dict]:
    content = [{"type": kind, "text": value} if kind == "text" else {"type": kind} for kind, value in parts]
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory) -> pathlib.Path:
    return write_qwen3_vl_processor_dir(tmp_path_factory.mktemp("qwen3_vl"), **PROCESSOR_KWARGS)


@pytest.fixture(scope="module")
def ours(processor_dir):
    return processor_lib.load(processor_dir)


@pytest.fixture(scope="module")
def reference(processor_dir):
    return AutoProcessor.from_pretrained(processor_dir)


@pytest.fixture(scope="module")
def reference_model():
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[2, 1, 1],
                                              mrope_interleaved=True)),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           deepstack_visual_indexes=[0]))
    torch.manual_seed(0)
    return Qwen3VLModel(config).float().eval()


@pytest.fixture(scope="module")
def outputs(reference):
    """transformers' processor output per case, and the rendered text it was given."""
    results = {}
    for name, parts in CASES.items():
        text = reference.apply_chat_template(_messages(parts), tokenize=False, add_generation_prompt=True)
        images = [IMAGES[value] for kind, value in parts if kind == "image"] or None
        videos = [VIDEOS[value] for kind, value in parts if kind == "video"]
        frames = [FRAMES[value] for kind, value in parts if kind == "video"] or None
        metadata = [{"fps": fps, "total_num_frames": num_frames} for num_frames, fps in videos] or None
        results[name] = text, reference(text=[text], images=images, videos=frames, video_metadata=metadata,
                                        return_metadata=True, return_tensors="np")
    return results


def test_directory_is_what_transformers_saves(processor_dir, reference, tmp_path):
    saved = tmp_path / "saved"
    reference.save_pretrained(saved)
    for name in ("processor_config.json", "chat_template.jinja"):
        assert (saved / name).read_text() == (processor_dir / name).read_text(), name
    tokenizer = reference.tokenizer
    assert len(tokenizer) == 151669  # Qwen's 151643 BPE ranks + its 26 added tokens, no Molmo2 ones
    assert [tokenizer.convert_ids_to_tokens(token_id) for _, token_id, _ in QWEN_ADDED_TOKENS] == \
        [content for content, _, _ in QWEN_ADDED_TOKENS]
    assert [token_id for _, token_id, _ in QWEN_ADDED_TOKENS] == list(range(151643, 151669))
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert (reference.image_token_id, reference.video_token_id) == (151655, 151656)
    assert (reference.vision_start_token_id, reference.vision_end_token_id) == (151652, 151653)


def _released_layout(processor_dir: pathlib.Path, out: pathlib.Path, **image_overrides) -> pathlib.Path:
    """Our tokenizer with the released checkpoint's other files (one per sub-processor, template as JSON)."""
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(processor_dir / name, out / name)
    (out / "preprocessor_config.json").write_text(json.dumps({**RELEASED_IMAGE, **image_overrides}))
    (out / "video_preprocessor_config.json").write_text(json.dumps(RELEASED_VIDEO))
    template = (processor_dir / "chat_template.jinja").read_text()
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return out


@pytest.mark.parametrize("legacy_keys", [False, True])
def test_released_layout_settings_equal_transformers(processor_dir, tmp_path, legacy_keys):
    overrides = dict(min_pixels=32 * 32 * 3, max_pixels=32 * 32 * 40) if legacy_keys else {}
    released = _released_layout(processor_dir, tmp_path / "released", **overrides)
    reference, ours = AutoProcessor.from_pretrained(released), processor_lib.load(released)
    reference.save_pretrained(tmp_path / "saved")
    expected = json.loads((tmp_path / "saved" / "processor_config.json").read_text())
    # The released files name the image processor "...Fast", which transformers 5 saves as the one class.
    assert ours.image_config == {**expected["image_processor"], "image_processor_type": "Qwen2VLImageProcessorFast"}
    assert ours.video_config == expected["video_processor"]
    assert ours.chat_template == reference.chat_template
    if legacy_keys:
        assert ours.image_config["size"] == {"shortest_edge": 32 * 32 * 3, "longest_edge": 32 * 32 * 40}
    else:  # the writer's Qwen3-VL-4B settings are what transformers reads from the released files
        assert {**processor_lib.IMAGE_DEFAULTS, **QWEN3_VL_4B_IMAGE} == expected["image_processor"]
        assert {**processor_lib.VIDEO_DEFAULTS, **QWEN3_VL_4B_VIDEO} == expected["video_processor"]


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_equal_transformers(ours, reference, generation_prompt):
    messages = _messages(CASES["two_images_video"]) + [{"role": "assistant", "content": "The picture."}]
    assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == \
        reference.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def _tokens(ours, text: str, output) -> np.ndarray:
    timestamps = [_seconds(metadata.frames_indices, metadata.fps)
                  for metadata in output.get("video_metadata", [])]
    return ours.tokens(text, output.get("image_grid_thw"), output.get("video_grid_thw"), timestamps)


@pytest.mark.parametrize("case", CASES)
def test_tokens_and_rope_index_equal_transformers(ours, outputs, reference_model, case):
    text, output = outputs[case]
    tokens_t = _tokens(ours, text, output)
    assert tokens_t.dtype == np.int32
    np.testing.assert_array_equal(tokens_t, output["input_ids"][0])

    inputs = {key: torch.from_numpy(output[key]) for key in ("input_ids", "mm_token_type_ids", "image_grid_thw",
                                                              "video_grid_thw") if key in output}
    expected_positions, expected_deltas = reference_model.get_rope_index(**inputs)
    positions_3t = rope_index(tokens_t, output.get("image_grid_thw"), output.get("video_grid_thw"))
    assert positions_3t.dtype == np.int32
    np.testing.assert_array_equal(positions_3t, expected_positions[:, 0].numpy())
    assert positions_3t.max() + 1 - len(tokens_t) == expected_deltas.item()


@pytest.mark.parametrize("case", CASES)
def test_media_head_equals_transformers(ours, outputs, case):
    """Our whole processor call (numpy pixels, sampled frames, expanded ids) against transformers'."""
    text, output = outputs[case]
    parts = CASES[case]
    images = [IMAGES[value] for kind, value in parts if kind == "image"]
    [video] = [value for kind, value in parts if kind == "video"] or [None]
    metadata = None if video is None else {"fps": VIDEOS[video][1], "total_num_frames": VIDEOS[video][0]}
    head = ours.media_head(text, images, None if video is None else FRAMES[video], metadata)
    keys = [k for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                        "video_grid_thw") if k in output]
    assert sorted(head) == sorted(keys)
    for key in keys:
        assert head[key].dtype == output[key].dtype, key
        np.testing.assert_array_equal(head[key], output[key], err_msg=key)
    np.testing.assert_array_equal(ours.create_mm_token_type_ids(head["input_ids"]), output["mm_token_type_ids"])


def test_video_timestamps_by_hand(ours, outputs):
    # 40 frames at 30 fps, sampled at 2 fps but at least 4 frames: linspace(0, 39, 4) -> 0, 13, 26, 39;
    # two temporal patches, at (0 + 13) / 2 / 30 = 0.217 s and (26 + 39) / 2 / 30 = 1.083 s.
    text, output = outputs["video_40@30fps"]
    assert list(output["video_metadata"][0].frames_indices) == [0, 13, 26, 39]
    np.testing.assert_allclose(_seconds([0, 13, 26, 39], 30.0), [13 / 60, 65 / 60])
    # An odd frame count repeats the last frame: 9 frames at 1 fps -> the last patch is (8, 8), at 8.0 s.
    np.testing.assert_allclose(_seconds(range(9), 1.0), [0.5, 2.5, 4.5, 6.5, 8.0])
    decoded = ours.tokenizer.decode(_tokens(ours, text, output))
    pads = int(np.prod(output["video_grid_thw"][0][1:])) // 4
    frame = "<|vision_start|>" + "<|video_pad|>" * pads + "<|vision_end|>"
    assert "<|vision_start|><0.2 seconds>" + frame + "<1.1 seconds>" + frame + "<|vision_end|>" in decoded


def test_rope_index_of_a_left_padded_batch(outputs, reference_model):
    """transformers skips the padding its attention mask marks and writes 0 there: our positions of each
    example alone, shifted right by its padding."""
    examples = [outputs["image_video"][1], outputs["two_images"][1]]
    length = max(example["input_ids"].shape[1] for example in examples)
    ids, types, mask = (np.zeros((2, length), np.int64) for _ in range(3))
    for row, example in enumerate(examples):
        size = example["input_ids"].shape[1]
        ids[row, length - size:] = example["input_ids"][0]
        types[row, length - size:] = example["mm_token_type_ids"][0]
        mask[row, length - size:] = 1
    positions, deltas = reference_model.get_rope_index(
        torch.from_numpy(ids), torch.from_numpy(types),
        image_grid_thw=torch.from_numpy(np.concatenate([example["image_grid_thw"] for example in examples])),
        video_grid_thw=torch.from_numpy(examples[0]["video_grid_thw"]), attention_mask=torch.from_numpy(mask))
    for row, example in enumerate(examples):
        ours = rope_index(example["input_ids"][0], example["image_grid_thw"], example.get("video_grid_thw"))
        size = ours.shape[1]
        np.testing.assert_array_equal(positions[:, row, length - size:].numpy(), ours)
        assert (positions[:, row, : length - size] == 0).all()
        assert deltas[row].item() == ours.max() + 1 - size


def test_mismatched_grids_are_refused(ours, outputs):
    text, output = outputs["image_video"]
    timestamps = [_seconds(output["video_metadata"][0].frames_indices, 1.0)]
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> but 0 grids"):
        ours.tokens(text, None, output["video_grid_thw"], timestamps)
    with pytest.raises(ValueError, match="timestamps for"):
        ours.tokens(text, output["image_grid_thw"], output["video_grid_thw"], [timestamps[0][:-1]])
    tokens_t = output["input_ids"][0]
    with pytest.raises(ValueError, match="needs"):
        rope_index(tokens_t, output["image_grid_thw"] * [1, 2, 1], output["video_grid_thw"])
    with pytest.raises(ValueError, match="grids given"):
        rope_index(tokens_t, np.concatenate([output["image_grid_thw"]] * 2), output["video_grid_thw"])


# -- multi-response formatting on Qwen3-VL ----------------------------------------------------------

QWEN_SEP_ID = 151669  # the next id after Qwen3-VL's last added token, </think> = 151668


@pytest.fixture(scope="module")
def formatting_processors(processor_dir, tmp_path_factory):
    """(ours, transformers') Qwen3-VL processors, both with `<|resp_sep|>`."""
    ours = backbones.load_processor(processor_dir)
    return ours, AutoProcessor.from_pretrained(ours.save_pretrained(tmp_path_factory.mktemp("with_sep")))


@pytest.mark.parametrize("case", ["text", "image", "two_images", "video_9@1fps", "image_video"])
@pytest.mark.parametrize("responses", [["Yes.", "No!?"], ["  a\n", "\nb", "机器学习 🚀", "x = 1;"]])
def test_formatting_equals_the_processor_on_the_whole_text(formatting_processors, case, responses):
    ours, reference = formatting_processors
    assert ours.tokenizer.convert_tokens_to_ids(formatting.RESP_SEP) == QWEN_SEP_ID
    parts = CASES[case]
    images = [IMAGES[value] for kind, value in parts if kind == "image"]
    [video] = [value for kind, value in parts if kind == "video"] or [None]
    media = {"images": images} if images else {}
    if video is not None:
        num_frames, fps = VIDEOS[video]
        media.update(video=FRAMES[video], video_metadata={"fps": fps, "total_num_frames": num_frames})
    prompt = " ".join(value for kind, value in parts if kind == "text")
    example = formatting.format_example(ours, prompt, responses, **media)

    content = [{"type": "image"}] * len(images) + [{"type": "video"}] * (video is not None)
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]},
                {"role": "assistant", "content": formatting.SEPARATOR_TEXT.join(responses)}]
    text = reference.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    expected = reference(text=[text], images=images or None, videos=None if video is None else [media["video"]],
                         video_metadata=None if video is None else [media["video_metadata"]], return_tensors="np")
    np.testing.assert_array_equal(example.input_ids, expected["input_ids"][0])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        assert (key in example.processor_outputs) == (key in expected), key
        if key in expected:
            np.testing.assert_array_equal(example.processor_outputs[key], expected[key], err_msg=key)
    ids = example.input_ids
    assert [ids[p + 1] for p in example.read_positions[:-1]] == [QWEN_SEP_ID] * (len(responses) - 1)
    assert example.read_positions[-1] == len(ids) - 1

    batch = ours.model_batch(example.processor_outputs)
    np.testing.assert_array_equal(batch["tokens"][0], ids)
    np.testing.assert_array_equal(batch["positions"][0], rope_index(ids, expected.get("image_grid_thw"),
                                                                    expected.get("video_grid_thw")))
