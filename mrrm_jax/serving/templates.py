"""The user's question in a prompt that a policy's chat template rendered.

RL frameworks hand the reward path the policy's prompt as text with its chat template applied (OpenRLHF's
`prompts`, tunix's templated datasets): a system turn, role headers, media placeholders, the generation
prompt. The reward model scores (question, responses), so the question is recovered by the rule of the
template family that rendered it: the content of the LAST user turn (earlier turns and the system
prompt are not part of the question the model was trained on), media placeholders removed (the media
reach the model separately). `RULES` names the families in the order they are tried; `raw` is a prompt
with no template, taken whole.
"""

from __future__ import annotations

import re

# family -> its user turn, content in group 1 (a prompt may end inside the last turn: `$`)
_CHATML = re.compile(r"<\|im_start\|>user\n(.*?)(?:<\|im_end\|>|$)", re.S)
_USER_TURN = {
    "molmo2": _CHATML,  # ChatML turns after a media head ('<|image|>', 'Image 1<|image|>...', '<|video|>')
    "chatml": _CHATML,  # Qwen, Qwen-VL
    "llama3": re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|$)", re.S),
    "gemma": re.compile(r"<start_of_turn>user\n(.*?)(?:<end_of_turn>|$)", re.S),
}
_MOLMO2_MEDIA_HEAD = re.compile(r"^(?:(?:Image \d+)?<\|image\|>|<\|video\|>)+<\|im_start\|>")
RULES = ("molmo2", "chatml", "llama3", "gemma", "raw")

# Media placeholders of the families above (Qwen-VL's vision span, Molmo2's, Llama 3.2 Vision's and
# Gemma 3's image tokens, the common '<image>'), removed from the question even without a tokenizer.
_MEDIA = re.compile(r"<\|vision_start\|>.*?<\|vision_end\|>|<\|image_pad\|>|<\|video_pad\|>|<\|image\|>|<\|video\|>"
                    r"|<start_of_image>.*?<end_of_image>|<start_of_image>|<image_soft_token>|<image>|<video>", re.S)


def rule_of(prompt: str) -> str:
    """The template family that rendered `prompt` (`raw`: none)."""
    if _MOLMO2_MEDIA_HEAD.match(prompt):
        return "molmo2"
    for rule in RULES[1:-1]:
        if _USER_TURN[rule].search(prompt):
            return rule
    return "raw"


def question(prompt: str, special: re.Pattern | None = None) -> tuple[str, str]:
    """(the user's question, the rule that found it). `special`: the reward model's special tokens,
    removed too (`groups.special_token_pattern`)."""
    rule = rule_of(prompt)
    text = prompt if rule == "raw" else _USER_TURN[rule].findall(prompt)[-1]
    text = _MEDIA.sub("", text)
    if special is not None:
        text = special.sub("", text)
    return re.sub(r"[ \t]{2,}", " ", text).strip(), rule
