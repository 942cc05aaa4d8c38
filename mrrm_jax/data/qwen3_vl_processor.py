"""A Qwen3-VL processor directory, read without PyTorch, and the prompt's token ids.

transformers' `AutoProcessor` builds Qwen3-VL's torchvision image and video processors, so loading a
checkpoint's processor that way needs torch. This reads the same files itself: the tokenizer through
transformers' `TokenizersBackend` (Rust `tokenizers`), the chat template through jinja2, and the image /
video settings as dicts (transformers' class defaults, then the directory's values) for the numpy pixel
module, qwen3_vl_preprocess.py. Both layouts are read: transformers 5's `save_pretrained` (one
processor_config.json, chat_template.jinja) and the released checkpoints' (preprocessor_config.json,
video_preprocessor_config.json, chat_template.json).

`Qwen3VLProcessor.tokens` gives the ids `transformers.Qwen3VLProcessor.__call__` gives for a rendered
prompt, from the grids and frame times alone (tests/test_qwen3_vl_processor.py). The chat template writes
one `<|vision_start|><|image_pad|><|vision_end|>` per image and `<|vision_start|><|video_pad|><|vision_end|>`
per video; the processor then expands

    <|image_pad|>  ->  <|image_pad|> x (t*h*w / merge^2)
    <|video_pad|>  ->  for each temporal patch i of the video:
                       "<{seconds_i:.1f} seconds>" <|vision_start|> <|video_pad|> x (h*w / merge^2) <|vision_end|>

so a video's outer `<|vision_start|>` / `<|vision_end|>` from the template stay around its frames.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re

import numpy as np
from transformers import TokenizersBackend
from transformers.utils.chat_template_utils import render_jinja_template

from mrrm_jax.data.processor import (CHAT_TEMPLATE_FILE, IMAGE_CONFIG, PROCESSOR_CONFIG, VIDEO_CONFIG,
                                     read_chat_template, read_json)

PROCESSOR_CLASS = "Qwen3VLProcessor"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"

# transformers 5.24's class defaults (`Qwen2VLImageProcessor`, which Qwen3-VL uses for images, and
# `Qwen3VLVideoProcessor`), which a directory's JSON overrides key by key. Note the image defaults are
# Qwen2-VL's (patch 14, CLIP mean/std): Qwen3-VL's files override them. `cap_pixels_per_frame` is
# unset (None) by default, which transformers 5.24 reads as False.
IMAGE_DEFAULTS = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "Qwen2VLImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "merge_size": 2, "patch_size": 14, "resample": 3,
    "rescale_factor": 1 / 255, "size": {"longest_edge": 28 * 28 * 1280, "shortest_edge": 56 * 56},
    "temporal_patch_size": 2,
}
VIDEO_DEFAULTS = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True, "do_sample_frames": True,
    "fps": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "max_frames": 768, "max_video_tokens": 768,
    "merge_size": 2, "min_frames": 4, "patch_size": 16, "resample": 3, "rescale_factor": 1 / 255,
    "return_metadata": False, "size": {"longest_edge": 32 * 32 * 768, "shortest_edge": 128 * 32 * 32},
    "temporal_patch_size": 2, "video_processor_type": "Qwen3VLVideoProcessor",
}
# Qwen2-VL-era image keys that `Qwen2VLImageProcessor.__init__` moves into `size` (the video processor
# does not).
LEGACY_IMAGE_SIZE_KEYS = {"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}


@dataclasses.dataclass(frozen=True)
class Qwen3VLProcessor:
    """What scoring and training need of a Qwen3-VL processor: tokenizer, chat template, vision settings."""
    tokenizer: TokenizersBackend
    chat_template: str
    image_config: dict  # the image/video processors' settings as read (defaults filled in)
    video_config: dict

    @functools.cached_property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    @functools.cached_property
    def video_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(VIDEO_PAD)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The rendered text, as `Qwen3VLProcessor.apply_chat_template(..., tokenize=False)`."""
        [text], _ = render_jinja_template([messages], chat_template=self.chat_template,
                                          add_generation_prompt=add_generation_prompt,
                                          **self.tokenizer.special_tokens_map)
        return text

    def tokens(self, text: str, image_grids_thw=None, video_grids_thw=None, video_timestamps=()) -> np.ndarray:
        """The prompt's token ids [T] (int32), as `Qwen3VLProcessor(text=[text], images=..., videos=...)`.

        `image_grids_thw` / `video_grids_thw`: [n, 3] patch grids (t, h, w) of the images / videos in
        prompt order, as the pixel module (or transformers) returns them. `video_timestamps`: per video, one
        time in seconds per temporal patch (`frame_timestamps`).
        """
        image_grids, video_grids = _grids(image_grids_thw), _grids(video_grids_thw)
        for pad, grids in ((IMAGE_PAD, image_grids), (VIDEO_PAD, video_grids)):
            if text.count(pad) != len(grids):
                raise ValueError(f"the text has {text.count(pad)} {pad} but {len(grids)} grids were given; "
                                 f"give one grid per {pad} in the text")
        if len(video_timestamps) != len(video_grids):
            raise ValueError(f"{len(video_timestamps)} video timestamp lists for {len(video_grids)} videos")
        for index, (grid, seconds) in enumerate(zip(video_grids, video_timestamps)):
            if len(seconds) != grid[0]:
                raise ValueError(f"video {index}: {len(seconds)} timestamps for {grid[0]} temporal patches")
        # `replace_video_token`'s text, but each frame's pads stay one token and are repeated after
        # tokenizing: an added token splits the text around it, so the ids equal those of the fully
        # expanded text that transformers encodes.
        videos = iter("".join(f"<{float(t):.1f} seconds>{VISION_START}{VIDEO_PAD}{VISION_END}" for t in seconds)
                      for seconds in video_timestamps)
        text = re.sub(re.escape(VIDEO_PAD), lambda _: next(videos), text)
        ids_t = np.asarray(self.tokenizer(text)["input_ids"], np.int32)

        repeats_t = np.ones(len(ids_t), np.int64)
        image_merge, video_merge = self.image_config["merge_size"] ** 2, self.video_config["merge_size"] ** 2
        repeats_t[ids_t == self.image_token_id] = image_grids.prod(axis=1) // image_merge
        repeats_t[ids_t == self.video_token_id] = np.repeat(video_grids[:, 1] * video_grids[:, 2] // video_merge,
                                                            video_grids[:, 0])
        return np.repeat(ids_t, repeats_t)

    def save_pretrained(self, out_dir) -> pathlib.Path:
        """A directory that `load` and transformers' `AutoProcessor` both read (transformers 5's layout)."""
        out_dir = pathlib.Path(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        settings = {"processor_class": PROCESSOR_CLASS, "image_processor": self.image_config,
                    "video_processor": self.video_config}
        (out_dir / PROCESSOR_CONFIG).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        (out_dir / CHAT_TEMPLATE_FILE).write_text(self.chat_template)
        return out_dir


def frame_timestamps(frame_indices, fps: float, temporal_patch_size: int = 2) -> np.ndarray:
    """Seconds per temporal patch [ceil(frames / temporal_patch_size)], as transformers'
    `Qwen3VLProcessor._calculate_timestamps`.

    `frame_indices`: the sampled frames' indices in the source video (`VideoMetadata.frames_indices`),
    `fps`: the source video's frame rate (transformers uses 24 when the metadata has none). Like the
    frames themselves, the indices are padded to whole patches by repeating the last; a patch's time is
    the mean of its first and last frame's.
    """
    indices = np.asarray(frame_indices, np.int64)
    indices = np.concatenate([indices, np.repeat(indices[-1:], -len(indices) % temporal_patch_size)])
    seconds = (indices / fps).reshape(-1, temporal_patch_size)
    return (seconds[:, 0] + seconds[:, -1]) / 2


def load(model_dir, tokenizer: TokenizersBackend | None = None) -> Qwen3VLProcessor:
    """The processor of a checkpoint or processor directory (`tokenizer`: one already loaded from it)."""
    model_dir = pathlib.Path(model_dir)
    settings = read_json(model_dir / PROCESSOR_CONFIG)
    image_file, video_file = read_json(model_dir / IMAGE_CONFIG), read_json(model_dir / VIDEO_CONFIG)
    processor_class = settings.get("processor_class") or image_file.get("processor_class") or PROCESSOR_CLASS
    if processor_class != PROCESSOR_CLASS:
        raise ValueError(f"{model_dir}: processor_class={processor_class!r}; expected {PROCESSOR_CLASS}")
    image_config = _settings(IMAGE_DEFAULTS, settings.get("image_processor", image_file), LEGACY_IMAGE_SIZE_KEYS)
    video_config = _settings(VIDEO_DEFAULTS, settings.get("video_processor", video_file), {})
    tokenizer = tokenizer or TokenizersBackend.from_pretrained(model_dir)
    chat_template = read_chat_template(model_dir, settings, tokenizer)
    return Qwen3VLProcessor(tokenizer, chat_template, image_config, video_config)


def _settings(defaults: dict, read: dict, legacy_size_keys: dict) -> dict:
    config = {**defaults, **read}
    config.pop("processor_class", None)  # the split layout's files name their processor; not a setting
    size = dict(config["size"])
    for key, size_key in legacy_size_keys.items():
        if key in config:
            size[size_key] = config.pop(key)
    return {**config, "size": size}


def _grids(grids_thw) -> np.ndarray:
    return np.asarray(grids_thw if grids_thw is not None else [], np.int64).reshape(-1, 3)
