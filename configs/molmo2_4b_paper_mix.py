"""Molmo2-4B reward model on a TPU v5p-8 slice, trained on the paper's ten sources mixed.

    for NAME in mm_rlhf llava_critic rlaif_v vlfeedback povid wildvision tulu skywork nectar pku_saferlhf; do
        python -m mrrm_jax.prepare --dataset=$NAME --input=RELEASES/$NAME --out=PREPARED/$NAME \\
            --decontaminate=VL_REWARDBENCH.parquet,all_data.json,mm_reward_bench.jsonl
    done
    python -m mrrm_jax.train --config=configs/molmo2_4b_paper_mix.py --config.model.base_dir=CONVERTED_DIR --workdir=RUN_DIR

The prepared directories are read from PREPARED_ROOT below; the weights are the release sizes
(`defaults.PAPER_SOURCE_WEIGHTS`: the paper gives none).
"""

from mrrm_jax.training import defaults

PREPARED_ROOT = "/data/mrrm_prepared"


def get_config():
    config = defaults.molmo2_4b(mesh=dict(data=1, fsdp=4, tensor=1), grad_accum=2, remat="full")
    config.data.mixture = defaults.paper_mixture(PREPARED_ROOT)
    return config
