"""The single-response baseline of the CPU demo: the same tiny model, corpus, steps and loss as
`configs/demo.py`, but every response in its own sequence with its own copy of the prompt and media
(`data.single_response`), so a response's score cannot see the others. The GRPO demo scores with it
one response per pass (`reward.mode=single`).

    python -m mrrm_jax.train --config=configs/demo_single.py [--workdir=/tmp/mrrm_jax_run_single]

A group of 4 is ~2.6x the tokens of the multi-response example (140 vs 53 for an image record), so
the rows are 2.5x larger to hold about as many records per step as the demo's.
"""

from configs import demo


def get_config():
    config = demo.get_config()
    config.data.single_response = True
    config.budget.max_tokens = 1280
    config.budget.max_vision_tokens = 400
    config.packing.update(row_tokens=1280, row_crops=100, row_pooled=400)
    return config
