"""Qwen3-VL-4B reward model on a TPU v5p-8 slice, trained on the paper's ten sources mixed.

    for NAME in mm_rlhf llava_critic rlaif_v vlfeedback povid wildvision tulu skywork nectar pku_saferlhf; do
        python -m mrrm_jax.prepare --dataset=$NAME --input=RELEASES/$NAME --out=PREPARED/$NAME \
            --decontaminate=VL_REWARDBENCH.parquet,all_data.json,mm_reward_bench.jsonl
    done
    python -m mrrm_jax.train --config=configs/qwen3vl_4b_paper_mix.py --config.model.base_dir=CONVERTED_DIR --workdir=RUN_DIR

The prepared directories are read from PREPARED_ROOT below (edit it, or the pairs). The paper gives no
per-source weights: these weight each source by its size in the release (thousands of preference
records), as concatenating the ten would; edit SOURCE_WEIGHTS to change the mix.
"""

from mrrm_jax.training import defaults

PREPARED_ROOT = "/data/mrrm_prepared"
# thousands of records per release: MM-RLHF 16.3, LLaVA-Critic pairwise 40.2, RLAIF-V 83.1,
# VLFeedback 80.3, POVID 17.2, WildVision battle 6.2, Tulu 3 mixture 271.4, Skywork 80K v0.2 77,
# Nectar 183, PKU-SafeRLHF (all three generators' train splits) ~73.9
SOURCE_WEIGHTS = {"mm_rlhf": 16.3, "llava_critic": 40.2, "rlaif_v": 83.1, "vlfeedback": 80.3, "povid": 17.2,
                  "wildvision": 6.2, "tulu": 271.4, "skywork": 77.0, "nectar": 183.0, "pku_saferlhf": 73.9}


def get_config():
    config = defaults.qwen3vl_4b(mesh=dict(data=1, fsdp=4, tensor=1), grad_accum=2, remat="full")
    config.data.mixture = tuple((f"{PREPARED_ROOT}/{name}", weight) for name, weight in SOURCE_WEIGHTS.items())
    return config
