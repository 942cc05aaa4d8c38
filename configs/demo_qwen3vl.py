"""The CPU demo on the Qwen3-VL backbone: a tiny Qwen3-VL-shaped reward model learns the synthetic colour
corpus from scratch, as configs/demo.py does with Molmo2.

    python -m mrrm_jax.train --config=configs/demo_qwen3vl.py [--workdir=/tmp/mrrm_demo_qwen3vl]

Random weights: the demo trains every backbone weight except the token embedding, plus the value head
(see configs/demo.py for why, and for the `response_mean` pooling). The processor is Qwen3-VL's with
small pixel budgets: images are resized to 64 x 64 .. 128 x 128 pixels (4 to 16 vision tokens), a
video's 4 frames (sampled at 2 fps) stay 64 x 64 and form 2 temporal patches of 4 tokens each, each
after its "<t seconds>" timestamp. The ViT keeps Qwen3-VL's patch 16, temporal patch 2, 2 x 2 merge and
learned 48 x 48 position table; deepstack feeds the LM's first layer from ViT block 0.
"""

from mrrm_jax.training import defaults


def get_config():
    config = defaults.get_config()
    config.model.type = "qwen3_vl"
    config.model.dims = dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, deepstack_layers=(0,),
                    out_hidden_size=128),
        text=dict(hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=256,
                  rope_theta=10000.0, mrope_section=(6, 5, 5)),
    )
    config.head.pooling = "response_mean"
    config.processor.kwargs = dict(image_min_pixels=64 * 64, image_max_pixels=128 * 128, video_min_pixels=32 * 32,
                                   video_max_pixels=4 * 64 * 64, fps=2.0)

    config.data.train = "synthetic"
    config.data.eval = "synthetic"
    config.data.synthetic = dict(train_images=1500, train_videos=1500, eval_images=200, eval_videos=200)
    config.budget.max_tokens = 512
    config.budget.max_vision_tokens = 128  # = packing.row_patches / 4: any example the budget accepts fits a row
    config.budget.max_frames = 4
    config.packing = dict(row_tokens=512, row_crops=0, row_pooled=0, row_patches=512, row_examples=12,
                          max_responses=4, pool_slots=9, window=64)

    config.lora.rank = 0  # no LoRA: everything below is trained in full
    config.train.full_train = (r"visual/.*", r"language_model/layers/.*", r"language_model/norm/.*")
    config.train.rows_per_step = 4
    config.train.num_steps = 300
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 30
    config.checkpoint.every_steps = 100
    config.eval.every_steps = 150
    config.data.num_workers = 1  # decode and format in a second process, beside the training step
    config.log_every = 25
    return config
