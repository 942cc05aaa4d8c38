"""A Molmo2 processor directory, read without PyTorch.

transformers' `AutoProcessor` builds Molmo2's torchvision image and video processors, so loading a
checkpoint's processor that way needs torch. This reads the same files itself: the tokenizer through
transformers' `TokenizersBackend` (Rust `tokenizers`, no torch), the chat template through jinja2, and
the image/video settings from the JSON as `preprocess.VisionOptions`, whose numpy preprocessing gives
the arrays `Molmo2Processor` gives (tests/test_preprocess.py and tests/test_processor.py check both
against transformers). Settings our preprocessing does not implement are refused, naming file and key.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import numpy as np
import tokenizers
from transformers import TokenizersBackend
from transformers.utils.chat_template_utils import render_jinja_template

from mrrm_jax.backbones.molmo2 import preprocess
from mrrm_jax.backbones.molmo2.preprocess import VisionOptions
from mrrm_jax.backbones.molmo2.hf_batch import batch_from_processor
from mrrm_jax.data import media
from mrrm_jax.data.processor_dir import (IMAGE_CONFIG, PROCESSOR_CONFIG, VIDEO_CONFIG, budget_frame_counts,
                                         plain_tokenizer, read_chat_template, read_json, video_metadata_dict,
                                         write_processor_dir)

# transformers' class defaults (Molmo2ImageProcessor, Molmo2VideoProcessor, Molmo2Processor), which a
# directory's JSON overrides key by key. The video processor has no defaults for the pixel steps
# (None = off): released configs set them, and a directory that does not is refused below.
IMAGE_DEFAULTS = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "Molmo2ImageProcessor",
    "max_crops": 8, "overlap_margins": [4, 4], "patch_size": 14, "pooling_size": [2, 2], "resample": 2,
    "rescale_factor": 1 / 255, "size": {"height": 378, "width": 378},
}
VIDEO_DEFAULTS = {
    "do_convert_rgb": None, "do_normalize": None, "do_rescale": None, "do_resize": None, "do_sample_frames": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "max_fps": 2, "num_frames": 64, "patch_size": 14,
    "pooling_size": [3, 3], "resample": 2, "rescale_factor": 1 / 255, "return_metadata": False,
    "size": {"height": 378, "width": 378}, "video_processor_type": "Molmo2VideoProcessor",
}
FLAG_DEFAULTS = {
    "image_use_col_tokens": True, "use_single_crop_col_tokens": None, "use_single_crop_start_token": True,
    "video_use_col_tokens": False, "use_frame_special_tokens": True,
}
# `Molmo2Processor.image_token_ids`: the tokens `mm_token_type_ids` marks 1; its video token is marked 2.
IMAGE_TYPE_TOKENS = ("<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>", "<im_end>",
                     "<frame_end>", "<im_low>")
BILINEAR = 2  # PIL's resample code; preprocess.py resizes bilinearly


@dataclasses.dataclass(frozen=True)
class Molmo2Processor:
    """What scoring and training need of a Molmo2 processor: tokenizer, chat template, vision settings."""
    tokenizer: TokenizersBackend
    chat_template: str
    image_config: dict  # the image/video processors' settings as read (defaults filled in)
    video_config: dict
    flags: dict  # how the media tokens are spelled (FLAG_DEFAULTS' keys)
    options: VisionOptions

    @property
    def image_token(self) -> str:
        return getattr(self.tokenizer, "image_token", None) or "<|image|>"

    @property
    def video_token(self) -> str:
        return getattr(self.tokenizer, "video_token", None) or "<|video|>"

    @functools.cached_property
    def image_patch_id(self) -> int:
        """The `<im_patch>` token's id: where the model adds each pooled image feature."""
        return self.tokenizer.convert_tokens_to_ids("<im_patch>")

    @functools.cached_property
    def plain_tokenizer(self) -> tokenizers.Tokenizer:
        return plain_tokenizer(self.tokenizer)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The rendered text, as `Molmo2Processor.apply_chat_template(..., tokenize=False)`."""
        [text], _ = render_jinja_template([messages], chat_template=self.chat_template,
                                          add_generation_prompt=add_generation_prompt,
                                          **self.tokenizer.special_tokens_map)
        return text

    def create_mm_token_type_ids(self, input_ids_bt: np.ndarray) -> np.ndarray:
        """1 on image-structure tokens, 2 on the video token, else 0 (int64, as transformers)."""
        image_ids = self.tokenizer.convert_tokens_to_ids(list(IMAGE_TYPE_TOKENS))
        video_id = self.tokenizer.convert_tokens_to_ids(self.video_token)
        types_bt = np.zeros(np.shape(input_ids_bt), np.int64)
        types_bt[np.isin(input_ids_bt, image_ids)] = 1
        types_bt[np.asarray(input_ids_bt) == video_id] = 2
        return types_bt

    # transformers' Molmo2 refuses pixel_values and pixel_values_videos together.
    images_with_video = False

    def media_attempts(self, budget, images, video) -> list[dict]:
        """The `media_head` settings tried in turn until an example's vision tokens fit `budget`
        (`examples.Budget`): for images the processor's own `max_crops` (as scoring uses it), then the
        budget's smaller fallbacks; for a video, the budget's frame counts."""
        if video is not None:
            return [{"num_frames": frames} for frames in budget_frame_counts(budget)]
        if not images:
            return [{}]
        max_crops = self.options.max_crops
        return [{"max_crops": crops} for crops in (max_crops, *(c for c in budget.crop_fallback if c < max_crops))]

    def row_media(self, row_tokens: int, row_crops: int) -> dict:
        """A scoring row's media room (`packing.RowBudget` fields): `row_crops` crops, and the pooled
        tokens and pooling slots they can need (a crop pools to at most ceil(side / pool_h) x
        ceil(side / pool_w) tokens, and each pooled token is one of the row's tokens)."""
        options = self.options
        side = options.crop_size // options.patch_size
        pools = (options.image_pooling, options.video_pooling)
        pooled_per_crop = max(-(-side // h) * -(-side // w) for h, w in pools)
        return {"row_crops": row_crops, "row_pooled": min(row_crops * pooled_per_crop, row_tokens),
                "pool_slots": max(h * w for h, w in pools)}

    def frame_indices(self, metadata: dict, num_frames: int | None = None) -> np.ndarray:
        """The source frames `media_head` samples from a video of `metadata` with these settings."""
        return preprocess.sample_frame_indices(metadata, self.options, num_frames)

    def media_head(self, text: str, images, video, video_metadata, max_crops=None, num_frames=None) -> dict:
        """What `Molmo2Processor(text=text, images=..., videos=...)` returns (numpy, batch of 1), computed
        by our preprocessing, but with uint8 pixels before their normalisation (the model normalises
        them: `preprocess.pixel_table`): media arrays, and the ids of `text` with its `<|image|>` / `<|video|>`
        expanded. `max_crops` / `num_frames` override the processor's for this call (budget fallbacks)."""
        options, tokenizer = self.options, self.tokenizer
        outputs, replacements = {}, {}
        if images:
            outputs.update(preprocess.image_inputs(images, options, max_crops, normalized=False))
            replacements[self.image_token] = [preprocess.image_tokens(g, options) for g in outputs["image_grids"]]
        if video is not None:
            frames = np.asarray(video) if isinstance(video, np.ndarray) else np.stack([media.rgb_array(f) for f in video])
            frames, timestamps = preprocess.sample_video(frames, video_metadata_dict(video_metadata, len(frames)),
                                                         options, num_frames)
            outputs.update(preprocess.video_inputs(frames, options, normalized=False))
            replacements[self.video_token] = [preprocess.video_tokens(outputs["video_grids"][0], timestamps, options)]
        for token, strings in replacements.items():
            pieces = text.split(token)
            if len(pieces) != len(strings) + 1:
                raise ValueError(f"the chat template wrote {len(pieces) - 1} {token} for {len(strings)} media")
            text = "".join(piece + string for piece, string in zip(pieces, strings + [""]))
        # As Molmo2Processor: every text starts with the bos token (`<|im_end|>` in Molmo2's tokenizer).
        bos = tokenizer.bos_token or tokenizer.eos_token
        text = text if text.startswith(bos) else bos + text
        outputs.update({k: np.asarray(v) for k, v in tokenizer(text, return_tensors="np").items()})
        return outputs

    def model_batch(self, outputs: dict) -> dict:
        """This processor's outputs (`media_head` + the formatted ids) -> the model's one-row batch."""
        return batch_from_processor(outputs, self.image_patch_id)

    def save_pretrained(self, out_dir) -> pathlib.Path:
        """A directory that `load` and transformers' `AutoProcessor` both read."""
        settings = {**self.flags, "processor_class": "Molmo2Processor",
                    "image_processor": self.image_config, "video_processor": self.video_config}
        return write_processor_dir(out_dir, self.tokenizer, settings, self.chat_template)


def load(model_dir, tokenizer: TokenizersBackend | None = None) -> Molmo2Processor:
    """The processor of a checkpoint or processor directory (`tokenizer`: one already loaded from it)."""
    model_dir = pathlib.Path(model_dir)
    settings = read_json(model_dir / PROCESSOR_CONFIG)
    processor_class = settings.get("processor_class", "Molmo2Processor")
    if processor_class != "Molmo2Processor":
        raise ValueError(f"{model_dir / PROCESSOR_CONFIG}: processor_class={processor_class!r}; expected Molmo2Processor")
    image_config = {**IMAGE_DEFAULTS, **settings.get("image_processor", read_json(model_dir / IMAGE_CONFIG))}
    video_config = {**VIDEO_DEFAULTS, **settings.get("video_processor", read_json(model_dir / VIDEO_CONFIG))}
    flags = {key: settings.get(key, default) for key, default in FLAG_DEFAULTS.items()}
    source = model_dir / PROCESSOR_CONFIG if "image_processor" in settings else model_dir / IMAGE_CONFIG
    video_source = model_dir / PROCESSOR_CONFIG if "video_processor" in settings else model_dir / VIDEO_CONFIG
    options = vision_options(image_config, video_config, flags, source, video_source)
    tokenizer = tokenizer or TokenizersBackend.from_pretrained(model_dir)
    chat_template = read_chat_template(model_dir, settings, tokenizer)
    return Molmo2Processor(tokenizer, chat_template, image_config, video_config, flags, options)


def vision_options(image: dict, video: dict, flags: dict, source="image settings",
                   video_source="video settings") -> VisionOptions:
    """`VisionOptions` from the processors' settings; what preprocess.py does not implement is refused."""
    for where, config, kind in ((source, image, "image_processor"), (video_source, video, "video_processor")):
        size = config["size"]
        if sorted(size) != ["height", "width"] or size["height"] != size["width"]:
            raise ValueError(f"{where}: {kind} size={size}; Molmo2 needs a square size {{'height': n, 'width': n}}")
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if config[key] is not True:
                raise ValueError(f"{where}: {kind} {key}={config[key]}; only true is supported")
        expected = {"rescale_factor": 1 / 255, "resample": BILINEAR}
        for key, value in expected.items():
            if not np.isclose(config[key], value, rtol=1e-9):
                raise ValueError(f"{where}: {kind} {key}={config[key]}; only {value} is supported")
    if image["do_convert_rgb"] is not True:
        raise ValueError(f"{source}: image_processor do_convert_rgb={image['do_convert_rgb']}; only true is supported")
    if video["do_sample_frames"] is not True or video.get("fps") is not None:
        raise ValueError(f"{video_source}: video_processor do_sample_frames={video['do_sample_frames']}, "
                         f"fps={video.get('fps')}; only frame sampling by num_frames / max_fps is supported")
    for key in ("size", "patch_size", "image_mean", "image_std"):
        if image[key] != video[key]:
            raise ValueError(f"{video_source}: video_processor {key}={video[key]} differs from the image "
                             f"processor's {image[key]}; Molmo2 shares them")
    return VisionOptions(crop_size=image["size"]["height"], patch_size=image["patch_size"],
                         image_pooling=tuple(image["pooling_size"]), video_pooling=tuple(video["pooling_size"]),
                         overlap_margins=tuple(image["overlap_margins"]), max_crops=image["max_crops"],
                         num_frames=video["num_frames"], max_fps=video["max_fps"],
                         mean=tuple(image["image_mean"]), std=tuple(image["image_std"]), **flags)
