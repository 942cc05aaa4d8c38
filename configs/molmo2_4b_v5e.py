"""Molmo2-4B reward model on a TPU v5e-16 slice (16 chips), the paper's recipe.

    python -m mrrm_jax.train --config=configs/molmo2_4b_v5e.py \
        --config.model.base_dir=CONVERTED_DIR --config.data.train=TRAIN.jsonl --workdir=RUN_DIR
    python tools/aot_compile.py --config=configs/molmo2_4b_v5e.py --topology=v5e:4x4   # fits? (from a CPU host)

Multi-host slices add --config.distributed=True.
"""

from mrrm_jax.training import defaults


def get_config():
    return defaults.molmo2_4b(mesh=dict(data=1, fsdp=-1, tensor=1), grad_accum=1, rows_per_step=16, row_crops=48,
                              max_frames=32)
