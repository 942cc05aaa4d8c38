"""Evaluating a reward model on a benchmark: the logic behind `python -m mrrm_jax.evaluate`.

Writes OUT_DIR/scores.jsonl (one line per record: its scores in the file's response order, the order
the model saw them in, `correct`, or `error`), report.json, report.md and PNG plots (`report`).
Running again with the same OUT_DIR resumes: records already scored are kept, failed ones are tried
again. Under `jax.distributed` every process scores its share of the records into a part file beside
scores.jsonl and process 0 joins them and writes the report (`scoring.shards`); a killed run's parts
are resumed by any number of processes.

Order: a single-pass model sees the responses' order, and these releases list the preferred answer
first. `shuffle` (default) presents each record in a permutation seeded by (seed, record index);
`as_is` keeps the file's order; `rotations` scores every cyclic rotation (N passes per record) of
the responses sorted by text and judges the mean score of each response over them (the position-bias
diagnostic): every response is seen once at every position, and since the rotations start from a
canonical order, the set of sequences and the averaged scores do not depend on the file's order.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import time

import numpy as np

from mrrm_jax.benchmarks import formats, metrics, report
from mrrm_jax.data import records
from mrrm_jax.data.examples import Skip
from mrrm_jax.scoring import shards
from mrrm_jax.scoring.reward_model import prefetch

SCORES_FILE, RUN_FILE = "scores.jsonl", "run.json"
# What a record can fail with while its media are read and it is formatted: a bad record, not a bug.
RECORD_ERRORS = (Skip, ValueError, TypeError, OSError)


class EvaluationError(Exception):
    """The run cannot start: one `error:` line from the command line."""


def presentation_orders(responses: list[str], order: str, seed: int, index: int) -> list[np.ndarray]:
    """Each pass's order: position i of the sequence shows response `order[i]` of the file."""
    if order == "as_is":
        return [np.arange(len(responses))]
    if order == "shuffle":
        return [np.random.default_rng([seed, index]).permutation(len(responses))]
    canonical = np.asarray(sorted(range(len(responses)), key=lambda i: responses[i]))
    return [np.roll(canonical, -shift) for shift in range(len(responses))]


def prepare(record: formats.EvalRecord | formats.RecordError, model, order: str, seed: int, mode: str, keep_frames):
    """(record, orders, model examples) with the media decoded and formatted; or a `RecordError` (a
    converter's passes through). Runs in worker threads, ahead of the model."""
    if isinstance(record, formats.RecordError):
        return record
    try:
        pick = functools.partial(formats.official_frame_files, count=record.video_files) if record.video_files else None
        loaded = records.load_media(record.media, record.id, record.files, keep_frames, pick)
        orders = presentation_orders(record.responses, order, seed, record.index)
        cache: dict = {}  # the media are preprocessed once for all orders and passes of this record
        examples = [example for presented in orders for example in model.examples(
            record.prompt, [record.responses[i] for i in presented], mode, media_cache=cache, **loaded)]
        return record, orders, examples
    except RECORD_ERRORS as error:
        reason = error.reason if isinstance(error, Skip) else type(error).__name__
        return formats.RecordError(record.index, record.id, f"{reason}: {error}")


def result_line(record: formats.EvalRecord, orders: list[np.ndarray], presented_scores: list[np.ndarray]) -> dict:
    """A scores.jsonl line: scores back in the file's response order, judged by `metrics.top_correct`."""
    line = {"index": record.index, "id": record.id, "category": record.category, "rankings": record.rankings}
    if record.group is not None:
        line["group"] = record.group
    per_pass = []
    for presented, scores_n in zip(orders, presented_scores):
        in_file_order = np.empty(len(presented))
        in_file_order[presented] = scores_n
        per_pass.append(in_file_order)
    scores_pn = np.stack(per_pass)
    try:
        correct = metrics.top_correct(scores_pn.mean(0), record.rankings)
        for scores_n in scores_pn:  # each rotation's own scores must be finite too
            metrics.top_correct(scores_n, record.rankings)
    except ValueError as error:
        return {**line, "error": f"{error}"}
    if len(orders) > 1:
        line.update(order="rotations", rotation_scores=scores_pn.tolist())
    else:
        line["order"] = orders[0].tolist()
    return {**line, "scores": scores_pn.mean(0).tolist(), "correct": correct}


def _error_line(error: formats.RecordError) -> dict:
    return {"index": error.index, "id": error.id, "error": error.error}


def scored_line(prepared: tuple, per_example: list[np.ndarray], mode: str) -> dict:
    """The scores.jsonl line of a prepared record (`prepare`) from its examples' scores."""
    record, orders, _ = prepared
    # single mode has one order (rotations need multi): its N one-response passes in a row
    presented = per_example if mode == "multi" else [np.concatenate(per_example)]
    return result_line(record, orders, presented)


def _write(out, lines: list[dict], progress: report.Progress) -> None:
    out.write("".join(json.dumps(line) + "\n" for line in lines))
    out.flush()  # a killed run keeps every finished line
    progress.update(len(lines))


def read_done(path: pathlib.Path) -> list[dict]:
    """The scored lines of an earlier run (a line cut short and error lines are left out, so those
    records are scored again)."""
    return shards.complete_lines(path, lambda line: "scores" in line) if path.exists() else []


def check_run(out_dir: pathlib.Path, settings: dict, share: shards.Share) -> None:
    """An OUT_DIR resumes only the run it holds: other settings would mix two evaluations."""
    run_file = out_dir / RUN_FILE
    if run_file.exists():
        earlier = json.loads(run_file.read_text())
        differ = {k: (earlier.get(k), v) for k, v in settings.items() if earlier.get(k) != v}
        if differ:
            shown = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
            raise EvaluationError(f"{out_dir} holds an evaluation with other settings ({shown}); "
                                  "use another --output or delete it")
    out_dir.mkdir(parents=True, exist_ok=True)
    if share.leader:
        run_file.write_text(json.dumps(settings, indent=1) + "\n")


def evaluate(model, benchmark: str, data: str, out_dir: str, media_root: str | None = None, order: str = "shuffle",
             seed: int = 0, mode: str = "multi", limit: int | None = None,
             field_map: str | None = None, checkpoint: str = "", workers: int | None = None) -> dict:
    """Scores a benchmark file into `out_dir` (resuming what is there) and returns the report. `model`: a
    `RewardModel`, or a function returning one, called once the benchmark file has been read (an
    unusable file fails before the model loads)."""
    if order == "rotations" and mode == "single":
        raise EvaluationError("--order=rotations needs --mode=multi (one pass per response sees no order)")
    spec, items = formats.read(benchmark, pathlib.Path(data), media_root, field_map)
    model = model() if callable(model) else model
    settings = {"benchmark": benchmark, "data": str(pathlib.Path(data).resolve()), "checkpoint": checkpoint,
                "order": order, "seed": seed, "mode": mode, "limit": limit}
    return run(model, spec, items[:limit] if limit else items, pathlib.Path(out_dir), settings, workers)


def run(model, spec: formats.Benchmark, items: list, out_dir: pathlib.Path, settings: dict,
        workers: int | None = None, share: shards.Share | None = None) -> dict | None:
    """Scores converted records (`formats.read`) into `out_dir`, resuming what is there; returns the report
    (None in processes other than 0, which write their share only)."""
    order, seed, mode = settings["order"], settings["seed"], settings["mode"]
    share = share or shards.Share.of_this_process()
    check_run(out_dir, settings, share)
    scores_path, scored = out_dir / SCORES_FILE, lambda line: "scores" in line
    done = read_done(scores_path)
    done_indices = {line["index"] for line in done} | shards.done_indices(scores_path, scored)
    mine = [item for item in items if share.holds(item.index)]
    todo = [item for item in mine if item.index not in done_indices]

    keep = model.processor.frame_indices
    prepared = functools.partial(prepare, model=model, order=order, seed=seed, mode=mode, keep_frames=keep)
    start, progress = time.time(), report.Progress(len(mine), len(mine) - len(todo))
    examples_of = lambda result: [] if isinstance(result, formats.RecordError) else result[2]
    with shards.open_part(scores_path, share, scored) as out:
        results = prefetch(prepared, todo, workers or min(4, os.cpu_count() or 1), ahead=32)
        for run in model.score_runs(results, examples_of):
            _write(out, [_error_line(result) if isinstance(result, formats.RecordError) else
                         scored_line(result, scores, mode) for result, scores in run], progress)
    progress.close()
    shards.wait_for_all("evaluate")
    if not share.leader:
        return None
    elapsed = time.time() - start
    lines = shards.join(scores_path, earlier=done)
    scored_now = sum("scores" in line for line in lines) - len(done)
    timing = {"seconds": round(elapsed, 3), "records_scored_in_this_run": scored_now,
              "records_per_s": round(scored_now / elapsed, 3) if elapsed else None,
              "compiled_programs": len(model.programs), "devices": model.mesh.size * share.count,
              "processes": share.count}
    result = report.build(lines, spec, settings["benchmark"], settings, timing)
    report.write(result, lines, out_dir)
    return result
