"""The CPU GRPO demo: a tiny Molmo2-shaped policy, warmed up on the synthetic colour corpus, then GRPO
against the demo reward model.

    python -m mrrm_jax.train --config=configs/demo.py          # the reward model (/tmp/mrrm_jax_run)
    python -m mrrm_jax.grpo --config=configs/grpo_demo.py [--workdir=/tmp/mrrm_jax_grpo]

The policy has the reward-model demo's dimensions, random weights, and an SFT warm-up on ALL of each
record's four answers: it learns the answer format, but not to look (it names the right colour 1 time in
8, chance; docs/grpo.md has why, and why GRPO does not yet lift it). GRPO then trains LoRA (rank 16 on the
LM) with the reward model's scores of each prompt's 4 samples. `reward.mode=single` scores each sample alone (the
baseline); `data.blank_media=True` blacks out the policy's images and videos (the control: a policy that
cannot see cannot learn the colour, whatever the reward).
"""

import ml_collections

from configs import demo


def get_config():
    rm = demo.get_config()
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.log_every = 10
    config.policy = dict(
        checkpoint="",  # a converted base directory; "" = random weights of `dims` + the SFT warm-up
        processor_dir="",
        type="molmo2", dims=rm.model.dims.to_dict(), processor=rm.processor.kwargs.to_dict(),
        dtype="float32", attention="xla", remat="none",
        # the prompt rows' room: one prompt per row
        prompt=dict(tokens=96, crops=4, pooled=40, pool_slots=9, patches=0),
    )
    config.sft = dict(steps=300, rows=16, learning_rate=2e-3,
                      train=(r"vision_tower/.*", r"multi_modal_projector/.*", r"language_model/layers/.*",
                             r"language_model/norm/.*", r"lm_head/.*"))
    config.lora = dict(rank=16, alpha=32.0, targets=(r"language_model/layers/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel",
                                                      r"lm_head/kernel"))
    config.mesh = dict(data=-1, fsdp=1, tensor=1)  # the policy's: base laid out as in training, rollouts over rows
    config.reward = dict(checkpoint="/tmp/mrrm_jax_run/reward_model", url="", api_key="", mode="multi",
                         rows=4, row_tokens=1024, row_crops=32)
    config.data = dict(train="synthetic", eval="synthetic", media_root="", blank_media=False,
                       synthetic=dict(train_images=400, train_videos=400, eval_images=32, eval_videos=32))
    config.grpo = dict(num_steps=60, prompts_per_step=8, group_size=4, updates_per_batch=2, learning_rate=3e-4,
                       clip_norm=1.0, clip_eps=0.2, kl_coef=0.02, advantage="std",
                       micro_rows=0)  # the full forwards' rows at a time (0: all); must divide the step's
    config.sampling = dict(max_new_tokens=8, temperature=1.0, top_p=1.0)
    config.eval = dict(every_steps=20, prompts=64)
    config.checkpoint = dict(every_steps=20, keep=2)
    return config
