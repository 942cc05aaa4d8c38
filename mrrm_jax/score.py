"""Scoring JSONL files with a multi-response reward model (`mrrm_jax.reward_model.RewardModel`).

    python -m mrrm_jax.score --checkpoint=DIR --input=in.jsonl --output=out.jsonl [--mode=single]

Records follow the paper's schema (`prompt`, `responses`, optional `image` path or list, `video`
path; paths relative to the input file). Each output line is `{"index", "id"?, "scores"}` or, for a
record that cannot be scored, `{"index", "id"?, "error"}`; the other records are still scored.
`--mode=single` is the conventional baseline: every response in its own pass (same head, same
read-position rule), for comparison.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import time

import numpy as np
from absl import app, flags

from mrrm_jax.data import preprocess, records
from mrrm_jax.reward_model import RewardModel


def score_file(model: RewardModel, input_path: pathlib.Path, output_path: pathlib.Path, batch_size: int = 8,
               mode: str = "multi") -> tuple[int, int]:
    """Scores every record of a JSONL file; returns (scored, failed)."""
    lines = input_path.read_text().splitlines()
    media_files = records.MediaDir(input_path.parent)
    keep_frames = functools.partial(preprocess.sample_frame_indices,
                                    options=preprocess.VisionOptions.from_processor(model.processor))
    scored = failed = 0
    start = time.time()
    with open(output_path, "w") as out:
        pending: list[tuple[dict, list[dict]]] = []

        def flush():
            nonlocal scored
            flat = [e for _, examples in pending for e in examples]
            results = iter(model.score_examples(flat, rows=batch_size)) if flat else iter(())
            for entry, examples in pending:
                parts = [next(results) for _ in examples]
                out.write(json.dumps({**entry, "scores": np.concatenate(parts).tolist()}) + "\n")
                scored += 1
            pending.clear()

        for index, line in enumerate(lines):
            if not line.strip():
                continue
            entry = {"index": index}
            try:
                record = json.loads(line)
                if "id" in record:
                    entry["id"] = record["id"]
                if not isinstance(record.get("responses"), list):
                    raise ValueError("field 'responses' must be a list of strings")
                loaded = records.load_media(record, f"{input_path.name}:{index + 1}", media_files, keep_frames)
                groups = [record["responses"]] if mode == "multi" else [[r] for r in record["responses"]]
                examples = [model.example(record.get("prompt", ""), g, **loaded) for g in groups]
            except Exception as error:  # a bad record must not stop the file: report it in its line
                flush()
                out.write(json.dumps({**entry, "error": f"{type(error).__name__}: {error}"}) + "\n")
                failed += 1
                continue
            pending.append((entry, examples))
            if sum(len(e) for _, e in pending) >= batch_size:
                flush()
                print(f"\r{scored + failed}/{len(lines)} records, {time.time() - start:.1f}s", end="", file=sys.stderr)
        flush()
    print(f"\rscored {scored}, failed {failed} of {len(lines)} records in {time.time() - start:.1f}s", file=sys.stderr)
    return scored, failed


_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Reward-model directory (imported or trained).")
_INPUT = flags.DEFINE_string("input", None, "Input JSONL, paper schema.")
_OUTPUT = flags.DEFINE_string("output", None, "Output JSONL: one line per input record.")
_MODE = flags.DEFINE_enum("mode", "multi", ["multi", "single"], "multi: N responses in one pass; single: one each.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per forward pass.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute and parameter dtype.")


def main(argv):
    del argv
    model = RewardModel.load(_CHECKPOINT.value, dtype=_DTYPE.value)
    score_file(model, pathlib.Path(_INPUT.value), pathlib.Path(_OUTPUT.value), _BATCH.value, _MODE.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint", "input", "output"])
    app.run(main)
