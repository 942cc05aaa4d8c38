"""Train a multi-response reward model.

    python -m mrrm_jax.train --config=configs/demo.py [--config.train.num_steps=100 ...] [--workdir=DIR]

Several processes (`--config.distributed=True`): on a TPU pod or a Slurm / Open MPI cluster, JAX finds
the coordinator and each process's id itself; elsewhere (e.g. several processes on one machine) give
`--coordinator_address=HOST:PORT` (process 0 serves it; or JAX_COORDINATOR_ADDRESS), `--num_processes`
and `--process_id` to every process.

The logic lives in `mrrm_jax.training.trainer`; this is the command line around it: the config parsed into
a run spec, and SIGTERM (a preemption) turned into a clean stop with a checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mrrm_jax import process_flags
from mrrm_jax.training import spec as run_spec
from mrrm_jax.training import trainer
from mrrm_jax.data.pipeline import PipelineError
from mrrm_jax.training.checkpoints import UnusableCheckpoints, stop_on_sigterm

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file (configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mrrm_jax_run", "run directory: checkpoints, metrics, demo data")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and grain log every save at INFO
    logging.getLogger("mrrm_jax").setLevel(logging.INFO)
    # transformers prints "PyTorch was not found" in every process that imports it; this one already
    # has (we use only its tokenizer classes), and the data workers started later inherit this.
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    cfg = _CONFIG.value
    if process_flags.given() and not cfg.distributed:
        raise app.UsageError(f"{', '.join(process_flags.given())} need --config.distributed=True")
    stop = stop_on_sigterm()
    try:
        spec = run_spec.parse(cfg)  # before JAX starts: a config error is the only output
        if cfg.distributed:
            process_flags.initialize()
        results = trainer.train(spec, _WORKDIR.value, stop)
    except (run_spec.ConfigError, trainer.RunError, UnusableCheckpoints, PipelineError) as error:
        sys.exit(f"error: {error}")
    for name, result in results.items():
        shown = "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
        print(f"final {name}: {shown}", flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
