"""Convert one of the paper's training sources, as released, into the paper's record schema.

    python -m mrrm_jax.prepare --dataset=NAME --input=PATH --out=DIR [--media_root=DIR] [--seed=0] \\
        [--decontaminate=BENCH_FILE[,BENCH_FILE...]] [--workers=N] [--limit=N] [--option=KEY=VALUE ...] \\
        [--runner=local|direct|dataflow|flink|spark|prism|portable] [--beam_option=--KEY=VALUE ...]

Writes DIR/records.jsonl, DIR/media/ and DIR/prepare_report.json, and one summary line on stderr;
rerun into the same DIR to resume. The logic lives in `mrrm_jax.sources` (docs/data.md).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from absl import logging as absl_logging

from mrrm_jax.sources import conversion, releases

_DATASET = flags.DEFINE_string("dataset", None, f"One of: {', '.join(releases.SOURCES)}.")
_INPUT = flags.DEFINE_string("input", None, "The release: its folder, or one of its files.")
_OUT = flags.DEFINE_string("out", None, "Output folder (new, or one this command wrote: it resumes).")
_MEDIA_ROOT = flags.DEFINE_string("media_root", None, "Where the release's media files are (MM-RLHF's unzipped "
                                  "tree, COCO train2014 for POVID); default: the input's folder.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the response permutation.")
_DECONTAMINATE = flags.DEFINE_list("decontaminate", [], "Benchmark files ([NAME:]PATH) whose items are dropped.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Worker processes converting rows.")
_LIMIT = flags.DEFINE_integer("limit", None, "Convert only the first N rows.")
_RUNNER = flags.DEFINE_string("runner", "local", "local: worker processes on this machine; direct, dataflow, flink, "
                              "spark, prism, portable: an Apache Beam pipeline on that runner (pip install "
                              "'mrrm_jax[beam]').")
_BEAM_OPTION = flags.DEFINE_multi_string("beam_option", [], "A Beam pipeline option, e.g. "
                                         "--beam_option=--direct_num_workers=4 or --beam_option=--project=P.")
_OPTION = flags.DEFINE_multi_string("option", [], "KEY=VALUE of the source (pku_saferlhf: label=safer|better|agree; "
                                    "mm_rlhf: sampling_interval=SECONDS).")


def main(argv) -> None:
    absl_logging.set_verbosity(absl_logging.ERROR)  # skips are in the report, not one log line each
    try:
        if len(argv) > 1:
            raise conversion.PrepareError(f"unexpected arguments: {argv[1:]}")
        for name, flag in (("dataset", _DATASET), ("input", _INPUT), ("out", _OUT)):
            if not flag.value:
                raise conversion.PrepareError(f"--{name} is required")
        run = conversion.settings(_DATASET.value, _INPUT.value, _OUT.value, _MEDIA_ROOT.value, _SEED.value,
                                  _OPTION.value, _DECONTAMINATE.value, _LIMIT.value)
        report = _prepare(run)
    except conversion.PrepareError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(conversion.summary(report), file=sys.stderr)
    print(json.dumps({k: report[k] for k in ("records_read", "records_written")}))


def _prepare(run: conversion.Settings) -> dict:
    if _RUNNER.value == "local":
        return conversion.prepare(run, _WORKERS.value)
    if _WORKERS.value != 1:
        raise conversion.PrepareError("--workers is the local runner's; a Beam runner takes its own, e.g. "
                                      "--beam_option=--direct_num_workers=N")
    try:
        from mrrm_jax.sources import beam_runner  # here: Beam is an optional extra
    except ImportError as error:
        raise conversion.PrepareError(f"--runner={_RUNNER.value} needs Apache Beam: pip install "
                                      f"'mrrm_jax[beam]' ({error})") from error
    return beam_runner.prepare(run, _RUNNER.value, _BEAM_OPTION.value)


if __name__ == "__main__":
    app.run(main)
