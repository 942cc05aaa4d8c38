"""The grain input pipeline: records -> examples (in workers) -> packed rows -> fixed-shape batches.

    records (JSONL, or TFDS ArrayRecord: tfds_records.py) -> MapDataset.source -> per-process shard -> shuffle, repeat (new order
    per epoch) -> PrepareExample (decode media, Molmo2 preprocessing, formatting, budget; in the
    grain workers) -> mp_prefetch -> PackedBatches (window first-fit-decreasing packing, the examples
    of a window's under-full rows carried into the next window once)

Every step of it is a deterministic function of (seed, element index), so the iterator state is
small: `PackedBatches` saves the parent's state at the start of the packing window that holds the
next row and at the start of the window before it, the arrival indices of the examples carried from
that one, and the index of the next row. Restoring re-reads that window (and the one before, when
it carried examples) and re-packs identically.
Skips and drops travel inside the batches as a count vector (`COUNT_KEYS`), also from the workers,
and every skipped record by name (`Skipped`: its id, reason and message), so nothing is lost silently
and both survive a restore exactly. A broken pipeline is loud instead: `PipelineError` when a window's
records fail unexpectedly (not for an ordinary data reason) too often, or a whole pass gives no example.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
import threading
from typing import NamedTuple

import grain
import numpy as np
from PIL import Image

from mrrm_jax.data import examples, packing, records
from mrrm_jax.data.examples import Skip

log = logging.getLogger(__name__)

# Every reason an example is skipped or changed, in the order of the `counts` vector of a batch.
COUNT_KEYS = (
    "bad_json", "bad_responses", "bad_rankings", "missing_file", "path_outside_root", "bad_image", "bad_video",
    "no_frames", "image_and_video", "vision_too_long", "too_long", "too_large_for_row", "unexpected_error",  # skips
    "crops_reduced", "frames_reduced", "response_dropped", "best_response_dropped",  # changes
)
MEDIA_KINDS = ("text", "image", "video")
MEDIA_TRANSFORMS = ("none", "black", "frozen")  # "black" / "frozen": the blanked-media controls


def count_vector(counts: dict) -> np.ndarray:
    unknown = set(counts) - set(COUNT_KEYS)
    if unknown:
        raise KeyError(f"count keys {sorted(unknown)} are not in COUNT_KEYS")
    return np.array([counts.get(k, 0) for k in COUNT_KEYS], np.int64)


DETAIL_CHARS = 200  # a skip's message is cut to this: an exception's message can be a whole file


class Skipped(NamedTuple):
    """One skipped record, as it travels in a batch's "skips" (a list): JSON with `json.dumps(s._asdict())`."""
    record_id: str
    reason: str  # its key in COUNT_KEYS
    detail: str  # the `Skip`'s message, or "ExceptionType: message" for an unexpected error


def _detail(message: str) -> str:
    """A skip's message on one line (an exception's can span many), at most `DETAIL_CHARS` long."""
    return " ".join(message.split())[:DETAIL_CHARS]


class PipelineError(Exception):
    """The input pipeline is broken, not a record: most records fail unexpectedly, or none gives an example."""


def blank_media(loaded: dict, transform: str) -> dict:
    """The controls: "black" zeroes images and frames; "frozen" repeats a video's first frame."""
    if transform == "none":
        return loaded
    out = dict(loaded)
    if "images" in out:
        out["images"] = [Image.new("RGB", image.size) for image in out["images"]]
    if "video" in out:
        frames = out["video"]
        out["video"] = np.zeros_like(frames) if transform == "black" else np.repeat(frames[:1], len(frames), 0)
    return out


class PrepareExample:
    """(index, (record id, record)) -> {"example": one-row example or None, "counts": [len(COUNT_KEYS)],
    "skip": the `Skipped` when "example" is None, else None}.

    Runs inside the grain workers, on grain's reader threads; the processor's fast tokenizer is not
    thread-safe, so each thread opens its own processor, lazily, with `load_processor(processor_dir)`
    (`backbones.load_processor`: the data path itself knows no backbone); it is never pickled. Videos
    decode only the frames the budget's attempts can sample. The response order and tie-breaks come from
    `default_rng([seed, index])`: the index runs on across epochs, so each epoch shuffles anew.
    """

    def __init__(self, processor_dir, load_processor, budget: examples.Budget, seed: int, media_root,
                 media_transform: str = "none", row: packing.RowBudget | None = None, sources: tuple[str, ...] = (),
                 separate=None):
        if media_transform not in MEDIA_TRANSFORMS:
            raise ValueError(f"media_transform={media_transform!r}: expected one of {MEDIA_TRANSFORMS}")
        self.processor_dir, self.load_processor, self.budget = str(processor_dir), load_processor, budget
        self.row = row  # the packed row every example must fit: one that does not is a skip, not a crash
        self.seed, self.media_transform = seed, media_transform
        self.separate = separate  # a media layout: each response in its own sequence (`training_example`)
        self.sources = sources  # a mixture's source names: a record id "NAME/..." is counted under NAME
        self.media_root = None if media_root is None else pathlib.Path(media_root)
        self._local = threading.local()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state, _local=threading.local())

    @property
    def processor(self):
        if not hasattr(self._local, "processor"):
            self._local.processor = self.load_processor(self.processor_dir)
            self._local.keep_frames = examples.frames_to_keep(self.budget, self._local.processor)
        return self._local.processor

    def __call__(self, index: int, item) -> dict:
        """`item`: (record id, record) from JSONL, media under `media_root`; or (record id, record, files)
        with the record's own media: `records.MediaBlobs` from TFDS (`tfds_records.RecordSource`), the
        source's `records.MediaDir` in a mixture."""
        record_id, record = item[:2]
        files = item[2] if len(item) == 3 else records.MediaDir(self.media_root)
        counts = collections.Counter()
        example = skip = None
        try:
            if not isinstance(record, dict):
                raise Skip("bad_json", f"{record_id}: not a JSON object")
            processor = self.processor
            loaded = blank_media(records.load_media(record, record_id, files, self._local.keep_frames),
                                 self.media_transform)
            example = examples.training_example(record, loaded, processor, self.budget,
                                                np.random.default_rng([self.seed, index]), counts, record_id,
                                                self.separate)
            over = packing.exceeds(example, self.row) if self.row else []
            if over:
                raise Skip("too_large_for_row", f"{record_id}: {', '.join(over)} do not fit one packed row")
            kind = "video" if "video" in loaded else "image" if "images" in loaded else "text"
            example["media_kind"] = np.array([MEDIA_KINDS.index(kind)], np.int32)
        except Skip as error:
            counts[error.reason] += 1
            example, skip = None, Skipped(record_id, error.reason, _detail(str(error)))
            log.warning("skipped %s", error)
        except Exception as error:  # one record never ends a run; many do (`PackingConfig.max_unexpected_error_rate`)
            counts["unexpected_error"] += 1
            example, skip = None, Skipped(record_id, "unexpected_error", _detail(f"{type(error).__name__}: {error}"))
            log.exception("skipped %s: unexpected %s: %s", record_id, type(error).__name__, error)
        source = self.sources.index(record_id.split("/", 1)[0]) if self.sources else -1
        return {"example": example, "counts": count_vector(counts), "skip": skip, "source": source}


@dataclasses.dataclass(frozen=True)
class PackingConfig:
    row: packing.RowBudget
    media: object  # the backbone's media layout (`backbones.media(config)`)
    rows_per_batch: int
    window: int = 64  # examples read and packed together (first-fit decreasing); larger packs tighter, holds more
    # More than this share of a window's records failing with an unexpected error (an exception that is not
    # a `Skip`: a bug, a broken processor, not bad data) is a `PipelineError`; 1.0 never raises. Records
    # skipped for a data reason (too_long, missing_file, ...) are left out of the share: they say nothing
    # of whether the pipeline works, and left in, a corpus of many of them would hide a broken one.
    max_unexpected_error_rate: float = 0.5
    sources: tuple[str, ...] = ()  # a mixture's sources: batches count examples and skips per source


# A row whose fullest budget is below this share, packed from one window's examples alone, waits for the
# next window instead (once): the last rows of a window are where its padding is. Lower wastes more of the
# rows left under it; higher carries rows that are nearly full already, for no fewer rows in the end.
CARRY_BELOW = 0.9

# A window's share of unexpected errors raises only from this many on: a window that ends after a few
# records (the last one of a finite run, or a window of a few examples) must not raise for one or two.
MIN_UNEXPECTED_ERRORS = 5


class PackedBatches(grain.IterDataset):
    """Batches [rows_per_batch, ...] of packed rows; see the module docstring for the state.

    `records`: the records in one pass over the parent (an epoch of this process's shard), when known:
    then a whole pass that gives no example is a `PipelineError`, not an endless read of skips.
    """

    def __init__(self, parent: grain.IterDataset, config: PackingConfig, records: int | None = None):
        super().__init__(parent)
        self.config, self.records = config, records

    def __iter__(self):
        return _PackedBatchIterator(self._parent.__iter__(), self.config, self.records)


class _PackedBatchIterator(grain.DatasetIterator):
    """Reads `config.window` examples at a time and packs them, with the examples carried from the window
    before placed first; the examples of its under-full rows that are all its own carry on to the next.

    State: where the previous window and this one start in the parent, which of the previous window's
    examples (by arrival index) were carried into this one, and the next row. Restoring re-reads the
    previous window for those examples only when there are any, then re-reads and re-packs this one.
    The first row of a window carries the counts and skips of every record read for it, so a restore
    emits each exactly once; both failure checks look at one window's records only, so a restore that
    re-reads a window raises where the first read did.
    """

    def __init__(self, parent: grain.DatasetIterator, config: PackingConfig, records: int | None):
        super().__init__(parent)
        self.config, self._records = config, records
        self._window_start = self._previous_start = parent.get_state()
        self._carried_in: list[int] = []  # arrival indices in the previous window
        self._carry_out: list[tuple[int, dict]] = []  # (arrival index in this window, example)
        self._rows: list[list[dict]] = []  # examples per row, packed as they are emitted
        self._counts = np.zeros(len(COUNT_KEYS), np.int64)
        self._by_source = np.zeros((len(config.sources), 2), np.int64)
        self._skips: list[Skipped] = []
        self._next_row = 0
        self._exhausted = False

    def _read(self) -> tuple[list[dict], np.ndarray, list[Skipped], np.ndarray]:
        """The next window's examples in arrival order, and the counts, skips and per-source counts of
        every record read for them. Raises `PipelineError` for too many unexpected errors or a whole pass without an example."""
        window, counts, skips = [], np.zeros(len(COUNT_KEYS), np.int64), []
        by_source = np.zeros((len(self.config.sources), 2), np.int64)  # [source, (examples, skips)]
        unexpected = barren = 0  # barren: records since the last example
        while len(window) < self.config.window:
            try:
                item = next(self._parent)
            except StopIteration:
                self._exhausted = True
                self._check_errors(skips, unexpected, len(window))
                break
            counts += item["counts"]
            if self.config.sources:
                by_source[item["source"], int(item["example"] is None)] += 1
            if item["example"] is not None:
                window.append(item["example"])
                barren = 0
                continue
            skips.append(item["skip"])
            barren += 1
            if item["skip"].reason == "unexpected_error":
                unexpected += 1
                # Judged as soon as it is certain, since a window whose every record fails never ends: the
                # share only grows with more failures, and the window gives `window` examples at most.
                self._check_errors(skips, unexpected, self.config.window)
            # A window ends on its last example, so no run of skips spans two windows. Any 2N - 1 records in
            # a row hold one whole pass over the N records (each epoch in its own order), where N in a row
            # need not: the only good record may come first in one epoch and last in the next.
            if self._records and barren >= 2 * self._records - 1:
                raise PipelineError(
                    f"{barren} records in a row gave no example, a whole pass over this process's {self._records} "
                    f"records and more: {most_common(skips[-barren:], 'reason')}")
        return window, counts, skips, by_source

    def _check_errors(self, skips: list[Skipped], unexpected: int, examples: int) -> None:
        """`PipelineError` if `unexpected` errors are over the limit in a window of `examples` examples."""
        rate = self.config.max_unexpected_error_rate
        if unexpected >= MIN_UNEXPECTED_ERRORS and unexpected > rate * (unexpected + examples):
            failed = [skip for skip in skips if skip.reason == "unexpected_error"]
            raise PipelineError(
                f"{unexpected} records failed unexpectedly in a packing window where at most {examples} gave an "
                f"example, more than max_unexpected_error_rate={rate:g} of its records (skips for data reasons "
                f"aside): {most_common(failed, 'detail')}")

    def _next_window(self) -> None:
        carried = self._carry_out
        self._previous_start, self._window_start = self._window_start, self._parent.get_state()
        self._carried_in = [index for index, _ in carried]
        arrivals, self._counts, self._skips, self._by_source = self._read()
        # Carried examples first, so the rows they open fill up with this window's; each part longest
        # first (stable): identical on every re-read.
        order = [(None, example) for _, example in _longest_first(carried)] + _longest_first(list(enumerate(arrivals)))
        rows = [[order[i] for i in row] for row in packing.first_fit([e for _, e in order], self.config.row)]
        # The first row always goes (it carries the counts); a carried example never waits twice.
        self._rows, self._carry_out = [], []
        for number, row in enumerate(rows):
            examples = [example for _, example in row]
            if (number == 0 or self._exhausted or any(index is None for index, _ in row)
                    or self.config.row.fullness(examples) >= CARRY_BELOW):
                self._rows.append(examples)
            else:
                self._carry_out += row
        if not self._rows and self._counts.any():  # a window of skips only: an empty row carries them
            self._rows = [[]]
        self._next_row = 0

    def close(self) -> None:
        """Stops the workers; the examples held for packing are let go with them (grain's workers hand
        them over in shared memory, released when the last reference goes)."""
        self._rows, self._carry_out = [], []
        super().close()

    def __next__(self) -> dict:
        rows = []
        while len(rows) < self.config.rows_per_batch:
            if self._next_row < len(self._rows):
                row = packing.pack_row(self._rows[self._next_row], self.config.row, self.config.media)
                first = self._next_row == 0
                row["counts"] = self._counts if first else np.zeros_like(self._counts)
                row["skips"] = self._skips if first else []
                row["source_counts"] = self._by_source if first else np.zeros_like(self._by_source)
                rows.append(row)
                self._next_row += 1
            elif self._exhausted:
                break
            else:
                self._next_window()
        if not rows:
            raise StopIteration
        return _stack(rows + [_empty_row(self.config)] * (self.config.rows_per_batch - len(rows)))

    def get_state(self) -> dict:
        return {"previous_window_start": self._previous_start, "carried": self._carried_in,
                "window_start": self._window_start, "next_row": self._next_row}

    def set_state(self, state: dict) -> None:
        self._exhausted = False
        self._carry_out = []
        # .get: a state saved before carrying existed restores as one that carried nothing.
        if state.get("carried"):  # re-read the previous window: it ends where this one starts
            self._parent.set_state(state["previous_window_start"])
            previous, *_ = self._read()
            self._carry_out = [(index, previous[index]) for index in state["carried"]]
        else:
            self._parent.set_state(state["window_start"])
        self._window_start = state.get("previous_window_start", state["window_start"])
        self._next_window()
        self._next_row = state["next_row"]


def _longest_first(examples: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    return sorted(examples, key=lambda item: -item[1]["tokens"].shape[1])


def most_common(skips: list[Skipped], field: str) -> str:
    """The three commonest values of `field` among `skips`, each with its count and a few record ids."""
    ids = collections.defaultdict(list)
    for skip in skips:
        ids[getattr(skip, field)].append(skip.record_id)
    top = sorted(ids.items(), key=lambda item: -len(item[1]))[:3]
    return "; ".join(f"{value} x{len(records)} (records {', '.join(records[:3])}{', ...' * (len(records) > 3)})"
                     for value, records in top)


def _empty_row(config: PackingConfig) -> dict:
    return {**packing.pack_row([], config.row, config.media), "counts": np.zeros(len(COUNT_KEYS), np.int64),
            "skips": [], "source_counts": np.zeros((len(config.sources), 2), np.int64)}


HOST_KEYS = ("counts", "skips", "source_counts")  # a batch's bookkeeping, not model input


def _stack(rows: list[dict]) -> dict:
    batch = {name: np.concatenate([row[name] for row in rows]) for name in rows[0] if name not in HOST_KEYS}
    batch["counts"] = np.sum([row["counts"] for row in rows], axis=0)
    batch["source_counts"] = np.sum([row["source_counts"] for row in rows], axis=0)
    batch["skips"] = [skip for row in rows for skip in row["skips"]]
    return batch


def empty_batch(config: PackingConfig) -> dict:
    """A batch of empty rows (no examples), e.g. for a process whose evaluation shard ran out first."""
    return _stack([_empty_row(config)] * config.rows_per_batch)


def record_dataset(items, seed: int, num_epochs: int | None, shard_index: int = 0, shard_count: int = 1,
                   shuffle: bool = True) -> grain.MapDataset:
    """(record id, record) items of this process's shard, shuffled anew each epoch, repeated."""
    dataset = grain.MapDataset.source(items)[shard_index::shard_count]
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    return dataset.repeat(num_epochs)


def mixed_dataset(sources: list, weights: list[float], seed: int, shard_index: int = 0,
                  shard_count: int = 1) -> grain.MapDataset:
    """Several sources' items, each shard shuffled anew per epoch and repeated without end, interleaved by
    Grain's `MapDataset.mix` in proportion to `weights`: element i is a fixed function of (seed, i), so
    the mixed order, and with it the iterator's state, restores exactly."""
    parts = [record_dataset(items, seed + number, None, shard_index, shard_count)
             for number, items in enumerate(sources)]
    return grain.MapDataset.mix(parts, weights)


def batches(items, prepare: PrepareExample, packing_config: PackingConfig, seed: int, num_epochs: int | None,
            num_workers: int = 0, shard_index: int = 0, shard_count: int = 1, shuffle: bool = True,
            num_threads: int = 1, mixture: list[float] | None = None) -> grain.IterDataset:
    """The whole pipeline; iterate it (`iter(...)`) for batches, save its iterator's state with Orbax.

    `mixture`: `items` is a list of sources' items, mixed with these weights (`mixed_dataset`).
    `num_workers` processes each run `num_threads` reader threads, each thread with its own processor
    (a few seconds to open): on a small host, one thread per worker process is the fast setting.
    """
    if mixture is None:
        dataset = record_dataset(items, seed, num_epochs, shard_index, shard_count, shuffle)
        records = len(range(shard_index, len(items), shard_count))
    else:
        dataset = mixed_dataset(items, mixture, seed, shard_index, shard_count)
        records = None  # a whole pass is not defined for a mixture: the barren-pass check is off
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(4 * num_threads, 8))
    dataset = dataset.map_with_index(prepare).to_iter_dataset(read)
    if num_workers:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return PackedBatches(dataset, packing_config, records=records)
