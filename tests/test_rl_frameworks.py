"""The RL frameworks' own code calling our reward path: TRL's GRPOTrainer (a tiny random policy, text and
PIL-image prompts), TRL's AsyncGRPOTrainer group scoring, and OpenRLHF's remote reward client. The
rewards each framework used are checked against the reward model scoring the same groups directly
(blanks at the documented floor)."""

from __future__ import annotations

import asyncio
import pickle

import numpy as np
import pytest

from mrrm_jax.data import media
from mrrm_jax.rl import trl as trl_adapter
from mrrm_jax.serving import groups
from tests import rl_policies
from tests.benchmark_files import ANSWERS
from tests.test_serve import media_root, serve  # noqa: F401  (media_root is a fixture)

pytestmark = pytest.mark.slow


def _expected(model, question, responses, images=None) -> np.ndarray:
    """The reward the model gives a group directly: answered responses in one pass, blanks at the floor."""
    answered = groups.answered(responses)
    scores = model.score(question, [responses[i] for i in answered], images=images) if answered else np.zeros(0)
    return groups.with_blank_floor(len(responses), answered, np.asarray(scores, np.float64))


@pytest.fixture(scope="module")
def url(model, media_root):
    with serve(model, max_rows=2, media_root=str(media_root)) as base:
        yield base


def _grpo(policy, processing_class, dataset, reward, tmp_path):
    """TRL's GRPOTrainer for 2 steps, 4 generations of one prompt a step; returns what it scored and used:
    per step (prompts, completions, rewards)."""
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class Used(TrainerCallback):
        steps = []

        def on_step_end(self, args, state, control, **kwargs):
            logs = trainer._logs  # the last generation batch: what the step's advantages came from
            Used.steps.append((list(logs["prompt"]), list(logs["completion"]), list(logs["rewards"][reward.__name__])))

    config = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_steps=2,
                        max_completion_length=6, use_cpu=True, bf16=False, report_to="none", logging_steps=1,
                        save_strategy="no", temperature=1.0, seed=0)
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=processing_class, callbacks=[Used()])
    trainer.train()
    logged = [entry[f"rewards/{reward.__name__}/mean"] for entry in trainer.state.log_history
              if f"rewards/{reward.__name__}/mean" in entry]
    return Used.steps, logged


def _completion_text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def test_trl_grpo_trainer_rewards_equal_the_model_on_each_group(model, url, tmp_path):
    from datasets import Dataset

    tok = rl_policies.tokenizer()
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "which answer fits ?"}],
                                            [{"role": "user", "content": "describe the sky ."}]]})
    steps, logged = _grpo(rl_policies.causal_lm(tok), tok, dataset, trl_adapter.make_reward_func(url), tmp_path)
    assert len(steps) == 2
    for (prompts, completions, rewards), mean in zip(steps, logged):
        question = prompts[0][-1]["content"]
        assert all(p == prompts[0] for p in prompts)
        texts = [_completion_text(c) for c in completions]
        np.testing.assert_allclose(rewards, _expected(model, question, texts), atol=1e-5)
        assert mean == pytest.approx(np.mean(rewards), abs=1e-5)


def test_trl_grpo_trainer_sends_pil_images_to_the_server(model, url, media_root, tmp_path):
    from datasets import Dataset, Image as ImageFeature

    picture = str(media_root / "a.png")
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "describe the picture ."}]] * 2,
                                 "image": [picture, picture]}).cast_column("image", ImageFeature())
    processor = rl_policies.vision_processor()
    steps, _ = _grpo(rl_policies.vision_lm(processor), processor, dataset, trl_adapter.make_reward_func(url), tmp_path)
    image = [media.load_image(media_root / "a.png")]
    for prompts, completions, rewards in steps:
        texts = [_completion_text(c) for c in completions]
        np.testing.assert_allclose(rewards, _expected(model, "describe the picture .", texts, image), atol=1e-5)


def test_trl_async_grpo_scores_a_rollout_group_in_one_pass(model, url):
    from accelerate import PartialState
    from trl.experimental.async_grpo.async_rollout_worker import RolloutGroup, TrainingSequence, _AsyncRolloutLoop

    PartialState()  # accelerate's logging, as the rollout process sets it up
    reward = pickle.loads(pickle.dumps(trl_adapter.make_reward_func(url)))  # crosses to a spawned process
    loop = object.__new__(_AsyncRolloutLoop)  # its scoring step alone: the rest needs CUDA and a vLLM server
    loop.reward_funcs, loop.reward_func_names, loop._env_reward_types = [reward], [reward.__name__], []
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which answer fits?"}]
    completions = ANSWERS[:3] + [""]
    group = RolloutGroup(
        prompts=[prompt] * 4, reward_kwargs={"answer": ["x"] * 4},
        completions=[[{"role": "assistant", "content": text}] for text in completions],
        completions_ids=[[1]] * 4,
        completions_sequences=[[TrainingSequence([5, 6], [0, 1], [0.0, -1.0], f"r{i}")] for i in range(4)],
        tool_call_counts=[0] * 4, tool_failure_counts=[0] * 4, model_version=0, group_id=0,
        env_rewards=[None] * 4, rollout_rewards=[None] * 4)
    samples = asyncio.run(loop._score_group(group))
    np.testing.assert_allclose([s.metrics[f"rewards/{reward.__name__}"] for s in samples],
                               _expected(model, "Which answer fits?", completions), atol=1e-5)


def test_openrlhf_remote_reward_client_one_rollout_per_call(model, media_root):
    import json

    from openrlhf.utils.agent import SingleTurnAgentExecutor
    from transformers.utils.chat_template_utils import render_jinja_template

    from mrrm_jax.backbones.qwen3_vl.processor_files import QWEN3_VL_CHAT_TEMPLATE

    def templated(question):  # what OpenRLHF's --data.apply_chat_template makes of the prompt
        [text], _ = render_jinja_template([[{"role": "system", "content": "You are a helpful assistant."},
                                            {"role": "user", "content": question}]],
                                          chat_template=QWEN3_VL_CHAT_TEMPLATE, add_generation_prompt=True)
        return text

    rollouts = [("Describe the picture.", json.dumps({"image": "a.png"}), ANSWERS[i]) for i in range(3)]
    rollouts += [("Which answer fits?", "", ANSWERS[i]) for i in range(3)]
    with serve(model, media_root=str(media_root), group_size=3, group_timeout_s=30) as base:
        client = SingleTurnAgentExecutor(remote_rm_url=[f"{base}/get_reward"])  # its --reward.remote_url

        async def one(index, question, label, response):
            await asyncio.sleep(0.2 * (index % 3))  # a group's rollouts arrive in order, one call each
            prompt = templated(question)
            [reply] = await client._fetch_rewards_via_http([prompt + response + "<|im_end|>"], [prompt], [label])
            return reply

        async def run_all():
            return await asyncio.gather(*(one(i, *r) for i, r in enumerate(rollouts)))

        replies = asyncio.run(run_all())
    rewards = [reply["rewards"][0] for reply in replies]
    image = [media.load_image(media_root / "a.png")]
    np.testing.assert_allclose(rewards[:3], model.score("Describe the picture.", ANSWERS[:3], images=image), atol=1e-5)
    np.testing.assert_allclose(rewards[3:], model.score("Which answer fits?", ANSWERS[:3]), atol=1e-5)
    assert all(reply["extra_logs"]["prompt_rule/chatml"] == [1.0] for reply in replies)
