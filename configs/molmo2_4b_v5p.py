"""Molmo2-4B reward model on a TPU v5p-8 slice (4 chips), the paper's recipe.

    python -m mrrm_jax.train --config=configs/molmo2_4b_v5p.py \
        --config.model.base_dir=CONVERTED_DIR --config.data.train=TRAIN.jsonl --workdir=RUN_DIR
    python tools/aot_compile.py --config=configs/molmo2_4b_v5p.py --topology=v5p:2x2x1   # fits? (from a CPU host)

Multi-host slices add --config.distributed=True.
"""

from mrrm_jax.training import defaults


def get_config():
    return defaults.molmo2_4b(mesh=dict(data=1, fsdp=4, tensor=1), grad_accum=2, remat="full")
