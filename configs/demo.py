"""The CPU demo: a tiny Molmo2-shaped reward model learns the synthetic colour corpus from scratch.

    python -m mrrm_jax.train --config=configs/demo.py [--workdir=/tmp/mrrm_demo]

Random weights, so LoRA alone cannot learn: the demo trains every backbone weight except the token
embedding (`train.full_train`), plus the value head. The frozen random embedding rows already
tell the colour words apart, and leaving out its 152064-row dense update keeps a step cheap.
Images are one 56-pixel crop (4 x 4 patches) plus the low-resolution view; videos are 4 frames.

Pooling is `response_mean` (a release option), not the paper's `last`: read at the last token, a
model trained from scratch must first grow a head that carries each response's colour word to its
read token, and in our runs it sat at chance (loss ln 4) for the whole CPU budget; averaging over
the response's tokens lets it learn in ~150 steps. Converted Molmo2 weights already carry that
information, so the Molmo2-4B configs keep `last`.
"""

from mrrm_jax.training import defaults


def get_config():
    config = defaults.get_config()
    config.model.dims = dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, head_dim=32,
                    image_size=(56, 56)),
        adapter=dict(feature_layers=(1, 0), hidden_size=64, num_heads=2, num_kv_heads=2, head_dim=32,
                     intermediate_size=128),
        text=dict(hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=256,
                  rope=(("rope_theta", 10000.0), ("rope_type", "default"))),
    )
    config.head.pooling = "response_mean"
    config.processor.kwargs = dict(crop=56, max_crops=1, num_frames=4, max_fps=2.0)

    config.data.train = "synthetic"
    config.data.eval = "synthetic"
    config.data.synthetic = dict(train_images=1500, train_videos=1500, eval_images=200, eval_videos=200)
    config.budget.max_tokens = 512
    config.budget.max_vision_tokens = 160  # = packing.row_pooled: any example the budget accepts fits a row
    config.budget.max_frames = 4
    config.packing = dict(row_tokens=512, row_crops=40, row_pooled=160, row_examples=12, max_responses=4, pool_slots=9,
                          window=64)

    config.lora.rank = 0  # no LoRA: everything below is trained in full
    config.train.full_train = (r"vision_tower/.*", r"multi_modal_projector/.*", r"language_model/layers/.*",
                               r"language_model/norm/.*")
    config.train.rows_per_step = 4
    config.train.num_steps = 300
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 30
    config.checkpoint.every_steps = 100
    config.eval.every_steps = 150
    config.data.num_workers = 1  # decode and format in a second process, beside the training step
    config.log_every = 25
    return config
