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
import pathlib
import re

import numpy as np
from transformers import TokenizersBackend
from transformers.utils.chat_template_utils import render_jinja_template

from mrrm_jax.data import media
from mrrm_jax.backbones.qwen3_vl import preprocess as qwen3_vl_preprocess
from mrrm_jax.data.processor_dir import (IMAGE_CONFIG, PROCESSOR_CONFIG, VIDEO_CONFIG,
                                         budget_frame_counts, plain_tokenizer, processor_class, read_chat_template,
                                         read_json, video_metadata_dict, write_processor_dir)
from mrrm_jax.backbones.qwen3_vl.positions import rope_index, vision_layout

PROCESSOR_CLASS = "Qwen3VLProcessor"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"

# transformers 5.24's class defaults (the pixel module's tables, plus the type names `save_pretrained`
# writes), which a directory's JSON overrides key by key. The image defaults are Qwen2-VL's (patch 14,
# CLIP mean/std): Qwen3-VL's files override them.
IMAGE_DEFAULTS = {**qwen3_vl_preprocess.IMAGE_CLASS_DEFAULTS, "image_processor_type": "Qwen2VLImageProcessor"}
# Unset (None) settings are left out, as `save_pretrained` leaves them out.
VIDEO_DEFAULTS = {**{k: v for k, v in qwen3_vl_preprocess.VIDEO_CLASS_DEFAULTS.items() if v is not None},
                  "return_metadata": False, "video_processor_type": "Qwen3VLVideoProcessor"}


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

    @functools.cached_property
    def options(self) -> qwen3_vl_preprocess.Qwen3VLVisionOptions:
        return qwen3_vl_preprocess.Qwen3VLVisionOptions.from_processor_dicts(self.image_config, self.video_config)

    @functools.cached_property
    def plain_tokenizer(self):
        return plain_tokenizer(self.tokenizer)

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
        time in seconds per temporal patch (`qwen3_vl_preprocess.video_timestamps`).
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

    images_with_video = True  # one example may hold images and a video

    def media_attempts(self, budget, images, video) -> list[dict]:
        """The `media_head` settings tried in turn until an example's vision tokens fit `budget`
        (`examples.Budget`): for images the processor's own pixel budget, then a quarter of the largest
        image's pixels (half its sides), and again, down to the least the processor allows; for a video,
        at most the budget's frame counts, sampled at the processor's fps."""
        if video is not None:  # with images too: those keep their size
            return [{"max_frames": frames} for frames in budget_frame_counts(budget)]
        attempts = [{}]
        if images:
            pixels = min(max(im.width * im.height for im in images), self.options.image_max_pixels) // 4
            while pixels >= self.options.image_min_pixels:
                attempts.append({"image_max_pixels": pixels})
                pixels //= 4
        return attempts

    def row_media(self, row_tokens: int, row_crops: int) -> dict:
        """A scoring row's media room (`packing.RowBudget` fields): as many ViT patches as the row has
        tokens, i.e. up to a quarter of its tokens may be vision tokens (4 patches each). `row_crops` is
        Molmo2's and not used."""
        return {"row_crops": 0, "row_pooled": 0, "row_patches": row_tokens}

    def _options(self, image_max_pixels=None, max_frames=None, num_frames=None):
        options = self.options
        if image_max_pixels is not None:
            options = dataclasses.replace(options, image_max_pixels=image_max_pixels)
        if max_frames is not None:
            options = dataclasses.replace(options, max_frames=max_frames)
        if num_frames is not None:
            options = dataclasses.replace(options, fps=None, num_frames=num_frames)
        return options

    def frame_indices(self, metadata: dict, **attempt) -> np.ndarray:
        """The source frames `media_head` samples from a video of `metadata` with these settings."""
        options = self._options(**attempt)
        return qwen3_vl_preprocess.video_frame_indices(metadata["total_num_frames"], metadata.get("fps"), options)

    def media_head(self, text: str, images, video, video_metadata, **attempt) -> dict:
        """What `transformers.Qwen3VLProcessor(text=[text], images=..., videos=...)` returns (numpy, batch
        of 1), from our numpy pixels: `input_ids`, `attention_mask`, `pixel_values` + `image_grid_thw`,
        `pixel_values_videos` + `video_grid_thw`. `video_metadata` needs the fps (and `frames_indices`
        when `video` holds only those frames). `attempt`: settings of `media_attempts` (or `num_frames`:
        that many frames instead of sampling by fps)."""
        options, outputs = self._options(**attempt), {}
        image_grids, video_grids, timestamps = [], [], []
        if images:
            patches, image_grids = zip(*(qwen3_vl_preprocess.image_patches(media.rgb_array(im), options) for im in images))
            outputs.update(pixel_values=np.concatenate(patches), image_grid_thw=np.asarray(image_grids, np.int64))
        if video is not None:
            frames = np.asarray(video) if isinstance(video, np.ndarray) else np.stack([media.rgb_array(f) for f in video])
            metadata = video_metadata_dict(video_metadata, len(frames))
            picked = qwen3_vl_preprocess.video_frame_indices(metadata["total_num_frames"], metadata["fps"], options)
            patches, grid = qwen3_vl_preprocess.video_patches(media.picked_frames(frames, metadata, picked), options)
            video_grids, timestamps = [grid], [qwen3_vl_preprocess.video_timestamps(picked, metadata["fps"], options)]
            outputs.update(pixel_values_videos=patches, video_grid_thw=np.asarray(video_grids, np.int64))
        ids_t = self.tokens(text, image_grids or None, video_grids or None, timestamps)
        outputs.update(input_ids=ids_t[None].astype(np.int64), attention_mask=np.ones((1, len(ids_t)), np.int64))
        return outputs

    def create_mm_token_type_ids(self, input_ids_bt: np.ndarray) -> np.ndarray:
        """1 on image pads, 2 on video pads, else 0 (int64), as transformers' `mm_token_type_ids`."""
        input_ids_bt = np.asarray(input_ids_bt)
        return ((input_ids_bt == self.image_token_id) + 2 * (input_ids_bt == self.video_token_id)).astype(np.int64)

    def model_batch(self, outputs: dict) -> dict:
        """`media_head` outputs (with the formatted ids) of ONE example -> its one-row model batch: tokens,
        M-RoPE positions [1, 3, T], segment ids, and the patches of its images, then its video (the order
        of their pads in the text: our formatting puts images before the video), with their per-patch
        arrays (`data/qwen3_vl_positions.vision_layout`)."""
        ids_t = np.asarray(outputs["input_ids"])[0].astype(np.int32)
        image_grids, video_grids = outputs.get("image_grid_thw"), outputs.get("video_grid_thw")
        positions_3t = rope_index(ids_t, image_grids, video_grids, spatial_merge_size=self.options.merge_size,
                                  image_token_id=self.image_token_id, video_token_id=self.video_token_id)
        batch = {"tokens": ids_t[None], "positions": positions_3t[None], "segment_ids": np.ones((1, len(ids_t)), np.int32)}
        patches = [outputs[k] for k in ("pixel_values", "pixel_values_videos") if k in outputs]
        if patches:
            grids_thw = np.concatenate([g for g in (image_grids, video_grids) if g is not None])
            if image_grids is not None and video_grids is not None and \
                    np.flatnonzero(ids_t == self.image_token_id).max() > np.flatnonzero(ids_t == self.video_token_id).min():
                raise ValueError("an image after the video: the patches would not follow their pads' order")
            batch["patches"] = np.concatenate(patches)[None].astype(np.float32)
            layout = vision_layout(grids_thw, self.options.merge_size)
            batch.update({name: value[None] for name, value in layout.items()})
        return batch

    def save_pretrained(self, out_dir) -> pathlib.Path:
        """A directory that `load` and transformers' `AutoProcessor` both read (transformers 5's layout)."""
        settings = {"processor_class": PROCESSOR_CLASS, "image_processor": self.image_config,
                    "video_processor": self.video_config}
        return write_processor_dir(out_dir, self.tokenizer, settings, self.chat_template)


def load(model_dir, tokenizer: TokenizersBackend | None = None) -> Qwen3VLProcessor:
    """The processor of a checkpoint or processor directory (`tokenizer`: one already loaded from it)."""
    model_dir = pathlib.Path(model_dir)
    settings = read_json(model_dir / PROCESSOR_CONFIG)
    image_file, video_file = read_json(model_dir / IMAGE_CONFIG), read_json(model_dir / VIDEO_CONFIG)
    named = processor_class(model_dir)
    if named != PROCESSOR_CLASS:
        raise ValueError(f"{model_dir}: processor_class={named!r}; expected {PROCESSOR_CLASS}")
    image_config = _settings(IMAGE_DEFAULTS, settings.get("image_processor", image_file))
    image_config = qwen3_vl_preprocess.legacy_sizes_moved(image_config)
    video_config = _settings(VIDEO_DEFAULTS, settings.get("video_processor", video_file))
    tokenizer = tokenizer or TokenizersBackend.from_pretrained(model_dir)
    chat_template = read_chat_template(model_dir, settings, tokenizer)
    return Qwen3VLProcessor(tokenizer, chat_template, image_config, video_config)


def _settings(defaults: dict, read: dict) -> dict:
    config = {**defaults, **read}
    config.pop("processor_class", None)  # the split layout's files name their processor; not a setting
    return config


def _grids(grids_thw) -> np.ndarray:
    return np.asarray(grids_thw if grids_thw is not None else [], np.int64).reshape(-1, 3)
