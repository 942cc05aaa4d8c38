"""The conversion as an Apache Beam pipeline, for releases beyond one machine (`--runner=direct|dataflow|...`).

    release files -> read each file (one element per file) -> reshuffle rows -> convert_row (the local
    runner's per-row function) -> group by file, sort by row -> DIR/beam_shards/NNNNN.{records,skipped}.jsonl
    + NNNNN.report.json -> (driver) concatenated in file order into DIR/records.jsonl, skipped.jsonl,
    prepare_report.json

The records are byte for byte the local runner's: a row's permutation depends on its position only, a
file's outcomes are written in row order, the files are joined in the release's order, and the report
keeps the first example ids per reason as the local runner does. Workers write media straight into
DIR/media/ (idempotent, whole files only), so DIR must be a file system every worker mounts at the same
path (NFS, Filestore, a GCS FUSE mount). Resume is per file: a rerun converts only the files without a
shard report. Beam lives in the optional `beam` extra: this module is imported only for a Beam runner.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from mrrm_jax.sources import conversion, releases
from mrrm_jax.sources.conversion import RECORDS_FILE, SKIPS_FILE, PrepareError, Report, Settings

RUNNERS = {"direct": "DirectRunner", "dataflow": "DataflowRunner", "flink": "FlinkRunner", "spark": "SparkRunner",
           "prism": "PrismRunner", "portable": "PortableRunner"}
SHARDS_DIR = "beam_shards"


def _shard_file(out: pathlib.Path, shard: int, kind: str) -> pathlib.Path:
    return out / SHARDS_DIR / f"{shard:05d}.{kind}"


def _read_shard(item: tuple[int, str], dataset: str):
    shard, path = item
    for row_number, (position, row) in enumerate(releases.SOURCES[dataset].read(pathlib.Path(path))):
        yield shard, (row_number, position, row)


class _Convert(beam.DoFn):
    """`conversion.convert_row` on a worker, set up once per worker as the local runner's processes are."""

    def __init__(self, run: Settings, index):
        self._run, self._index = run, index

    def setup(self):
        conversion.start_worker(self._run, self._index)

    def process(self, element):
        shard, (row_number, position, row) = element
        yield shard, (row_number, conversion.convert_row(position, row))


def _write_shard(element, run: Settings, index_info: dict) -> None:
    """One file's outcomes in row order; the shard report goes last and marks the file done."""
    shard, numbered = element
    report, lines = Report(), {RECORDS_FILE: [], SKIPS_FILE: []}
    for _, outcome in sorted(numbered, key=lambda pair: pair[0]):
        report.add(outcome)
        name, line = conversion.outcome_line(outcome)
        lines[name].append(line.decode())
    for name, kind in ((RECORDS_FILE, "records.jsonl"), (SKIPS_FILE, "skipped.jsonl")):
        conversion.write_whole(_shard_file(run.out, shard, kind), "".join(lines[name]))
    conversion.write_whole(_shard_file(run.out, shard, "report.json"), json.dumps(report.as_dict(run, index_info)))


def prepare(run: Settings, runner: str, beam_options: list[str]) -> dict:
    """Converts (or resumes converting) the release with a Beam runner; returns the local runner's report."""
    if runner not in RUNNERS:
        raise PrepareError(f"unknown --runner {runner!r}; one of local, {', '.join(RUNNERS)}")
    if run.limit is not None:
        raise PrepareError("--limit reads the first rows in order: use it with --runner=local")
    state = conversion.open_state(run, "beam")
    if state is not None and state["complete"]:
        return state["report"]
    started = time.perf_counter()
    index, index_info = conversion.decontamination_index(run)
    try:
        shards = [str(path) for path in releases.SOURCES[run.dataset].shards(run.input)]
    except OSError as error:
        raise PrepareError(f"--input {run.input}: {error}") from error
    (run.out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    conversion.write_state(run, "beam", False, shards=shards)
    todo = [(shard, path) for shard, path in enumerate(shards)
            if not _shard_file(run.out, shard, "report.json").exists()]
    # Beam's workers log every bundle at INFO; the run's progress is the report, as with the local runner
    quiet = [] if any(o.startswith("--default_sdk_harness_log_level") for o in beam_options) else [
        "--default_sdk_harness_log_level=WARNING"]
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    options = PipelineOptions(quiet + beam_options, runner=RUNNERS[runner])
    try:
        with beam.Pipeline(options=options) as pipeline:
            _ = (pipeline | "Files" >> beam.Create(todo)
                 | "Read" >> beam.FlatMap(_read_shard, run.dataset)
                 | "Spread" >> beam.Reshuffle()
                 | "Convert" >> beam.ParDo(_Convert(run, index))
                 | "ByFile" >> beam.GroupByKey()
                 | "Write" >> beam.Map(_write_shard, run, index_info))
    except Exception as error:  # a worker's error comes back wrapped by the runner: one line names it
        raise PrepareError(f"--runner={runner}: {type(error).__name__}: {str(error).splitlines()[0]}") from error
    return _merge(run, shards, index_info, started)


def _merge(run: Settings, shards: list[str], index_info: dict, started: float) -> dict:
    """Joins the files' outputs in release order; a file without rows has no group and gets none."""
    report = Report()
    for name, kind in ((RECORDS_FILE, "records.jsonl"), (SKIPS_FILE, "skipped.jsonl")):
        temporary = run.out / f".{name}.tmp"
        with temporary.open("wb") as joined:
            for shard in range(len(shards)):
                part = _shard_file(run.out, shard, kind)
                if part.exists():
                    with part.open("rb") as lines:
                        shutil.copyfileobj(lines, joined)
        temporary.replace(run.out / name)
    for shard in range(len(shards)):
        part = _shard_file(run.out, shard, "report.json")
        if part.exists():
            report.merge(Report(json.loads(part.read_text())))
    result = conversion.write_report(run, report, index_info, started)
    conversion.write_state(run, "beam", True, report=report.as_dict(run, index_info))
    shutil.rmtree(run.out / SHARDS_DIR)
    return result
