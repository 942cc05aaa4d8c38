"""GRPO on a Molmo2 or Qwen3-VL policy with the multi-response reward model, in one process.

    python -m mrrm_jax.grpo --config=configs/grpo_demo.py [--config.key=value ...] [--workdir=DIR]

The loop lives in `mrrm_jax.policy.loop` (sampler, objective, warm-up and prompts beside it); this is the
command line around it. SIGTERM (a preemption) stops the run after the current step with a checkpoint;
the same command resumes it.
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mrrm_jax.training.checkpoints import UnusableCheckpoints, stop_on_sigterm

_CONFIG = config_flags.DEFINE_config_file("config", None, "a GRPO config file (configs/grpo_*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mrrm_jax_grpo", "run directory: checkpoints, metrics, demo data")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    from mrrm_jax.policy import loop  # after the flags: a usage error is the only output

    stop = stop_on_sigterm()
    try:
        results = loop.Run(_CONFIG.value, pathlib.Path(_WORKDIR.value).absolute()).run(stop)
    except (loop.RunError, UnusableCheckpoints, ValueError) as error:
        sys.exit(f"error: {error}")
    for name in ("eval_before", "eval"):
        if name in results:
            shown = "  ".join(f"{k} {v:.3f}" for k, v in results[name].items())
            print(f"{name}: {shown}", flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
