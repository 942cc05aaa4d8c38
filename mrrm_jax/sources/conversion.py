"""One conversion run: a release -> DIR/records.jsonl, DIR/media/, DIR/skipped.jsonl, DIR/prepare_report.json.

    reader (main process, streaming) -> chunks of rows -> workers: convert, check media, decontaminate,
    finish (empty answers out, ties, permutation), write media -> main: append records in input order

Rules applied to every source alike (docs/data.md):
- empty responses are dropped with their ranks (the authors' loader does the same);
- a 2-response tie is dropped and counted (its label would be a coin flip under the N-way loss); an
  N-way tie below first place is kept, and a record whose responses are all tied is dropped;
- responses are permuted by `default_rng([seed, source, position])`, the position being the row's file
  and row within it (the authors' loader never shuffles, and pairwise releases put the chosen answer
  first); the record keeps the permutation: `responses[i] = release_responses[permutation[i]]`. A row's
  order depends on nothing but its own place in the release, so any runner gives the same records.
Embedded images are written once per content (media/<source>/<sha256 prefix>.<ext>), files of a
release's media tree are hard-linked (copied across file systems) under media/<source>/ with their
tree path, so a prepared directory stands alone.

The local runner is below; `beam_runner.py` runs the same per-row function in an Apache Beam pipeline.

Resume: after every chunk the output files are flushed and `prepare_state.json` records the rows read,
the output files' lengths and the report so far. A run into the same --out with the same arguments
continues from there (the records file cut back to that length); other arguments are refused; a
finished directory is left as it is.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import pathlib
import time
import zipfile
from collections.abc import Iterator

import numpy as np
from PIL import Image

from mrrm_jax.data.examples import Skip
from mrrm_jax.sources import decontamination, releases

log = logging.getLogger(__name__)

RECORDS_FILE, SKIPS_FILE, REPORT_FILE, STATE_FILE = "records.jsonl", "skipped.jsonl", "prepare_report.json", "prepare_state.json"
MEDIA_DIR = "media"
CHUNK_ROWS = 64  # rows per task: large enough to amortise the hand-over, small enough to resume close
IN_FLIGHT_PER_WORKER = 2  # chunks queued per worker: the reader never runs ahead of the workers by more
EXAMPLE_IDS = 5  # record ids kept per skip reason in the report
FRAME_SUFFIXES = (".jpeg", ".jpg", ".png")  # a frame folder's files, in the authors' loader's order


class PrepareError(Exception):
    """The run cannot start or go on (an unreadable release, a wrong --out): one `error:` line."""


@dataclasses.dataclass(frozen=True)
class Settings:
    dataset: str
    input: pathlib.Path
    out: pathlib.Path
    media_root: pathlib.Path
    seed: int = 0
    options: tuple = ()  # sorted (key, value) pairs, defaults filled in
    decontaminate: tuple = ()
    limit: int | None = None

    def fingerprint(self) -> dict:
        """What a resumed run must share with the one that started (the worker count may differ)."""
        return {"dataset": self.dataset, "input": str(self.input.resolve()), "media_root": str(self.media_root.resolve()),
                "seed": self.seed, "options": dict(self.options), "decontaminate": list(self.decontaminate),
                "limit": self.limit}


def settings(dataset: str, input_: str, out: str, media_root: str | None = None, seed: int = 0,
             options: list[str] = (), decontaminate: list[str] = (), limit: int | None = None) -> Settings:
    """The run's settings from the command line's values, checked: a wrong name is a `PrepareError`."""
    if dataset not in releases.SOURCES:
        raise PrepareError(f"unknown --dataset {dataset!r}; one of {', '.join(releases.SOURCES)}")
    source = releases.SOURCES[dataset]
    path = pathlib.Path(input_)
    if not path.exists():
        raise PrepareError(f"--input {input_} does not exist")
    chosen = {key: default for key, (default, _) in source.options.items()}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in source.options:
            raise PrepareError(f"--option {option!r}: {dataset} takes "
                               f"{', '.join(f'{k}=VALUE' for k in source.options) or 'no options'}")
        allowed = source.options[key][1]
        if allowed is not None and value not in allowed:
            raise PrepareError(f"--option {key}={value}: expected one of {', '.join(allowed)}")
        chosen[key] = value
    root = pathlib.Path(media_root) if media_root else path if path.is_dir() else path.parent
    return Settings(dataset, path, pathlib.Path(out), root, seed, tuple(sorted(chosen.items())),
                    tuple(decontaminate), limit)


# -- the worker side ---------------------------------------------------------------------------------

class _Worker:
    """Per-process state, set once by `_start_worker`: the source, its context, the index, --out."""
    source: releases.Source
    context: releases.Context
    settings: Settings
    index: decontamination.Index | None


def start_worker(run: Settings, index: decontamination.Index | None) -> None:
    _Worker.source, _Worker.settings, _Worker.index = releases.SOURCES[run.dataset], run, index
    _Worker.context = releases.Context(run.media_root, dict(run.options))


def _convert_chunk(chunk: list[tuple[int, str, object]]) -> list[dict]:
    return [convert_row(position, row) for _, position, row in chunk]


def convert_row(position: str, row) -> dict:
    """One row's outcome: {"record", "media_bytes", "media_files", "events"} or {"skip", "id", "detail"},
    with "contaminated": [(benchmark, item id)] for a decontamination hit."""
    run = _Worker.settings
    record_id = f"{run.dataset}/{position}"  # until the converter has found the row's own id
    try:
        if not isinstance(row, dict):
            raise Skip("bad_json", f"{position}: not a JSON object")
        candidate = _Worker.source.convert(position, row, _Worker.context)
        record_id = f"{run.dataset}/{candidate.id}"
        where = f"{position} ({record_id})"
        image = _checked_image(candidate.image, where) if candidate.image is not None else None
        if image is not None and _Worker.index is not None:
            hits = _Worker.index.matches(image[0], image[1], candidate.prompt)
            if hits:
                return {"skip": "contaminated", "id": record_id, "contaminated": [(h.benchmark, h.id) for h in hits],
                        "detail": f"{position}: image and prompt match {hits[0].benchmark} item {hits[0].id}"}
        record = _finished(candidate, record_id, np.random.default_rng([run.seed, _stream(run.dataset), _stream(position)]), where)
        written = {}
        if image is not None:
            written["image"] = _write_image(candidate, *image)
        if candidate.video is not None:
            written["video"] = _write_video(candidate, where)
        record.update({kind: name for kind, (name, _, _) in written.items()}, **candidate.extra)
        tied = len(set(record["rankings"])) < len(record["rankings"])
        return {"record": record, "media_bytes": sum(w[1] for w in written.values()),
                "media_files": sum(w[2] for w in written.values()),
                "events": candidate.events + ["nway_tie_kept"] * tied}
    except Skip as error:
        return {"skip": error.reason, "id": record_id, "detail": str(error)}
    except Exception as error:  # one record never ends a run: a bug in a converter is counted, with its row
        log.exception("unexpected error on %s", position)
        return {"skip": "unexpected_error", "id": record_id,
                "detail": f"{position}: {type(error).__name__}: {error}"}


def _stream(name: str) -> int:
    """A name as a 32-bit word of the permutation generator's seed."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def _finished(candidate, record_id: str, rng: np.random.Generator, where: str) -> dict:
    kept = [(r, k) for r, k in zip(candidate.responses, candidate.rankings) if isinstance(r, str) and r.strip()]
    if len(candidate.responses) != len(candidate.rankings):
        raise Skip("bad_rankings", f"{where}: {len(candidate.rankings)} ranks for {len(candidate.responses)} responses")
    if len(kept) < 2:
        raise Skip("too_few_responses", f"{where}: {len(kept)} non-empty responses, 2 needed")
    ranks = [k for _, k in kept]
    if len(set(ranks)) == 1:
        raise Skip("pairwise_tie" if len(kept) == 2 else "all_tied",
                   f"{where}: the {len(kept)} responses are tied ({ranks}): no preference to learn")
    if not candidate.prompt.strip():
        raise Skip("missing_field", f"{where}: the prompt is empty")
    permutation = rng.permutation(len(kept)).tolist()
    return {"id": record_id, "source": record_id.split("/", 1)[0], "prompt": candidate.prompt,
            "responses": [kept[i][0] for i in permutation], "rankings": [kept[i][1] for i in permutation],
            "permutation": permutation, "seed": _Worker.settings.seed}


def _checked_image(image: bytes | pathlib.Path, where: str) -> tuple[bytes, Image.Image]:
    """The image's bytes and decoded picture; one that does not decode is a `bad_image` skip."""
    raw = image if isinstance(image, bytes) else image.read_bytes()
    try:
        decoded = Image.open(io.BytesIO(raw))
        decoded.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        why = "no image format PIL reads" if isinstance(error, Image.UnidentifiedImageError) else str(error)
        raise Skip("bad_image", f"{where}: field 'image' cannot be decoded ({why})") from error
    return raw, decoded


def _write_image(candidate, raw: bytes, decoded: Image.Image) -> tuple[str, int, int]:
    """(name relative to --out, bytes written, files written) of the candidate's image."""
    run = _Worker.settings
    if isinstance(candidate.image, bytes):
        name = f"{hashlib.sha256(raw).hexdigest()[:20]}.{(decoded.format or 'png').lower().replace('jpeg', 'jpg')}"
        return _place(run.out, f"{MEDIA_DIR}/{run.dataset}/{name}", raw=raw)
    return _place(run.out, f"{MEDIA_DIR}/{run.dataset}/{candidate.media_name or candidate.image.name}",
                  source=candidate.image)


def _write_video(candidate, where: str) -> tuple[str, int, int]:
    run = _Worker.settings
    name = f"{MEDIA_DIR}/{run.dataset}/{(candidate.media_name or candidate.video.name).strip('/')}"
    if candidate.video.is_file():
        return _place(run.out, name, source=candidate.video)
    frames = [f for suffix in FRAME_SUFFIXES for f in sorted(candidate.video.iterdir()) if f.suffix.lower() == suffix]
    if not frames:
        raise Skip("no_frames", f"{where}: field 'video' names a folder without {'/'.join(FRAME_SUFFIXES)} frames")
    placed = [_place(run.out, f"{name}/{frame.name}", source=frame) for frame in frames]
    return name, sum(p[1] for p in placed), sum(p[2] for p in placed)


def _place(out: pathlib.Path, name: str, raw: bytes | None = None, source: pathlib.Path | None = None):
    """Puts a media file at out/name unless it is there (another record, an earlier run): written whole
    under a temporary name and linked in, so a reader or a killed run never sees half a file."""
    target = out / name
    if target.exists():
        return name, 0, 0
    target.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        try:
            os.link(source, target)
            return name, target.stat().st_size, 1
        except FileExistsError:
            return name, 0, 0
        except OSError:  # another file system: copy
            raw = source.read_bytes()
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_bytes(raw)
    try:
        os.link(temporary, target)
        return name, len(raw), 1
    except FileExistsError:
        return name, 0, 0
    finally:
        temporary.unlink()


# -- the main side -------------------------------------------------------------------------------------

class Report:
    """Counts of one run; saved with the state so a resumed run's report covers the whole input."""

    def __init__(self, saved: dict | None = None):
        saved = saved or {}
        self.read, self.written = saved.get("records_read", 0), saved.get("records_written", 0)
        self.skipped = {k: dict(v) for k, v in saved.get("skipped", {}).items()}
        self.responses = collections.Counter(saved.get("responses_per_record", {}))
        self.events = collections.Counter(saved.get("events", {}))
        self.media_bytes, self.media_files = saved.get("media_bytes_written", 0), saved.get("media_files_written", 0)
        self.hits = {k: dict(v) for k, v in saved.get("decontamination", {}).get("hits", {}).items()}

    def add(self, outcome: dict) -> None:
        self.read += 1
        if "record" in outcome:
            self.written += 1
            self.responses[str(len(outcome["record"]["responses"]))] += 1
            self.events.update(outcome["events"])
            self.media_bytes += outcome["media_bytes"]
            self.media_files += outcome["media_files"]
            return
        entry = self.skipped.setdefault(outcome["skip"], {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLE_IDS:
            entry["examples"].append(outcome["detail"][:300])
        for benchmark, item in outcome.get("contaminated", []):
            hit = self.hits.setdefault(benchmark, {"count": 0, "examples": []})
            hit["count"] += 1
            if len(hit["examples"]) < EXAMPLE_IDS:
                hit["examples"].append(f"{outcome['id']} ~ {item}")

    def merge(self, later: Report) -> None:
        """Adds the counts of the rows after these (a Beam shard's); the examples stay the first ones."""
        self.read, self.written = self.read + later.read, self.written + later.written
        self.responses.update(later.responses)
        self.events.update(later.events)
        self.media_bytes, self.media_files = self.media_bytes + later.media_bytes, self.media_files + later.media_files
        for mine, theirs in ((self.skipped, later.skipped), (self.hits, later.hits)):
            for key, entry in theirs.items():
                kept = mine.setdefault(key, {"count": 0, "examples": []})
                kept["count"] += entry["count"]
                kept["examples"] = (kept["examples"] + entry["examples"])[:EXAMPLE_IDS]

    def as_dict(self, run: Settings, index_info: dict) -> dict:
        return {"dataset": run.dataset, "input": str(run.input), "records_read": self.read,
                "records_written": self.written,
                "skipped": dict(sorted(self.skipped.items(), key=lambda kv: -kv[1]["count"])),
                "responses_per_record": dict(sorted(self.responses.items(), key=lambda kv: int(kv[0]))),
                "ties": {"pairwise_dropped": self.skipped.get("pairwise_tie", {}).get("count", 0),
                         "nway_records_kept": self.events.get("nway_tie_kept", 0)},
                "events": dict(self.events), "media_files_written": self.media_files,
                "media_bytes_written": self.media_bytes,
                "decontamination": {"hits": self.hits, **index_info}}


def summary(report: dict) -> str:
    """The one stderr line: records read, written, skipped by reason, decontamination hits, media."""
    skipped = report["skipped"]
    reasons = ", ".join(f"{k} {v['count']}" for k, v in skipped.items())
    hits = ", ".join(f"{k} {v['count']}" for k, v in report["decontamination"]["hits"].items())
    return (f"[prepare] {report['dataset']}: read {report['records_read']}, wrote {report['records_written']}, "
            f"skipped {sum(v['count'] for v in skipped.values())}{f' ({reasons})' if reasons else ''}"
            f"{f'; benchmark duplicates: {hits}' if hits else ''}; media "
            f"{report['media_bytes_written'] / 2**20:.1f} MiB written")


def outcome_line(outcome: dict) -> tuple[str, bytes]:
    """Which output file one row's outcome goes to, and its JSON line there: the record, or the skip."""
    if "record" in outcome:
        return RECORDS_FILE, (json.dumps(outcome["record"], ensure_ascii=False) + "\n").encode()
    skip = {k: outcome[k] for k in ("id", "skip", "detail")}
    return SKIPS_FILE, (json.dumps(skip, ensure_ascii=False) + "\n").encode()


def _numbered_rows(run: Settings, start: int) -> Iterator[tuple[int, str, object]]:
    rows = releases.SOURCES[run.dataset].read(run.input)
    for number, (position, row) in enumerate(rows):
        if run.limit is not None and number >= run.limit:
            return
        if number >= start:  # rows before `start` were converted by an earlier run
            yield number, position, row


def _chunks(rows: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _outcomes(run: Settings, index, start: int, workers: int) -> Iterator[list[dict]]:
    """Each chunk's outcomes in input order; with workers, at most IN_FLIGHT_PER_WORKER chunks each ahead."""
    chunks = _chunks(_numbered_rows(run, start), CHUNK_ROWS)
    if workers <= 1:
        start_worker(run, index)
        yield from map(_convert_chunk, chunks)
        return
    # spawn: the reader's pyarrow threads must not be forked mid-flight
    with concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), start_worker,
                                                (run, index)) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.submit(_convert_chunk, chunk))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def open_state(run: Settings, runner: str) -> dict | None:
    """The saved state of a run into --out with these settings and runner, None for a new --out; a
    PrepareError for another run's directory."""
    state_path = run.out / STATE_FILE
    if not state_path.exists():
        if run.out.exists() and any(run.out.iterdir()):
            raise PrepareError(f"--out {run.out} is not empty and holds no {STATE_FILE}: give a new directory")
        return None
    state = json.loads(state_path.read_text())
    if state["settings"] != run.fingerprint():
        diffs = sorted(k for k in run.fingerprint() if state["settings"].get(k) != run.fingerprint()[k])
        raise PrepareError(f"--out {run.out} holds a conversion with other arguments ({', '.join(diffs)}): "
                           "use the same arguments to resume it, or a new --out")
    if state["runner"] != runner and not state["complete"]:
        raise PrepareError(f"--out {run.out} holds a conversion the {state['runner']} runner started: resume it with "
                           f"--runner={state['runner']}")
    return state


def write_state(run: Settings, runner: str, complete: bool, **fields) -> None:
    """DIR/prepare_state.json, replaced whole: the settings, the runner, whether it is done, and `fields`."""
    write_whole(run.out / STATE_FILE, json.dumps({"settings": run.fingerprint(), "runner": runner,
                                                  "complete": complete, **fields}))


def write_whole(path: pathlib.Path, text: str) -> None:
    """Writes under a temporary name and renames: a reader or a killed run never sees half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _save_state(run: Settings, rows_done: int, lengths: dict, report: Report, index_info: dict,
                complete: bool) -> None:
    write_state(run, "local", complete, rows_done=rows_done, lengths=lengths, report=report.as_dict(run, index_info))


def decontamination_index(run: Settings) -> tuple[decontamination.Index | None, dict]:
    """The benchmarks' index of --decontaminate (None without it) and what the report says of it."""
    if not run.decontaminate:
        return None, {}
    try:
        index, left_out = decontamination.build_index(list(run.decontaminate))
    except (OSError, ValueError) as error:
        raise PrepareError(f"--decontaminate: {error}") from error
    return index, {"indexed": index.indexed, "not_indexed": left_out}


def write_report(run: Settings, report: Report, index_info: dict, started: float) -> dict:
    result = {**report.as_dict(run, index_info), "seconds": round(time.perf_counter() - started, 3)}
    write_whole(run.out / REPORT_FILE, json.dumps(result, indent=2) + "\n")
    return result


def prepare(run: Settings, workers: int = 1) -> dict:
    """Converts (or resumes converting) the release; returns the report, also in DIR/prepare_report.json."""
    state = open_state(run, "local")
    if state is not None and state["complete"]:
        log.warning("%s is complete already; nothing to do", run.out)
        return state["report"]
    started = time.perf_counter()
    index, index_info = decontamination_index(run)
    run.out.mkdir(parents=True, exist_ok=True)
    report = Report(state["report"] if state else None)
    rows_done = state["rows_done"] if state else 0
    outputs = {}
    for name in (RECORDS_FILE, SKIPS_FILE):  # lines past the last saved chunk are cut: they come again
        (run.out / name).touch()
        outputs[name] = (run.out / name).open("r+b")
        outputs[name].truncate(state["lengths"][name] if state else 0)
        outputs[name].seek(0, os.SEEK_END)
    try:
        for outcomes in _outcomes(run, index, rows_done, workers):
            for outcome in outcomes:
                report.add(outcome)
                name, line = outcome_line(outcome)
                outputs[name].write(line)
            for file in outputs.values():
                file.flush()
            rows_done += len(outcomes)
            _save_state(run, rows_done, {n: f.tell() for n, f in outputs.items()}, report, index_info, False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:  # the release itself cannot be read
        raise PrepareError(f"--input {run.input}: {error}") from error
    finally:
        for file in outputs.values():
            file.close()
    _save_state(run, rows_done, {n: (run.out / n).stat().st_size for n in outputs}, report, index_info, True)
    return write_report(run, report, index_info, started)
