"""OpenRLHF's remote reward-model contract (POST /get_reward), as pure functions.

OpenRLHF sends `{"query": [...], "prompts": [...], "labels": [...]}`: `query[i]` is the decoded prompt
(chat template applied, special tokens and image pads included) followed by the response; `prompts[i]`
the raw prompt; `labels[i]` the dataset's label, an object or a string (OpenRLHF passes strings). Ours
may carry `{"image": ref or [refs], "video": ref, "group": key}`: the only way media reach us from
OpenRLHF. Entries of one prompt (and media, or one `group` key) form one group, scored in one pass.
"""

from __future__ import annotations

import json
import re

import numpy as np

_ROLE = r"(?:assistant|user|system)\n?"


def special_token_pattern(tokenizer) -> re.Pattern:
    """Any special or added token of the model's tokenizer (chat-template and image tokens)."""
    tokens = sorted({t.content for t in tokenizer.added_tokens_decoder.values()} | set(tokenizer.all_special_tokens),
                    key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in tokens if t))


def parse_label(label, field: str) -> dict:
    """A label as a dict: an object as is, a string holding a JSON object parsed; an empty or non-JSON
    string, or None, means no media and no group."""
    if label is None or label == "":
        return {}
    if isinstance(label, str):
        try:
            label = json.loads(label)
        except json.JSONDecodeError:
            return {}
        if not isinstance(label, dict):
            return {}
    if not isinstance(label, dict):
        raise ValueError(f"{field}: a label must be an object or a string, got {type(label).__name__}")
    for key in ("image", "video", "group"):
        value = label.get(key)
        if key == "image" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            continue
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{field}.{key}: must be a string{' or a list of strings' if key == 'image' else ''}")
    return label


def _strip_template(text: str, special: re.Pattern, leading: bool) -> str:
    """Removes chat-template tokens (and a role name after one) from one end of `text`."""
    edge = re.compile(rf"\s*(?:{special.pattern})(?:{_ROLE})?" if leading else rf"(?:{special.pattern})\s*$")
    while (match := edge.match(text) if leading else edge.search(text)) and match.group(0):
        text = text[match.end():] if leading else text[: match.start()]
    return text


def extract_response(query: str, prompt: str | None, special: re.Pattern) -> str:
    """The response in `query`: what follows the prompt (or, without one in it, the last assistant turn),
    chat-template tokens stripped from both ends ("" when there is none: a blank response)."""
    if prompt and query.startswith(prompt):
        rest = query[len(prompt):]
    elif prompt and prompt in query:
        rest = query[query.rindex(prompt) + len(prompt):]
    else:
        marker = [m for m in special.finditer(query) if query.startswith("assistant", m.end())]
        rest = query[marker[-1].end() + len("assistant"):] if marker else query
    return _strip_template(_strip_template(rest, special, leading=True), special, leading=False).strip()


# A blank response (empty or whitespace only: EOS sampled first, common early in RL) has no tokens for the
# model to read, and a score the model gave its template alone could exceed real answers (a reward a
# policy could hack by stopping at once). It gets the group's lowest score minus this margin instead;
# a group of blanks only gets 0 each (no preference, a zero advantage).
BLANK_MARGIN = 1.0


def blank(response: str) -> bool:
    return not response.strip()


def answered(responses: list[str]) -> list[int]:
    """Indices of the responses that are not blank, the ones the model scores."""
    return [i for i, response in enumerate(responses) if not blank(response)]


def with_blank_floor(num_responses: int, answered_a: list[int], scores_a: np.ndarray) -> np.ndarray:
    """Scores [N] of a group from the scores of its answered responses: blanks at the floor."""
    floor = scores_a.min() - BLANK_MARGIN if len(scores_a) else 0.0
    scores_n = np.full(num_responses, floor, np.float64)
    scores_n[answered_a] = scores_a
    return scores_n


def group_key(prompt: str, label: dict) -> tuple:
    if label.get("group") is not None:
        return ("group", label["group"])
    image = label.get("image")
    return ("prompt", prompt, json.dumps(image), label.get("video"))


def softmax(scores_n: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores_n - scores_n.max())
    return shifted / shifted.sum()


def zscore(scores_n: np.ndarray) -> np.ndarray:
    """GRPO-style within-group normalisation; a group of one gets 0."""
    if len(scores_n) < 2:
        return np.zeros_like(scores_n)
    return (scores_n - scores_n.mean()) / (scores_n.std() + 1e-6)
