"""The RL frameworks' own code calling our reward path: TRL's GRPOTrainer (a tiny random policy, text and
PIL-image prompts), TRL's AsyncGRPOTrainer group scoring, and OpenRLHF's remote reward client. The
rewards each framework used are checked against the reward model scoring the same groups directly
(blanks at the documented floor)."""

from __future__ import annotations

import asyncio
import pathlib
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


def _verl_rollout(tok, uid, messages, response, multi_modal_data=None):
    """One rollout as verl's agent loop hands it to the reward loop: unpadded prompt and response ids, the
    gen batch's row fields (uid, raw_prompt, ...)."""
    import torch
    from tensordict import TensorDict
    from verl import DataProto

    prompt_ids = torch.tensor(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])
    response_ids = torch.tensor(tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    input_ids = torch.cat([prompt_ids, response_ids])
    batch = TensorDict({"prompts": prompt_ids[None], "responses": response_ids[None],
                        "attention_mask": torch.ones_like(input_ids)[None], "input_ids": input_ids[None],
                        "position_ids": torch.arange(len(input_ids))[None]}, batch_size=1)
    row = {"uid": uid, "data_source": "mm", "raw_prompt": messages, "reward_model": {"ground_truth": ""},
           "extra_info": {"index": 0}, "multi_modal_data": multi_modal_data or {}}
    return DataProto(batch=batch, non_tensor_batch={k: np.array([v], dtype=object) for k, v in row.items()})


def test_verl_reward_loop_groups_rollouts_by_uid_across_workers(model, media_root, tmp_path):
    import random

    import verl
    from omegaconf import OmegaConf, open_dict
    from PIL import Image
    from verl.experimental.reward_loop import RewardLoopWorker

    tok = rl_policies.tokenizer()
    tok.save_pretrained(tmp_path / "policy")
    picture = Image.open(media_root / "a.png").convert("RGB")
    seeing = [{"role": "system", "content": "be brief ."},
              {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the picture ."}]}]
    asking = [{"role": "user", "content": "which answer fits ?"}]
    answers = ["the sky is blue .", "a cat on a mat .", "it is red .", "no ."]
    rollouts = [_verl_rollout(tok, "u-see", seeing, a, {"image": [picture]}) for a in answers[:3]]
    rollouts += [_verl_rollout(tok, "u-ask", asking, a) for a in answers[1:]]
    random.Random(0).shuffle(rollouts)  # out of order, interleaved

    config = OmegaConf.load(pathlib.Path(verl.__file__).parent / "trainer/config/_generated_ppo_trainer.yaml")
    with serve(model, max_rows=2, group_size=3, group_timeout_s=60) as base:
        with open_dict(config):  # what the README's command-line keys set
            config.actor_rollout_ref.model.path = str(tmp_path / "policy")
            config.actor_rollout_ref.rollout.n = 3
            config.reward.reward_manager.source = "importlib"
            config.reward.reward_manager.name = "MrrmRewardManager"
            config.reward.reward_manager.module.path = "pkg://mrrm_jax.rl.verl"
            config.reward.mrrm = {"url": base}
        workers = [RewardLoopWorker(config, reward_router_address=None) for _ in range(2)]
        assert type(workers[0].reward_manager).__name__ == "MrrmRewardManager"

        async def one(index, rollout):
            await asyncio.sleep(0.2 * index)  # one at a time, each to a random worker, as verl's agent loop does
            return await random.Random(index).choice(workers).compute_score(rollout)

        async def run_all():
            return await asyncio.gather(*(one(i, r) for i, r in enumerate(rollouts)))

        outputs = asyncio.run(run_all())
    by_uid: dict[str, list] = {}
    for rollout, output in zip(rollouts, outputs):
        by_uid.setdefault(rollout.non_tensor_batch["uid"][0], []).append((rollout, output["reward_score"]))
    for uid, question, image in [("u-see", "describe the picture .", [picture]), ("u-ask", "which answer fits ?", None)]:
        texts = [tok.decode(r.batch["responses"][0], skip_special_tokens=True) for r, _ in by_uid[uid]]
        np.testing.assert_allclose([score for _, score in by_uid[uid]], model.score(question, texts, images=image),
                                   atol=1e-5)
    assert {o["reward_extra_info"]["mrrm_group_size"] for o in outputs} == {3.0}


def test_tunix_grpo_learner_step_with_our_reward_fn(model, media_root):
    """One `GRPOLearner` step on tunix's own toy policy; prompts templated by tunix's tokenizer adapter, an
    image column with '' for the row without one. The rewards tunix used (its metrics buffer) equal the
    model on each prompt's generations."""
    import grain
    import jax
    import optax
    from flax import nnx
    from jax.sharding import Mesh
    from tunix.generate import tokenizer_adapter
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout
    from tunix.tests import test_common

    from mrrm_jax.rl import tunix as tunix_adapter

    vocab = test_common.MockVocab()
    template = tokenizer_adapter.TokenizerAdapter(vocab)
    questions = ["hello world", "My name"]
    rows = [{"prompts": template.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True),
             "image": image} for q, image in zip(questions, ["a.png", ""])]
    assert rows[0]["prompts"].startswith("<start_of_turn>user\nhello world")
    config = test_common.ModelConfig(vocab_size=vocab.GetPieceSize())
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    cluster = rl_cluster_lib.RLCluster(
        actor=test_common.ToyTransformer(config=config, rngs=nnx.Rngs(0)),
        reference=test_common.ToyTransformer(config=config, rngs=nnx.Rngs(0)), tokenizer=vocab,
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={role: mesh for role in rl_cluster_lib.Role}, rollout_engine="vanilla", offload_to_cpu=False,
            training_config=rl_cluster_lib.RLTrainingConfig(actor_optimizer=optax.sgd(1e-3), eval_every_n_steps=10,
                                                            max_steps=1),
            rollout_config=base_rollout.RolloutConfig(max_tokens_to_generate=6, max_prompt_length=16,
                                                      kv_cache_size=64, temperature=0.9)))
    used = []
    cluster.with_external_metrics_logger(used.append)
    with serve(model, max_rows=2, media_root=str(media_root)) as base:
        reward_fn = tunix_adapter.make_reward_fn(url=base)
        learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=grpo_learner.GRPOConfig(num_generations=3),
                                           reward_fns=[reward_fn])
        learner.train(grain.MapDataset.source(rows).batch(2))
    metrics = {name: values for buffer in used for name, (values, _) in buffer.metrics.items()}
    rewards = np.concatenate(metrics[f"rewards/{reward_fn.__name__}"])
    completions = [str(c) for c in np.concatenate(metrics["completions"])]
    assert len(rewards) == 6
    image = [media.load_image(media_root / "a.png")]
    np.testing.assert_allclose(rewards[:3], _expected(model, "hello world", completions[:3], image), atol=1e-5)
    np.testing.assert_allclose(rewards[3:], _expected(model, "My name", completions[3:]), atol=1e-5)
