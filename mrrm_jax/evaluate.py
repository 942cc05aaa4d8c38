"""Evaluate a reward model on a benchmark in its official release format.

    python -m mrrm_jax.evaluate --checkpoint=DIR --benchmark=NAME --data=PATH [--media_root=DIR] \\
        --output=OUT_DIR [--order=as_is|shuffle|rotations] [--seed=0] [--mode=multi|single] [--batch_size=4] \\
        [--row_tokens=4096] [--row_crops=32] [--dtype=...] [--attention=...] [--limit=N] [--field_map=prompt:KEY,...] \\
        [--distributed [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]]

The logic lives in `mrrm_jax.benchmarks.runner`; this is the command line around it. With
`--distributed`, every process scores its share of the records and process 0 writes the report.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags
from absl import logging as absl_logging

from mrrm_jax import model_flags
from mrrm_jax.benchmarks import formats, report, runner

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Reward-model directory (trained here or imported).")
_BENCHMARK = flags.DEFINE_string("benchmark", None, f"One of: {', '.join(formats.BENCHMARKS)}.")
_DATA = flags.DEFINE_string("data", None, "The benchmark file in its release format.")
_MEDIA_ROOT = flags.DEFINE_string("media_root", None, "Where media paths resolve (default: the data file's folder).")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory: scores.jsonl, report.json, report.md, plots.")
_ORDER = flags.DEFINE_enum("order", "shuffle", ["as_is", "shuffle", "rotations"], "Response order shown to the model.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the shuffle.")
_MODE = flags.DEFINE_enum("mode", "multi", ["multi", "single"], "multi: N responses in one pass; single: one each.")
_LIMIT = flags.DEFINE_integer("limit", None, "Score only the first N records.")
_FIELD_MAP = flags.DEFINE_string("field_map", None, "videorewardbench: FIELD:KEY,... for prompt, chosen, rejected, "
                                 "video, category.")


def main(argv) -> None:
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every restore at INFO
    try:
        if len(argv) > 1:
            raise runner.EvaluationError(f"unexpected arguments: {argv[1:]}")
        for name, flag in (("checkpoint", _CHECKPOINT), ("benchmark", _BENCHMARK), ("data", _DATA),
                           ("output", _OUTPUT)):
            if not flag.value:
                raise runner.EvaluationError(f"--{name} is required")
        if not pathlib.Path(_CHECKPOINT.value).is_dir():
            raise runner.EvaluationError(f"--checkpoint {_CHECKPOINT.value} is not a directory")
        try:
            model_flags.start_processes()
        except ValueError as error:
            raise runner.EvaluationError(str(error)) from error

        def load_model():
            try:
                return model_flags.load_reward_model(_CHECKPOINT.value)
            except (OSError, ValueError, KeyError) as error:
                raise runner.EvaluationError(
                    f"--checkpoint {_CHECKPOINT.value} is not a reward-model directory: {error}") from error

        result = runner.evaluate(load_model, _BENCHMARK.value, _DATA.value, _OUTPUT.value, _MEDIA_ROOT.value,
                                 _ORDER.value, _SEED.value, _MODE.value, _LIMIT.value, _FIELD_MAP.value,
                                 checkpoint=str(pathlib.Path(_CHECKPOINT.value).resolve()))
    except (runner.EvaluationError, formats.BenchmarkError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if result is None:  # another process's share: process 0 writes the report
        return
    print(report.summary(result))
    if result["num_scored"] == 0:
        print(f"error: no record could be scored ({result['num_errors']} errors; see "
              f"{_OUTPUT.value}/{runner.SCORES_FILE})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
