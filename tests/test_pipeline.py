"""The grain pipeline: fixed-shape packed batches, counted skips, determinism across restored states."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from mrrm_jax.data import examples, packing, pipeline, records, synthetic
from mrrm_jax.models.molmo2 import Molmo2Config
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
    prepare = pipeline.PrepareExample(processor_dir, examples.Budget(1024, 512, max_frames=4), seed=3,
                                      media_root=corpus.parent, row=ROW)
    packing_config = pipeline.PackingConfig(ROW, (config.vision.num_patches, config.vision.patch_dim),
                                            rows_per_batch=2, window=window)
    return pipeline.batches(records.read_jsonl(corpus), prepare, packing_config, seed=3, num_epochs=num_epochs,
                            **kwargs)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_are_fixed_shape_and_count_every_example(corpus, processor_dir, tiny_models):
    batches = list(_batches(corpus, processor_dir, tiny_models))
    shapes = {k: v.shape for k, v in batches[0].items()}
    assert all({k: v.shape for k, v in b.items()} == shapes for b in batches)
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


def test_restored_iterator_continues_with_identical_batches(corpus, processor_dir, tiny_models):
    dataset = _batches(corpus, processor_dir, tiny_models, num_epochs=3, window=5)
    reference = list(dataset)
    for stop in (1, 4, len(reference) - 2):
        iterator = iter(dataset)
        for _ in range(stop):
            next(iterator)
        state = json.loads(json.dumps(iterator.get_state()))  # what Orbax stores
        resumed = iter(_batches(corpus, processor_dir, tiny_models, num_epochs=3, window=5))
        resumed.set_state(state)
        rest = list(resumed)
        assert len(rest) == len(reference) - stop
        assert all(_equal(a, b) for a, b in zip(rest, reference[stop:]))


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
        example.update(crops=np.zeros((1, crops, 1, 1), np.float32), pooling=np.zeros((1, crops, 9), np.int32))
    return {"example": example, "counts": pipeline.count_vector({})}


def _packed(items: list[dict], row: packing.RowBudget, window: int, epochs: int = 1) -> pipeline.PackedBatches:
    source = grain.MapDataset.source(items)
    if epochs > 1:  # a new order each epoch, as `pipeline.record_dataset`
        source = source.shuffle(seed=0).repeat(epochs)
    return pipeline.PackedBatches(source.to_iter_dataset(), pipeline.PackingConfig(row, (1, 1), 1, window))


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
    items[7] = items[50] = {"example": None, "counts": pipeline.count_vector({"bad_json": 1})}
    dataset = _packed(items, row, window=8, epochs=2)
    reference = list(dataset)
    # Every example exactly once per epoch, every skip counted (a row over a budget would not fit its arrays).
    labels = sorted(label for row_labels in _row_labels(reference) for label in row_labels)
    assert labels == sorted(2 * [n for n in range(120) if n not in (7, 50)])
    assert sum(int(b["counts"].sum()) for b in reference) == 4
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
        next(iterator)
    assert carried > len(reference) // 2  # the restores above re-read carried examples
