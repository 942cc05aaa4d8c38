"""The grain pipeline: fixed-shape packed batches, counted and named skips, determinism across restored
states, and a loud error for a broken pipeline or a corpus that gives no example."""

from __future__ import annotations

import json
import re
import threading

import grain
import numpy as np
import pytest
from PIL import Image

from mrrm_jax.data import examples, packing, pipeline, records, synthetic
from mrrm_jax.backbones.molmo2 import Molmo2Config
from mrrm_jax.backbones.molmo2.packing import Molmo2Media
from mrrm_jax import backbones
from tests import oracle

ROW = packing.RowBudget(row_tokens=1024, row_crops=24, row_pooled=256, row_examples=8, max_responses=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """8 images, 6 videos and two bad records (a missing file, rankings of the wrong length)."""
    root = tmp_path_factory.mktemp("corpus")
    path = synthetic.write_corpus(root, num_images=8, num_videos=6, seed=0)
    bad = [{"prompt": "?", "image": "missing.png", "responses": ["a", "b"], "rankings": [1, 2]},
           {"prompt": "?", "responses": ["a", "b"], "rankings": [1]}]
    with path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in bad)
    return path


def _batches(corpus, processor_dir, tiny_models, num_epochs=2, window=6, **kwargs):
    config = Molmo2Config.from_hf_dict(oracle.tiny_hf_config().to_dict())
    prepare = pipeline.PrepareExample(processor_dir, backbones.load_processor, examples.Budget(1024, 512, max_frames=4), seed=3,
                                      media_root=corpus.parent, row=ROW)
    packing_config = pipeline.PackingConfig(ROW, backbones.media(config),
                                            rows_per_batch=2, window=window)
    return pipeline.batches(records.read_jsonl(corpus), prepare, packing_config, seed=3, num_epochs=num_epochs,
                            **kwargs)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_are_fixed_shape_and_count_every_example(corpus, processor_dir, tiny_models):
    batches = list(_batches(corpus, processor_dir, tiny_models))
    shapes = {k: v.shape for k, v in batches[0].items() if k != "skips"}  # the skipped records: a list
    assert all({k: v.shape for k, v in b.items() if k != "skips"} == shapes for b in batches)
    assert shapes["tokens"] == (2, ROW.row_tokens) and shapes["labels"] == (2, ROW.row_examples)
    counts = dict(zip(pipeline.COUNT_KEYS, np.sum([b["counts"] for b in batches], 0)))
    # Two epochs of 14 good and 2 bad records: every good one packed, every bad one counted.
    assert sum((b["labels"] >= 0).sum() for b in batches) == 28
    assert counts["missing_file"] == 2 and counts["bad_rankings"] == 2
    assert sum(counts.values()) == 4
    # Each example's best-to-worst order rides with it (distinct ranks here: it starts at the label).
    for b in batches:
        real = b["labels"] >= 0
        np.testing.assert_array_equal(b["order"][real][:, 0], b["labels"][real])
        np.testing.assert_array_equal((b["order"][real] >= 0).sum(-1), (b["read_positions"][real] >= 0).sum(-1))
    kinds = np.concatenate([b["media_kind"][b["labels"] >= 0] for b in batches])
    assert (kinds == pipeline.MEDIA_KINDS.index("image")).sum() == 16
    assert (kinds == pipeline.MEDIA_KINDS.index("video")).sum() == 12
    # Each epoch shuffles records and response orders anew.
    first, second = batches[: len(batches) // 2], batches[len(batches) // 2:]
    assert not _equal(first[0], second[0])


def test_a_record_the_budget_accepts_but_no_row_holds_is_a_counted_skip(corpus, processor_dir, tiny_models):
    """5 responses where a row holds 4: the length budget lets it through, the packer could not place it
    (a crash, and the same crash on every resume, before); now a `too_large_for_row` skip."""
    path = corpus.parent / "with_five_responses.jsonl"  # beside the corpus: the same media root
    wide = {"id": "five", "prompt": "Pick one.", "responses": list("abcde"), "rankings": [1, 2, 3, 4, 5]}
    path.write_text(corpus.read_text() + json.dumps(wide) + "\n")
    batches = list(_batches(path, processor_dir, tiny_models))
    counts = dict(zip(pipeline.COUNT_KEYS, np.sum([b["counts"] for b in batches], 0)))
    assert counts["too_large_for_row"] == 2  # once per epoch
    assert sum((b["labels"] >= 0).sum() for b in batches) == 28


def _skips(batches: list[dict]) -> list[pipeline.Skipped]:
    return [skip for b in batches for skip in b["skips"]]


@pytest.mark.slow
def test_restored_iterator_continues_with_identical_batches(corpus, processor_dir, tiny_models):
    dataset = _batches(corpus, processor_dir, tiny_models, num_epochs=3, window=5)
    reference = list(dataset)
    # Each skipped record is named once per epoch, with its id and why.
    missing, wrong_rankings = (record_id for record_id, _ in records.read_jsonl(corpus)[-2:])
    named = _skips(reference)
    assert sorted((s.record_id, s.reason) for s in named) == 3 * [(missing, "missing_file")] + 3 * [
        (wrong_rankings, "bad_rankings")]
    assert all("missing.png" in s.detail for s in named if s.reason == "missing_file")
    for stop in (1, 4, len(reference) - 2):
        iterator = iter(dataset)
        emitted = [next(iterator) for _ in range(stop)]
        state = json.loads(json.dumps(iterator.get_state()))  # what Orbax stores
        resumed = iter(_batches(corpus, processor_dir, tiny_models, num_epochs=3, window=5))
        resumed.set_state(state)
        rest = list(resumed)
        assert len(rest) == len(reference) - stop
        assert all(_equal(a, b) for a, b in zip(rest, reference[stop:]))
        assert _skips(emitted + rest) == named  # none lost, none named twice


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(corpus, processor_dir, tiny_models):
    in_process = list(_batches(corpus, processor_dir, tiny_models, num_epochs=1))
    workers = list(_batches(corpus, processor_dir, tiny_models, num_epochs=1, num_workers=2))
    assert len(in_process) == len(workers)
    assert all(_equal(a, b) for a, b in zip(in_process, workers))


def _sized(number: int, tokens: int, crops: int = 0) -> dict:
    """A content-free example (only its sizes matter to the packer), labelled with its number."""
    example = {"tokens": np.zeros((1, tokens), np.int32), "positions": np.arange(tokens, dtype=np.int32)[None],
               "read_positions": np.array([[tokens - 1]], np.int32), "labels": np.array([number], np.int32),
               "media_kind": np.zeros(1, np.int32)}
    if crops:
        example.update(crops=np.zeros((1, crops, 1, 1), np.uint8), pooling=np.zeros((1, crops, 9), np.int32))
    return {"example": example, "counts": pipeline.count_vector({}), "skip": None}


def _skipped(number: int, reason: str = "bad_json", detail: str = "not a JSON object") -> dict:
    return {"example": None, "counts": pipeline.count_vector({reason: 1}),
            "skip": pipeline.Skipped(f"r{number}", reason, detail)}


def _packed(items: list[dict], row: packing.RowBudget, window: int, epochs: int | None = 1,
            records: int | None = None, **config) -> pipeline.PackedBatches:
    source = grain.MapDataset.source(items)
    if epochs != 1:  # a new order each epoch, as `pipeline.record_dataset`
        source = source.shuffle(seed=0).repeat(epochs)
    return pipeline.PackedBatches(source.to_iter_dataset(), pipeline.PackingConfig(row, Molmo2Media((1, 1)), 1, window, **config),
                                  records)


def _row_labels(batches: list[dict]) -> list[list[int]]:
    return [[int(label) for label in b["labels"][0] if label >= 0] for b in batches]


def test_under_full_rows_wait_for_the_next_window_once():
    # Rows of 10 tokens, windows of 3: alone, the first window packs three rows of 6 (60% full each).
    # Its first row always goes; the other two wait and take the 4s of the next window; the last row
    # (one 4) goes under-full because nothing follows.
    row = packing.RowBudget(row_tokens=10, row_crops=4, row_pooled=4, row_examples=4, max_responses=1)
    sizes = [6, 6, 6, 4, 4, 4]
    batches = list(_packed([_sized(n, t) for n, t in enumerate(sizes)], row, window=3))
    assert _row_labels(batches) == [[0], [1, 3], [2, 4], [5]]
    # Carried examples go out in the next window even when that leaves a row under-full: 6 + 6 > 10.
    sizes = [2, 6, 6, 6, 6, 6]
    batches = list(_packed([_sized(n, t) for n, t in enumerate(sizes)], row, window=3))
    assert _row_labels(batches) == [[1, 0], [2], [3], [4], [5]]


def test_carrying_packs_tight_and_resumes_exactly():
    rng = np.random.default_rng(0)
    row = packing.RowBudget(row_tokens=100, row_crops=12, row_pooled=12, row_examples=8, max_responses=1)
    items = [_sized(n, int(rng.integers(5, 60)), int(rng.integers(0, 3))) for n in range(120)]
    items[7], items[50] = _skipped(7), _skipped(50)
    dataset = _packed(items, row, window=8, epochs=2)
    reference = list(dataset)
    # Every example exactly once per epoch, every skip counted (a row over a budget would not fit its arrays).
    labels = sorted(label for row_labels in _row_labels(reference) for label in row_labels)
    assert labels == sorted(2 * [n for n in range(120) if n not in (7, 50)])
    assert sum(int(b["counts"].sum()) for b in reference) == 4
    assert sorted(s.record_id for s in _skips(reference)) == ["r50", "r50", "r7", "r7"]
    tokens = sum(int(items[n]["example"]["tokens"].shape[1]) for n in labels)
    assert tokens / (len(reference) * row.row_tokens) >= 0.94  # 0.948; each window packed alone: 0.817
    carried = 0
    iterator = iter(dataset)
    for stop in range(len(reference)):
        state = json.loads(json.dumps(iterator.get_state()))  # what Orbax stores
        carried += bool(state["carried"])
        resumed = iter(_packed(items, row, window=8, epochs=2))
        resumed.set_state(state)
        rest = list(resumed)
        assert len(rest) == len(reference) - stop
        assert all(_equal(a, b) for a, b in zip(rest, reference[stop:]))
        assert _skips(reference[:stop] + rest) == _skips(reference)
        next(iterator)
    assert carried > len(reference) // 2  # the restores above re-read carried examples


def _error(dataset, timeout: float = 60) -> Exception | None:
    """What iterating `dataset` to its end raises, in a thread: one that reads skips forever fails the
    test instead of hanging it."""
    raised = []

    def iterate():
        try:
            for _ in dataset:
                pass
        except Exception as error:
            raised.append(error)

    thread = threading.Thread(target=iterate, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"neither an end nor an error after {timeout} s"
    return raised[0] if raised else None


def test_a_pipeline_that_fails_every_record_raises_naming_the_error(corpus, tiny_models, tmp_path):
    """A processor directory without a tokenizer fails every record unexpectedly: counted as skips, the run
    would train on empty rows forever. With windows of 6 examples, the 7th failure is more than half of the
    window's records whatever follows."""
    broken = tmp_path / "processor"
    broken.mkdir()
    error = _error(_batches(corpus, broken, tiny_models, num_epochs=None))
    assert isinstance(error, pipeline.PipelineError)
    assert str(error).startswith("7 records failed unexpectedly in a packing window where at most 6 gave an example, "
                                 "more than max_unexpected_error_rate=0.5 of its records (skips for data reasons "
                                 "aside): ValueError: Couldn't ")
    assert re.search(r" x7 \(records (corpus\.jsonl:\d+, ){3}\.\.\.\)$", str(error))


def test_one_bad_record_in_a_hundred_is_named_and_the_run_goes_on(processor_dir, tiny_models, tmp_path):
    path = tmp_path / "hundred.jsonl"
    good = {"prompt": "Pick one.", "responses": ["a", "b"], "rankings": [1, 2]}
    lines = [{**good, "image": 5} if n == 37 else good for n in range(100)]  # `image` not a name: a TypeError
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    batches = list(_batches(path, processor_dir, tiny_models, num_epochs=1, window=8))
    assert sum((b["labels"] >= 0).sum() for b in batches) == 99
    assert _skips(batches) == [pipeline.Skipped("hundred.jsonl:38", "unexpected_error",
                                                "TypeError: 'int' object is not iterable")]
    assert np.sum([b["counts"] for b in batches], 0)[pipeline.COUNT_KEYS.index("unexpected_error")] == 1


def test_a_corpus_whose_every_record_is_skipped_raises_instead_of_reading_forever(processor_dir, tiny_models,
                                                                                 tmp_path):
    """Every image a link out of the media root: repeated, the iterator used to read skips forever."""
    outside, root = tmp_path / "outside", tmp_path / "root"
    outside.mkdir()
    root.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "cat.png")
    (root / "cat.png").symlink_to(outside / "cat.png")
    path = root / "linked.jsonl"
    record = {"prompt": "?", "image": "cat.png", "responses": ["a", "b"], "rankings": [1, 2]}
    path.write_text(5 * (json.dumps(record) + "\n"))
    error = _error(_batches(path, processor_dir, tiny_models, num_epochs=None))
    assert isinstance(error, pipeline.PipelineError)
    assert re.fullmatch(r"9 records in a row gave no example, a whole pass over this process's 5 records and more: "
                        r"path_outside_root x9 \(records (linked\.jsonl:\d, ){3}\.\.\.\)", str(error))


_ROW = packing.RowBudget(row_tokens=10, row_crops=4, row_pooled=4, row_examples=4, max_responses=1)


def _failed(number: int) -> dict:
    return _skipped(number, "unexpected_error", "KeyError: 'x'")


def test_unexpected_errors_raise_over_the_share_of_a_window_not_for_a_few():
    # 1 record in 100 failing never raises, with windows of 4 examples; each is named.
    items = [_failed(n) if n % 100 == 37 else _sized(n, 6) for n in range(300)]
    batches = list(_packed(items, _ROW, window=4))
    assert [s.record_id for s in _skips(batches)] == ["r37", "r137", "r237"]
    # Half failing is not more than half; two in three is, certain at the 5th failure of the first window
    # (5 of at most 9 records).
    assert len(list(_packed([_failed(n) if n % 2 else _sized(n, 6) for n in range(40)], _ROW, window=4))) == 20
    error = _error(_packed([_sized(n, 6) if n % 3 == 2 else _failed(n) for n in range(30)], _ROW, window=4))
    assert isinstance(error, pipeline.PipelineError)
    assert str(error) == ("5 records failed unexpectedly in a packing window where at most 4 gave an example, "
                          "more than max_unexpected_error_rate=0.5 of its records (skips for data reasons aside): "
                          "KeyError: 'x' x5 (records r0, r1, r3, ...)")
    # Ordinary skips are not in the share (a half, not a third, here): they would dilute it.
    items = [_skipped(n) if n % 3 == 1 else _failed(n) if n % 3 == 2 else _sized(n, 6) for n in range(30)]
    assert isinstance(_error(_packed(items, _ROW, window=8, max_unexpected_error_rate=0.4)), pipeline.PipelineError)
    # The short last window of a finite run: 4 failures are too few to judge; 5 with 1 example are judged
    # at its end (over 0.7 of 6 records; a whole window would have had at least 9).
    tail = [_sized(n, 6) for n in range(9)]
    assert _error(_packed(tail + [_failed(n) for n in range(9, 13)], _ROW, 4)) is None
    error = _error(_packed(tail + [_failed(n) for n in range(9, 14)], _ROW, 4, max_unexpected_error_rate=0.7))
    assert str(error).startswith("5 records failed unexpectedly in a packing window where at most 1 gave an example")
    # A rate of 1 never raises: every record failing gives one empty row that names them all.
    batches = list(_packed([_failed(n) for n in range(30)], _ROW, window=4, max_unexpected_error_rate=1.0))
    assert len(batches) == 1 and len(_skips(batches)) == 30 and (batches[0]["labels"] < 0).all()


def test_a_whole_pass_without_an_example_raises_but_one_good_record_is_enough():
    # One good record in 10, shuffled anew each epoch: up to 18 records apart, never a whole pass without it.
    items = [_sized(0, 6)] + [_skipped(n) for n in range(1, 10)]
    batches = list(_packed(items, _ROW, window=1, epochs=10, records=10))
    assert sum(map(len, _row_labels(batches))) == 10
    order = list(grain.MapDataset.source(range(10)).shuffle(seed=0).repeat(10))  # as `_packed` reads them
    positions = [index for index, record in enumerate(order) if record == 0]
    assert max(np.diff(positions)) - 1 >= 10  # a run of skips longer than a pass: N in a row would have raised
    error = _error(_packed([_skipped(n) for n in range(10)], _ROW, window=4, epochs=None, records=10))
    assert isinstance(error, pipeline.PipelineError)
    assert re.fullmatch(r"19 records in a row gave no example, a whole pass over this process's 10 records and "
                        r"more: bad_json x19 \(records (r\d, ){3}\.\.\.\)", str(error))


def test_a_mixture_counts_each_source_and_resumes_exactly(tmp_path, processor_dir, tiny_models):
    """Three prepared sources mixed 2:1:1 by Grain's mix: each source's examples and skips counted, in
    proportion to its weight, and a restored iterator continues with the identical batches."""
    from mrrm_jax.sources import conversion
    from mrrm_jax.training import data as training_data
    from tests import release_files
    files = []
    for name in ("mm_rlhf", "rlaif_v", "tulu"):
        root, media_root, _ = release_files.write(name, tmp_path / name / "release")
        conversion.prepare(conversion.settings(name, str(root), str(tmp_path / name / "out")))
        files.append(tmp_path / name / "out" / "records.jsonl")
    mixture = training_data.Mixture(tuple(files), ("mm_rlhf", "rlaif_v", "tulu"), (2.0, 1.0, 1.0))
    config = Molmo2Config.from_hf_dict(oracle.tiny_hf_config().to_dict())

    def mixed():
        prepare = pipeline.PrepareExample(processor_dir, backbones.load_processor, examples.Budget(1024, 512, max_frames=4),
                                          seed=3, media_root=None, row=ROW, sources=mixture.names)
        packing_config = pipeline.PackingConfig(ROW, backbones.media(config), rows_per_batch=2, window=6,
                                                sources=mixture.names)
        return pipeline.batches(training_data.mixture_items(mixture), prepare, packing_config, seed=3, num_epochs=None,
                                mixture=list(mixture.weights))
    iterator = iter(mixed())
    reference = [next(iterator) for _ in range(10)]
    by_source = np.sum([b["source_counts"] for b in reference], 0)  # [source, (examples, skips)]
    read = by_source.sum(1)
    assert (by_source[:, 0] > 0).all() and by_source[:, 1].sum() == 0  # prepared records: none skipped
    assert read[0] == pytest.approx(2 * read[1], rel=0.25) and read[1] == pytest.approx(read[2], rel=0.25)
    # counted as read: the examples of a window's rows still waiting to be emitted are counted already
    emitted = sum((b["labels"] >= 0).sum() for b in reference)
    assert emitted <= by_source[:, 0].sum() <= emitted + ROW.row_examples * 2
    iterator = iter(mixed())
    for _ in range(4):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    resumed = iter(mixed())
    resumed.set_state(state)
    assert all(_equal(next(resumed), b) for b in reference[4:10])
