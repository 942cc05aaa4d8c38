"""The grain pipeline: fixed-shape packed batches, counted skips, determinism across restored states."""

from __future__ import annotations

import json

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
    prepare = pipeline.PrepareExample(processor_dir, config, examples.Budget(1024, 512, max_frames=4), seed=3,
                                      media_root=corpus.parent)
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
    kinds = np.concatenate([b["media_kind"][b["labels"] >= 0] for b in batches])
    assert (kinds == pipeline.MEDIA_KINDS.index("image")).sum() == 16
    assert (kinds == pipeline.MEDIA_KINDS.index("video")).sum() == 12
    # Each epoch shuffles records and response orders anew.
    first, second = batches[: len(batches) // 2], batches[len(batches) // 2:]
    assert not _equal(first[0], second[0])


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
