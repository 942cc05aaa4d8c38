"""tunix: a reward function for `GRPOLearner(reward_fns=...)`.

    reward_fn = make_reward_fn(url="http://127.0.0.1:8000", num_generations=G)   # or model=RewardModel
    learner = GRPOLearner(..., reward_fns=[reward_fn])

tunix calls `reward_fn(prompts=, completions=, **columns)` with its inputs repeated G times
(`np.repeat`), so a group is a contiguous block of `num_generations`: each block is one `/score` group.
The image of a block comes from the column `image_key` (a ref: path under the server's media root,
data: URI or base64). With `model=` the groups are scored in this process, no server.
"""

from __future__ import annotations

from mrrm_jax.rl.client import LocalScorer, RewardClient, column_at, score_entries


def make_reward_fn(url: str | None = None, model=None, num_generations: int = 1, image_key: str = "image",
                   video_key: str = "video", api_key: str | None = None, media_root=None):
    if (url is None) == (model is None):
        raise ValueError("make_reward_fn needs exactly one of url= (a reward server) and model= (in process)")
    scorer = RewardClient(url, api_key) if url is not None else LocalScorer(model, media_root)

    def mrrm_reward(prompts, completions, **kwargs) -> list[float]:
        if len(prompts) % num_generations:
            raise ValueError(f"{len(prompts)} completions are not blocks of num_generations={num_generations}")
        entries = [(prompt, completion, {"image": column_at(kwargs.get(image_key), i),
                                         "video": column_at(kwargs.get(video_key), i)})
                   for i, (prompt, completion) in enumerate(zip(prompts, completions))]
        return score_entries(scorer, entries, [i // num_generations for i in range(len(prompts))])

    return mrrm_reward
