"""tunix: a reward function for `GRPOLearner(rl_cluster, algo_config, reward_fns=[...])` (tunix 0.1.7).

    reward_fn = make_reward_fn(url="http://127.0.0.1:8000")       # or model=RewardModel (in process)
    learner = GRPOLearner(rl_cluster=cluster, algo_config=GRPOConfig(num_generations=G), reward_fns=[reward_fn])

tunix repeats each batch row G times (`np.repeat`: a prompt's generations are a contiguous block), adds
`trajectory_ids` ("row_generation") and calls `reward_fn(prompts=, completions=, **columns)`; a parameter
named like a GRPOConfig field is filled from the config, so `num_generations` arrives by itself. Each
prompt's block is one `/score` group. Prompts arrive as the policy saw them: tunix's data helpers
render the chat template into the text, so the question is recovered by the template's rule
(`serving.templates`). The image of a block comes from the column `image_key` (a ref: a path under
the server's media root, a data: URI or base64); a numpy string column has no None, so '' means none.
"""

from __future__ import annotations

from mrrm_jax.rl.client import LocalScorer, RewardClient, column_at, media_ref, question_of, score_entries


def make_reward_fn(url: str | None = None, model=None, image_key: str = "image", video_key: str = "video",
                   api_key: str | None = None, media_root=None):
    if (url is None) == (model is None):
        raise ValueError("make_reward_fn needs exactly one of url= (a reward server) and model= (in process)")
    scorer = RewardClient(url, api_key) if url is not None else LocalScorer(model, media_root)

    def mrrm_reward(prompts, completions, num_generations, trajectory_ids=None, **kwargs) -> list[float]:
        if trajectory_ids is not None:  # "row_generation": the row is the group
            keys = [str(trajectory).rsplit("_", 1)[0] for trajectory in trajectory_ids]
        elif len(prompts) % num_generations:
            raise ValueError(f"{len(prompts)} completions are not blocks of num_generations={num_generations}")
        else:
            keys = [i // num_generations for i in range(len(prompts))]
        entries = [(question_of(str(prompt)), str(completion),
                    {"image": media_ref(column_at(kwargs.get(image_key), i)),
                     "video": media_ref(column_at(kwargs.get(video_key), i))})
                   for i, (prompt, completion) in enumerate(zip(prompts, completions))]
        return score_entries(scorer, entries, keys)

    return mrrm_reward
