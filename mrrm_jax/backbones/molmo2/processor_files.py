"""Molmo2's processor files, written offline: its tokens after Qwen's, its chat template and the
Molmo2Processor settings, as transformers' `Molmo2Processor.save_pretrained` writes them, so that
`AutoTokenizer` / `AutoProcessor.from_pretrained(out_dir)` read them too (tests/test_tokenizer.py)."""

from __future__ import annotations

import pathlib

from transformers import TokenizersBackend

from mrrm_jax.backbones.molmo2 import processor as processor_lib
from mrrm_jax.data.tokenizer import QWEN_ADDED_TOKENS, build_qwen_tokenizer

# Molmo2's image/video tokens start after Qwen's 151936-row embedding padding, hence the gap.
MOLMO2_ADDED_TOKENS = QWEN_ADDED_TOKENS + [
    ("<im_start>", 151936, True),
    ("<im_end>", 151937, True),
    ("<im_patch>", 151938, True),
    ("<im_col>", 151939, True),
    ("<low_res_im_start>", 151940, True),
    ("<|image|>", 151941, True),
    ("<im_low>", 151942, True),
    ("<frame_start>", 151943, True),
    ("<frame_end>", 151944, True),
    ("<|video|>", 151945, True),
]

# Same layout as the released Molmo2 template: every image/video placeholder goes before the first turn
# (several images are labelled "Image 1", "Image 2", ...), the text parts of a message are joined by
# spaces, and a final assistant message is left open (no `<|im_end|>`), so training appends the eos.
# No bos here: Molmo2Processor prepends it to every prompt itself.
CHAT_TEMPLATE = (
    "{%- set media = namespace(images=0, videos=0) -%}"
    "{%- for message in messages if message['content'] is not string -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set media.images = media.images + 1 -%}"
    "{%- elif part['type'] == 'video' -%}{%- set media.videos = media.videos + 1 -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if media.images == 1 -%}{{- '<|image|>' -}}"
    "{%- else -%}{%- for i in range(media.images) -%}{{- 'Image ' ~ (i + 1) ~ '<|image|>' -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|video|>' * media.videos -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + text -}}"
    "{%- if not (loop.last and message['role'] == 'assistant') -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# transformers' Molmo2VideoProcessor, unlike Molmo2ImageProcessor and the original remote-code class, has
# no defaults for these (the released config files set them); unset, video frames come out as raw uint8.
VIDEO_PIXEL_DEFAULTS = {"do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True}


def write_molmo2_processor_dir(
    out_dir, *, image_processor_kwargs=None, video_processor_kwargs=None
) -> pathlib.Path:
    """Write a Molmo2 tokenizer + processor directory that `AutoTokenizer` / `AutoProcessor` load offline.

    The kwargs override `Molmo2ImageProcessor` / `Molmo2VideoProcessor` defaults (e.g. `max_crops`,
    `size` as {"height": n, "width": n}, `num_frames`, `max_fps`).
    """
    tokenizer = TokenizersBackend(
        tokenizer_object=build_qwen_tokenizer(MOLMO2_ADDED_TOKENS),
        # As in the released Molmo2 tokenizer: bos is `<|im_end|>` (Molmo2Processor prepends it to every
        # prompt) and padding is on the left, for batched generation.
        bos_token="<|im_end|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        # Named extra special tokens become tokenizer attributes, which Molmo2Processor reads
        # (`getattr(tokenizer, "image_token", ...)`).
        extra_special_tokens={"image_token": "<|image|>", "video_token": "<|video|>"},
        chat_template=CHAT_TEMPLATE,
        processor_class="Molmo2Processor",  # as transformers' processor writes it into tokenizer_config.json
    )
    image_config = {**processor_lib.IMAGE_DEFAULTS, **(image_processor_kwargs or {})}
    video_config = {**processor_lib.VIDEO_DEFAULTS, **VIDEO_PIXEL_DEFAULTS, **(video_processor_kwargs or {})}
    flags = dict(processor_lib.FLAG_DEFAULTS)
    options = processor_lib.vision_options(image_config, video_config, flags)
    processor = processor_lib.Molmo2Processor(tokenizer, CHAT_TEMPLATE, image_config, video_config, flags, options)
    return processor.save_pretrained(out_dir)


def write_for_run(out: pathlib.Path, crop: int, max_crops: int, num_frames: int, max_fps: float) -> pathlib.Path:
    """The processor a run writes from its `processor.kwargs` when it has none (the demo)."""
    size = {"height": crop, "width": crop}
    return write_molmo2_processor_dir(
        out, image_processor_kwargs=dict(size=size, max_crops=max_crops, overlap_margins=[1, 1]),
        video_processor_kwargs=dict(size=size, num_frames=num_frames, max_fps=max_fps))
