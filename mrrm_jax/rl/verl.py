"""verl: a batch reward function for `reward_model.reward_manager=batch`.

    custom_reward_function.path=/path/to/mrrm_jax/rl/verl.py
    custom_reward_function.name=compute_score
    +custom_reward_function.reward_kwargs.url=http://127.0.0.1:8000
    reward_model.reward_manager=batch

verl's batch manager calls `compute_score(data_sources=, solution_strs=, ground_truths=, extra_infos=,
**reward_kwargs)` with the responses (decoded without special tokens) of the whole batch; the rollout.n
responses of one prompt are adjacent. It does not pass prompts or the `uid`, so each row's parquet
`extra_info` carries what we need: `prompt` (the question text), and optionally `image` / `video` refs
and `uid` (the group key; default: the prompt and its media). One `/score` group per prompt.
"""

from __future__ import annotations

from mrrm_jax.rl.client import RewardClient, score_entries


def compute_score(data_sources, solution_strs, ground_truths, extra_infos, url: str = "http://127.0.0.1:8000",
                  api_key: str | None = None, **kwargs) -> list[float]:
    entries, keys = [], []
    for index, info in enumerate(extra_infos):
        info = info or {}
        if not isinstance(info.get("prompt"), str):
            raise ValueError(f"verl row {index}: extra_info needs the question text under 'prompt'")
        media = {"image": info.get("image"), "video": info.get("video")}
        entries.append((info["prompt"], solution_strs[index], media))
        keys.append(info.get("uid") or (info["prompt"], str(media["image"]), media["video"]))
    return score_entries(RewardClient(url, api_key), entries, keys)
