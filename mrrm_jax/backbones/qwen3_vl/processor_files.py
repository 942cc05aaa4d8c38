"""Qwen3-VL-4B-Instruct's processor files, written offline: its chat template, tokenizer settings and
image/video processor settings, as transformers' `Qwen3VLProcessor.save_pretrained` writes them, so that
`AutoProcessor.from_pretrained(out_dir)` reads them too (tests/test_qwen3_vl_processor.py)."""

from __future__ import annotations

import pathlib

from transformers import TokenizersBackend

from mrrm_jax.backbones.qwen3_vl import processor as qwen3_vl_processor
from mrrm_jax.data.tokenizer import QWEN_ADDED_TOKENS, build_qwen_tokenizer

# Qwen3-VL-4B-Instruct's chat template, verbatim: the hub's chat_template.json (identical to the one in its
# tokenizer_config.json), as copied in github.com/sophgo/LLM-TPU models/Qwen3_VL/config/chat_template.json
# (commit 2097a5a5, whose README there is the Qwen3-VL-4B-Instruct model card). Each image/video part
# becomes `<|vision_start|><|image_pad|><|vision_end|>` (`<|video_pad|>`) where it stands in the message.
QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# What the released Qwen3-VL-4B-Instruct files set on top of the processors' class defaults
# (preprocessor_config.json, video_preprocessor_config.json, tokenizer_config.json; same source).
QWEN3_VL_4B_IMAGE = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                     "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                     "image_std": [0.5, 0.5, 0.5]}
QWEN3_VL_4B_VIDEO = {"size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16,
                     "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                     "image_std": [0.5, 0.5, 0.5]}
QWEN3_VL_4B_TOKENIZER = {
    "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 262144,
    "clean_up_tokenization_spaces": False,
    "extra_special_tokens": ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                             "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                             "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"],
}


def write_qwen3_vl_processor_dir(
    out_dir, *, image_processor_kwargs=None, video_processor_kwargs=None
) -> pathlib.Path:
    """Write Qwen3-VL-4B-Instruct's tokenizer + processor directory, which `AutoProcessor` loads offline.

    The kwargs override Qwen3-VL-4B's `Qwen2VLImageProcessor` / `Qwen3VLVideoProcessor` settings, e.g.
    smaller pixel budgets: `size={"shortest_edge": min_pixels, "longest_edge": max_pixels}`, `fps`.
    """
    tokenizer = TokenizersBackend(
        tokenizer_object=build_qwen_tokenizer(QWEN_ADDED_TOKENS),
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
        processor_class="Qwen3VLProcessor",
        **QWEN3_VL_4B_TOKENIZER,
    )
    image_config = {**qwen3_vl_processor.IMAGE_DEFAULTS, **QWEN3_VL_4B_IMAGE, **(image_processor_kwargs or {})}
    video_config = {**qwen3_vl_processor.VIDEO_DEFAULTS, **QWEN3_VL_4B_VIDEO, **(video_processor_kwargs or {})}
    processor = qwen3_vl_processor.Qwen3VLProcessor(tokenizer, QWEN3_VL_CHAT_TEMPLATE, image_config,
                                                    video_config)
    return processor.save_pretrained(out_dir)


def write_for_run(out: pathlib.Path, image_min_pixels: int, image_max_pixels: int, video_min_pixels: int,
                  video_max_pixels: int, fps: float) -> pathlib.Path:
    """The processor a run writes from its `processor.kwargs` when it has none (the Qwen3-VL demo)."""
    return write_qwen3_vl_processor_dir(
        out, image_processor_kwargs=dict(size={"shortest_edge": image_min_pixels, "longest_edge": image_max_pixels}),
        video_processor_kwargs=dict(size={"shortest_edge": video_min_pixels, "longest_edge": video_max_pixels},
                                    fps=fps))
