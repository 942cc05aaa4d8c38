"""TRL: a reward function for `GRPOTrainer(reward_funcs=[...])`.

    trainer = GRPOTrainer(..., reward_funcs=[make_reward_func("http://127.0.0.1:8000")])

TRL calls `reward_func(prompts=, completions=, completion_ids=, **columns)` on the local process's
slice; the G generations of a prompt are adjacent but a group can be split across processes, so entries
are grouped by prompt (and image) within the slice: a partial group is scored as a smaller group.
Conversational prompts and completions (lists of messages) are reduced to their text. The image comes
from the `image` or `images` column (a ref, or a list of refs).
"""

from __future__ import annotations

import json

from mrrm_jax.rl.client import RewardClient, column_at, score_entries


def _text(value) -> str:
    """A string, or the text of a conversation: the last message's text parts."""
    if isinstance(value, str):
        return value
    content = value[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def make_reward_func(url: str, api_key: str | None = None):
    client = RewardClient(url, api_key)

    def mrrm_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        images = kwargs.get("image", kwargs.get("images"))
        entries, keys = [], []
        for index, (prompt, completion) in enumerate(zip(prompts, completions)):
            image = column_at(images, index)
            entries.append((_text(prompt), _text(completion), {"image": image, "video": column_at(kwargs.get("video"), index)}))
            keys.append((json.dumps(prompt, sort_keys=True, default=str), json.dumps(image, default=str)))
        return score_entries(client, entries, keys)

    return mrrm_reward
