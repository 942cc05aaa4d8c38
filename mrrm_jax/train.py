"""Train a multi-response reward model.

    python -m mrrm_jax.train --config=configs/demo.py [--config.train.num_steps=100 ...] [--workdir=DIR]

The logic lives in `mrrm_jax.trainer`; this is the command line around it: the config parsed into
a run spec, and SIGTERM (a preemption) turned into a clean stop with a checkpoint.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mrrm_jax import run_spec, trainer
from mrrm_jax.data.pipeline import PipelineError
from mrrm_jax.run_checkpoints import UnusableCheckpoints

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file (configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mrrm_jax_run", "run directory: checkpoints, metrics, demo data")


def stop_on_sigterm() -> threading.Event:
    """An event that SIGTERM (a preemption) sets: the trainer then saves a checkpoint and stops."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and grain log every save at INFO
    logging.getLogger("mrrm_jax").setLevel(logging.INFO)
    cfg = _CONFIG.value
    stop = stop_on_sigterm()
    try:
        spec = run_spec.parse(cfg)  # before JAX starts: a config error is the only output
        if cfg.distributed:
            jax.distributed.initialize()
        results = trainer.train(spec, _WORKDIR.value, stop)
    except (run_spec.ConfigError, trainer.RunError, UnusableCheckpoints, PipelineError) as error:
        sys.exit(f"error: {error}")
    for name, result in results.items():
        shown = "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
        print(f"final {name}: {shown}", flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
