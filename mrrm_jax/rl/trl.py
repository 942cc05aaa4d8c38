"""TRL: one reward function for `GRPOTrainer` and for `AsyncGRPOTrainer` (trl.experimental.async_grpo).

    reward = make_reward_func("http://127.0.0.1:8000")
    trainer = GRPOTrainer(..., reward_funcs=[reward])         # or AsyncGRPOTrainer(..., reward_funcs=[reward])

`GRPOTrainer` (TRL 1.16) calls `reward_func(prompts=, completions=, completion_ids=, **columns,
trainer_state=, log_extra=, log_metric=)` on the local process's slice: the G completions of a prompt are
adjacent, but a group can be split across processes, so entries are grouped by question and image
within the slice (a partial group is scored as a smaller group). With an `image` column (one image
per row) or `images` (a list per row) TRL hands over the decoded PIL images, also placed inside the
conversational prompt's content parts; they are sent to the server as PNG data URIs. A column of ref
strings (paths under the server's media root) works as well.

`AsyncGRPOTrainer` calls it once per `RolloutGroup` (one prompt's G completions: one `/score` group),
from a spawned rollout process, so the function is a picklable object, not a closure.
"""

from __future__ import annotations

from mrrm_jax.rl.client import RewardClient, column_at, media_ref, message_text, question_of, score_entries


class RewardFunc:
    """The reward function object (`make_reward_func`); `__name__` is the name TRL logs it under."""

    def __init__(self, url: str, api_key: str | None = None, name: str = "mrrm_reward"):
        self.url, self.api_key, self.__name__ = url, api_key, name

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        images = kwargs.get("image", kwargs.get("images"))
        refs: dict[int, object] = {}  # one encoding per image object: TRL repeats a row's images G times
        entries, keys = [], []
        for index, (prompt, completion) in enumerate(zip(prompts, completions)):
            image = column_at(images, index)
            if image is not None and not isinstance(image, str):
                image = refs.setdefault(id(image), media_ref(image))
            question = question_of(prompt)
            entries.append((question, message_text(completion), {"image": image, "video": column_at(kwargs.get("video"), index)}))
            keys.append((question, str(image)))
        return score_entries(RewardClient(self.url, self.api_key), entries, keys)


def make_reward_func(url: str, api_key: str | None = None) -> RewardFunc:
    return RewardFunc(url, api_key)
