"""Multi-response formatting: one prompt, its media and N responses -> token ids + read positions.

Layout (paper, "Input layout"): the user turn holds the images, then the video, then the prompt; the
assistant turn holds the responses joined by `SEPARATOR_TEXT`. The chat template comes from the
checkpoint's processor (design decision 6).

`<|resp_sep|>` is injected as a token id, never by tokenizing text (design decision 7): the prompt and
the responses are tokenized as plain text, so special-token text inside them (`<|resp_sep|>`,
`<|im_end|>`, `<|image|>`, ...) stays ordinary BPE text. For text without such literals the ids are
exactly those the processor produces on the whole rendered text. That works because special tokens are
hard boundaries in HF tokenization: the text between two of them is tokenized on its own. So the stretch
up to the last special token before the prompt (the media head) is tokenized whole, with `<|image|>` /
`<|video|>` expanded by the processor's `media_head` (our numpy preprocessing, which also yields the pixel arrays), and
each later stretch between special tokens is tokenized as one plain string. A response cannot be tokenized alone: byte-level BPE pre-tokens cross
its edges ("assistant\\n" + "\\nText", "answer.\\n\\n").
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import tokenizers
from PIL import Image
from transformers import TokenizersBackend


RESP_SEP = "<|resp_sep|>"
SEPARATOR_TEXT = "\n\n<|resp_sep|>\n\n"
# The plain text on either side of the separator token.
_TEXT_BEFORE_SEP, _TEXT_AFTER_SEP = SEPARATOR_TEXT.split(RESP_SEP)

# Rendered in place of the prompt and of the responses, so the template's text around them can be cut
# out without knowing the template. Private-use code points: no template emits them.
_PROMPT_SLOT = "\ue000prompt\ue000"
_RESPONSES_SLOT = "\ue000responses\ue000"


@dataclasses.dataclass
class FormattedExample:
    input_ids: np.ndarray  # int32 [T]
    # int32 [N]: the token before each `<|resp_sep|>`, then the last token of the sequence.
    read_positions: np.ndarray
    # int32 [N]: the first token holding any character of each response (for the release's `first`
    # and `response_mean` poolings; a leading "\n\n" may share that token).
    response_starts: np.ndarray
    num_responses: int
    # What `processor(...)` returns for this example, batch of 1, numpy (`input_ids`, `attention_mask`,
    # `mm_token_type_ids`, and pixel_values / image_token_pooling / image_grids / image_num_crops and
    # the video counterparts when there are media); the processor's `model_batch` consumes it.
    processor_outputs: dict[str, np.ndarray]


def load_tokenizer(model_dir) -> TokenizersBackend:
    """The tokenizer of a checkpoint or processor directory, with `<|resp_sep|>` added as one special
    token if missing (`backbones.load_processor` builds the processor around it).

    The new token gets the next id after the largest existing one (151946 after Molmo2's `<|video|>` =
    151945, 151669 after Qwen3-VL's `</think>` = 151668), not `len(tokenizer)`: Molmo2's ids have a gap
    (151669..151935), so the two differ. Both models' embedding tables already have a row for that id
    (Molmo2's 128 extra rows; Qwen's table is padded to 151936 rows), so the separator's input
    embedding is the base checkpoint's row as it is, never a new one.
    """
    tokenizer = TokenizersBackend.from_pretrained(model_dir)
    backend = tokenizer.backend_tokenizer
    if backend.token_to_id(RESP_SEP) is None:
        next_id = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        # `tokenizers` numbers a new added token itself, and re-numbers it when the saved tokenizer is
        # loaded again, unless the token is in the model vocab: there it keeps its vocab id. No merge
        # builds it, so BPE never emits it (tokenizer.py places Molmo2's tokens the same way).
        backend_json = json.loads(backend.to_str())
        vocab = backend_json["model"].get("vocab")
        if not isinstance(vocab, dict):
            raise ValueError(f"cannot add {RESP_SEP}: the tokenizer model ({backend_json['model']['type']}) "
                             "has no token -> id vocab")
        vocab[RESP_SEP] = next_id
        backend.model = tokenizers.Tokenizer.from_str(json.dumps(backend_json)).model
        tokenizer.add_special_tokens({"extra_special_tokens": [RESP_SEP]}, replace_extra_special_tokens=False)
        assert backend.token_to_id(RESP_SEP) == next_id, backend.token_to_id(RESP_SEP)
    return tokenizer


def format_example(processor, prompt, responses, images=None, video=None, video_metadata=None,
                   media_cache: dict | None = None, **media_options) -> FormattedExample:
    """Token ids, media arrays and read positions of one prompt (+ images / one video) with N responses.

    `images`: a list of PIL images. `video`: one video, uint8 frames [T, H, W, 3] or a list of PIL
    frames; `video_metadata`: its `VideoMetadata` or a dict (fps, total_num_frames, duration, and
    `frames_indices` when `video` holds only those frames: see `media.load_video`), from which the
    frames are sampled as Molmo2 does and their timestamps written. `max_crops` / `num_frames` override
    the processor's. N = 1 is allowed (scoring); training needs N >= 2. `media_cache`: a dict the
    caller keeps across calls with the same media (e.g. while dropping responses), so that the media
    are preprocessed once per `media_options`.
    """
    _check_inputs(prompt, responses, images, video)
    images = list(images or [])
    tokenizer = processor.tokenizer
    sep_id = tokenizer.backend_tokenizer.token_to_id(RESP_SEP)
    if sep_id is None:
        raise ValueError(f"the processor's tokenizer has no {RESP_SEP} token; load it with backbones.load_processor()")

    media_parts = [{"type": "image"}] * len(images) + [{"type": "video"}] * (video is not None)
    rendered = _render(processor, media_parts, _PROMPT_SLOT, _RESPONSES_SLOT)
    head, rest = _split_once(rendered, _PROMPT_SLOT)
    middle, tail = _split_once(rest, _RESPONSES_SLOT)
    # A template that edits the content (e.g. trims it) would make the cut-out text wrong.
    joined_responses = SEPARATOR_TEXT.join(responses)
    if _render(processor, media_parts, prompt, joined_responses) != head + prompt + middle + joined_responses + tail:
        raise ValueError("the chat template changes the prompt or response text; cannot place the separators")

    special_pattern = _special_pattern(tokenizer)
    processor_text_end = _media_head_end(head, special_pattern)

    cache = {} if media_cache is None else media_cache
    key = (head[:processor_text_end], tuple(sorted(media_options.items())))
    if key not in cache:
        cache[key] = processor.media_head(key[0], images, video, video_metadata, **media_options)
    outputs = dict(cache[key])  # its text entries are replaced below

    # What follows the media head: plain text (str) and special token ids (int), in order.
    pieces = [head[processor_text_end:], prompt]
    pieces += _template_pieces(middle, special_pattern, tokenizer)
    pieces.append(_ResponseText(responses[0]))
    for response in responses[1:]:
        pieces += [_TEXT_BEFORE_SEP, sep_id, _TEXT_AFTER_SEP, _ResponseText(response)]
    pieces += _template_pieces(tail, special_pattern, tokenizer)

    input_ids_t = list(outputs["input_ids"][0])
    response_starts_n = []
    plain_text, response_chars = "", []  # the pending plain stretch, and where its responses start

    def flush_plain():
        ids, offsets = _plain_ids(processor, plain_text)
        for char in response_chars:
            response_starts_n.append(len(input_ids_t) + next(i for i, (_, end) in enumerate(offsets) if end > char))
        input_ids_t.extend(ids)

    for piece in pieces:
        if isinstance(piece, str):
            if isinstance(piece, _ResponseText):
                response_chars.append(len(plain_text))
            plain_text += piece
        else:
            flush_plain()
            input_ids_t.append(piece)
            plain_text, response_chars = "", []
    flush_plain()

    input_ids_t = np.asarray(input_ids_t, outputs["input_ids"].dtype)
    outputs["input_ids"] = input_ids_t[None]
    outputs["attention_mask"] = np.ones_like(outputs["input_ids"])
    outputs["mm_token_type_ids"] = processor.create_mm_token_type_ids(outputs["input_ids"])

    sep_positions = np.flatnonzero(input_ids_t == sep_id)
    assert len(sep_positions) == len(responses) - 1, (len(sep_positions), len(responses))
    read_positions_n = np.append(sep_positions - 1, len(input_ids_t) - 1).astype(np.int32)
    return FormattedExample(input_ids=input_ids_t.astype(np.int32), read_positions=read_positions_n,
                            response_starts=np.asarray(response_starts_n, np.int32),
                            num_responses=len(responses), processor_outputs=outputs)


def format_prompt(processor, prompt, images=None, video=None, video_metadata=None, **media_options) -> dict:
    """What `processor(...)` returns (batch of 1, numpy) for a generation prompt: the user turn as
    `format_example` writes it, then the template's opening of the assistant turn
    (`add_generation_prompt`), the prompt tokenized as plain text. A policy samples its response from here."""
    _check_inputs(prompt, ["-"], images, video)
    images, tokenizer = list(images or []), processor.tokenizer
    media_parts = [{"type": "image"}] * len(images) + [{"type": "video"}] * (video is not None)
    messages = [{"role": "user", "content": [*media_parts, {"type": "text", "text": _PROMPT_SLOT}]}]
    head, tail = _split_once(processor.apply_chat_template(messages, add_generation_prompt=True), _PROMPT_SLOT)
    special_pattern = _special_pattern(tokenizer)
    processor_text_end = _media_head_end(head, special_pattern)
    outputs = dict(processor.media_head(head[:processor_text_end], images, video, video_metadata, **media_options))
    input_ids_t = list(outputs["input_ids"][0])
    for piece in [head[processor_text_end:] + prompt, *_template_pieces(tail, special_pattern, tokenizer)]:
        input_ids_t += _plain_ids(processor, piece)[0] if isinstance(piece, str) else [piece]
    outputs["input_ids"] = np.asarray(input_ids_t, outputs["input_ids"].dtype)[None]
    outputs["attention_mask"] = np.ones_like(outputs["input_ids"])
    outputs["mm_token_type_ids"] = processor.create_mm_token_type_ids(outputs["input_ids"])
    return outputs


def _special_pattern(tokenizer) -> re.Pattern:
    """A pattern capturing any special token's text, longest first."""
    special_tokens = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    longest_first = sorted(special_tokens, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(t) for t in longest_first) + ")")


def _media_head_end(head: str, special_pattern: re.Pattern) -> int:
    """Where the media head ends: after the last special token before the prompt."""
    head_matches = list(special_pattern.finditer(head))
    return head_matches[-1].end() if head_matches else 0


class _ResponseText(str):
    """Marks response text among the plain pieces, to find where each response's tokens start."""


def _check_inputs(prompt, responses, images, video) -> None:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if not isinstance(responses, (list, tuple)):
        raise TypeError(f"responses must be a list of strings, got {type(responses).__name__}")
    if not responses:
        raise ValueError("responses is empty: need at least one response")
    for number, response in enumerate(responses, start=1):
        if not isinstance(response, str):
            raise TypeError(f"response {number} must be a string, got {type(response).__name__}")
        if not response:
            raise ValueError(f"response {number} is empty")
    if images is not None:
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be a list of PIL images, got {type(images).__name__}")
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"images[{index}] must be a PIL image, got {type(image).__name__}")
    if video is None:
        return
    if isinstance(video, np.ndarray) and video.ndim == 4:
        return
    if isinstance(video, (list, tuple)) and video and all(isinstance(frame, Image.Image) for frame in video):
        return
    if isinstance(video, (list, tuple)) and len(video) > 1 and all(np.ndim(v) == 4 for v in video):
        raise ValueError(f"video: at most one video per example, got {len(video)}")
    raise TypeError("video must be one video: a [T, H, W, 3] uint8 array or a non-empty list of PIL frames, "
                    f"got {type(video).__name__}")


def _render(processor, media_parts, prompt_text, assistant_text) -> str:
    messages = [
        {"role": "user", "content": [*media_parts, {"type": "text", "text": prompt_text}]},
        {"role": "assistant", "content": assistant_text},
    ]
    return processor.apply_chat_template(messages, add_generation_prompt=False)


def _split_once(text: str, slot: str) -> tuple[str, str]:
    before, found, after = text.partition(slot)
    if not found or slot in after:
        raise ValueError("the chat template must render the prompt once, then the responses once")
    return before, after


def _template_pieces(text, special_pattern, tokenizer) -> list:
    """Template text as plain strings and special token ids, in order."""
    parts = special_pattern.split(text)  # the pattern captures, so odd parts are the special tokens
    return [tokenizer.convert_tokens_to_ids(part) if index % 2 else part for index, part in enumerate(parts)]


def _plain_ids(processor, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids (and their character spans) of `text`, every special-token literal in it tokenized as plain text."""
    if not text:
        return [], []
    encoded = processor.plain_tokenizer.encode(text, add_special_tokens=False)
    return encoded.ids, encoded.offsets
