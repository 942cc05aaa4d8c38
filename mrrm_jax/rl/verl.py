"""verl: a reward manager for verl's reward loop (verl 0.9), grouping a prompt's rollouts on the server.

    reward.reward_manager.source=importlib
    reward.reward_manager.name=MrrmRewardManager
    reward.reward_manager.module.path=pkg://mrrm_jax.rl.verl
    +reward.mrrm.url=http://127.0.0.1:8000              # the reward server, run with --group_size=<rollout.n>
    reward.custom_reward_function.path=null             # (the default) the manager scores; no compute_score

verl's reward loop scores one rollout at a time (`await manager.run_single(data)` in one of
`reward.num_workers` workers, each rollout to a random one), so no worker sees a whole group. The
server's group buffer does: each rollout is posted to `/get_reward` with its `uid` (one per prompt, set
by verl's trainer) as the group key, and the server scores a group in one pass once `--group_size`
rollouts of it have arrived, or after `--group_timeout_s` (validation with another `n`, padding).
The question is the last user turn of `raw_prompt` (verl keeps the chat messages by default), else
`extra_info["prompt"]`, else the decoded prompt by its template's rule; media come from `extra_info`
(`image`, `video` refs) or `multi_modal_data` (decoded images, sent as data URIs). The response is
decoded as verl's naive manager decodes it (its valid tokens, special tokens skipped).
"""

from __future__ import annotations

import httpx
from verl import DataProto
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from mrrm_jax.rl.client import media_ref, question_of


class MrrmRewardManager(RewardManagerBase):
    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None, reward_model_tokenizer=None):
        super().__init__(config, tokenizer, compute_score)
        settings = config.reward.get("mrrm") or {}
        if not settings.get("url"):
            raise ValueError("MrrmRewardManager needs the reward server: +reward.mrrm.url=http://HOST:PORT")
        self.url, self.timeout_s = settings["url"].rstrip("/"), float(settings.get("timeout_s", 600))
        self.headers = {"Authorization": f"Bearer {settings['api_key']}"} if settings.get("api_key") else {}

    def _texts(self, item) -> tuple[str, str]:
        """(question, response) of one rollout."""
        prompt_ids, response_ids = item.batch["prompts"], item.batch["responses"]
        mask = item.batch["attention_mask"]
        response_length = int(mask[prompt_ids.shape[-1]:].sum())
        response = self.tokenizer.decode(response_ids[:response_length], skip_special_tokens=True)
        extra = item.non_tensor_batch.get("extra_info") or {}
        raw_prompt = item.non_tensor_batch.get("raw_prompt")
        if raw_prompt is not None and len(raw_prompt):
            return question_of(list(raw_prompt)), response
        if isinstance(extra.get("prompt"), str):
            return question_of(extra["prompt"]), response
        prompt = prompt_ids[mask[: prompt_ids.shape[-1]].bool()]  # left-padded in a batch
        return question_of(self.tokenizer.decode(prompt, skip_special_tokens=False)), response

    @staticmethod
    def _label(item) -> dict:
        extra = item.non_tensor_batch.get("extra_info") or {}
        images = (item.non_tensor_batch.get("multi_modal_data") or {}).get("image")
        label = {"group": str(item.non_tensor_batch["uid"]), "image": media_ref(extra.get("image") or images),
                 "video": media_ref(extra.get("video"))}
        return {key: value for key, value in label.items() if value is not None}

    async def run_single(self, data: DataProto) -> dict:
        item = data[-1]  # a multi-output trajectory is scored by its last sequence, as verl's naive manager does
        question, response = self._texts(item)
        body = {"query": [question + response], "prompts": [question], "labels": [self._label(item)]}
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:  # never block the worker's event loop
            reply = await client.post(f"{self.url}/get_reward", json=body, headers=self.headers)
        if reply.status_code != 200:
            raise RuntimeError(f"reward server {self.url}: HTTP {reply.status_code}: {reply.text[:500]}")
        out = reply.json()
        # verl stacks reward_extra_info over samples by the first one's keys: the same scalar keys always.
        return {"reward_score": out["rewards"][0],
                "reward_extra_info": {"mrrm_raw_score": out["extra_logs"]["raw_score"][0],
                                      "mrrm_group_size": out["extra_logs"]["group_size"][0]}}
