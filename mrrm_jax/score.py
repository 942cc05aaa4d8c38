"""Score a JSONL file of records with a multi-response reward model.

    python -m mrrm_jax.score --checkpoint=DIR --input=in.jsonl --output=out.jsonl [--mode=single] \\
        [--batch_size=4] [--row_tokens=4096] [--row_crops=32] [--dtype=...] [--attention=...] \\
        [--distributed [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]]

The logic lives in `mrrm_jax.scoring.reward_model` (`RewardModel`, `score_file`); this is the command line
around it. `--mode=single` is the conventional baseline: every response in its own pass (same head,
same read-position rule), for comparison. With `--distributed`, every process scores its share of the
records and process 0 writes the output (`mrrm_jax.scoring.shards`); a killed run resumes from the part
files beside the output.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags

from mrrm_jax import model_flags
from mrrm_jax.scoring.reward_model import score_file

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Reward-model directory (imported or trained).")
_INPUT = flags.DEFINE_string("input", None, "Input JSONL, paper schema.")
_OUTPUT = flags.DEFINE_string("output", None, "Output JSONL: one line per input record.")
_MODE = flags.DEFINE_enum("mode", "multi", ["multi", "single"], "multi: N responses in one pass; single: one each.")


def main(argv):
    del argv
    try:
        model_flags.start_processes()
    except ValueError as error:
        sys.exit(f"error: {error}")
    try:
        model = model_flags.load_reward_model(_CHECKPOINT.value)
    except (OSError, ValueError, KeyError) as error:
        sys.exit(f"error: --checkpoint {_CHECKPOINT.value}: {error}")
    if not pathlib.Path(_INPUT.value).is_file():
        sys.exit(f"error: --input {_INPUT.value} is not a file")
    score_file(model, pathlib.Path(_INPUT.value), pathlib.Path(_OUTPUT.value), _MODE.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint", "input", "output"])
    app.run(main)
