"""GRPO on a Molmo2-4B policy with the Molmo2-4B multi-response reward model, both resident on one TPU
v5p-8 slice (4 chips, 95 GiB each): the policy's base replicated over the chips (`mesh.data`), the
rollouts' rows split over them, the reward model data-parallel beside it.

    python -m mrrm_jax.grpo --config=configs/grpo_molmo2_4b_v5p.py \
        --config.policy.checkpoint=CONVERTED_MOLMO2_4B --config.reward.checkpoint=REWARD_MODEL_DIR \
        --config.data.train=PROMPTS.jsonl --config.data.eval=HELD_OUT.jsonl --workdir=RUN_DIR
    python -m bench.grpo_memory --config=configs/grpo_molmo2_4b_v5p.py   # fits? (compiled from a CPU host)

The paper publishes no GRPO hyperparameters; these are common choices for LoRA GRPO at this scale: 16
prompts x 8 samples per step (the reward model was trained on groups of up to 8), 512 new tokens,
LoRA rank 64 on the LM's projections, AdamW 1e-5, KL 0.04.
"""

from configs import grpo_demo


def get_config():
    config = grpo_demo.get_config()
    config.policy.update(checkpoint="", processor_dir="", dtype="bfloat16", attention="pallas", remat="full",
                         preset="molmo2_4b")  # the dimensions bench/grpo_memory.py compiles for
    # Assigned, not updated (`update` merges into the demo's): no dims (a run reads the checkpoint's), the
    # Molmo2 release's processor settings (a run reads the checkpoint's processor files; the bench writes these)
    config.policy.dims = {}
    config.policy.processor = dict(crop=378, max_crops=8, num_frames=384, max_fps=2.0)
    # one image prompt per row: 9 crops of 378 px at 2x2 pooling (196 pooled tokens each) and the text
    config.policy.prompt = dict(tokens=2048, crops=9, pooled=1764, pool_slots=9, patches=0)
    config.sft.steps = 0  # a real policy needs no warm-up (it runs only without policy.checkpoint)
    config.lora = dict(rank=64, alpha=128.0,
                       targets=(r"language_model/layers/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel",))
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    config.reward.update(checkpoint="", mode="multi", rows=4, row_tokens=8192, row_crops=32,
                         preset="molmo2_4b")  # as policy.preset
    config.data.update(train="", eval="")
    config.grpo.update(num_steps=500, prompts_per_step=16, group_size=8, updates_per_batch=2, learning_rate=1e-5,
                       kl_coef=0.04, micro_rows=16)
    config.sampling.update(max_new_tokens=512, temperature=1.0, top_p=1.0)
    config.eval.update(every_steps=50, prompts=256)
    config.checkpoint.update(every_steps=50, keep=3)
    return config
