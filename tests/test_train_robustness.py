"""Training that no valid record can stop: awkward corpora, SIGTERM anywhere, damaged checkpoints."""

from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import signal

import numpy as np
import pytest

from mrrm_jax.training import checkpoints as run_checkpoints
from mrrm_jax.training import trainer
from mrrm_jax.data import pipeline, synthetic
from mrrm_jax.training.checkpoints import stop_on_sigterm
from tests.test_train import losses, small_config, train


def write_awkward_corpus(out: pathlib.Path) -> tuple[pathlib.Path, dict[str, str]]:
    """The demo corpus with valid records that are awkward to use; returns the JSONL and the skip
    reason each awkward record may get (None: it must train)."""
    demo = synthetic.write_corpus(out, num_images=12, num_videos=12, seed=5)
    rng = np.random.default_rng(0)
    image = synthetic.image_record(rng, out / "awkward.png")
    video = synthetic.video_record(rng, out / "awkward.mp4")
    awkward = {
        "nine_responses": ({**image, "responses": [f"It is colour {i}." for i in range(9)],
                            "rankings": list(range(1, 10))}, "too_large_for_row"),
        "sixty_crops": ({**image, "image": ["awkward.png"] * 30}, "vision_too_long"),
        # Dropped when it comes last in the shuffled order, else the record is too long even with 2 responses.
        "long_response": ({**image, "responses": image["responses"][:3] + ["word " * 30_000]}, "too_long"),
        "identical": ({**image, "responses": ["Same."] * 4, "rankings": [1, 1, 1, 1]}, None),
        "ties": ({**video, "rankings": [2, 2, 1, 1]}, None),
        "image_and_video": ({**image, "video": "awkward.mp4"}, "image_and_video"),
        "special_text": ({**image, "prompt": "Was ist das? 🎨 <|im_end|> <im_patch> <|resp_sep|>",
                          "responses": ["Rot 🔴 <|im_start|>", "绿色 <|endoftext|>", "<|resp_sep|> blue",
                                        "ünïcödé <im_col>"]}, None),
    }
    lines = demo.read_text().splitlines()
    for number, (record, _) in enumerate(awkward.values()):
        lines.insert(3 * number + 1, json.dumps(record))
    path = out / "awkward.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ids = {f"awkward.jsonl:{lines.index(json.dumps(record)) + 1}": reason for record, reason in awkward.values()}
    return path, ids


def awkward_config(corpus: pathlib.Path, **overrides):
    return small_config(**{"data.train": str(corpus), "data.eval": "", "data.num_workers": 0, "train.num_steps": 8,
                           "checkpoint.every_steps": 4, **overrides})


def skip_lines(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "skips.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    root = tmp_path_factory.mktemp("awkward")
    corpus, expected = write_awkward_corpus(root / "data")
    train(awkward_config(corpus), root / "straight")
    return corpus, expected, root / "straight"


def test_an_awkward_corpus_trains_to_the_end_with_every_skip_counted_and_named(awkward):
    corpus, expected, workdir = awkward
    assert sorted(losses(workdir)) == list(range(1, 9))
    assert all(np.isfinite(list(losses(workdir).values())))
    assert (workdir / trainer.REWARD_MODEL_DIR).is_dir()
    named = skip_lines(workdir)
    named_reasons = {line["record_id"]: line["reason"] for line in named}  # a record is read once per epoch
    assert all(expected.get(record_id) == reason for record_id, reason in named_reasons.items()), named_reasons
    always = {record_id for record_id, reason in expected.items() if reason and reason != "too_long"}
    assert always <= set(named_reasons)
    counts = json.loads([line for line in (workdir / "metrics.jsonl").read_text().splitlines()
                         if '"kind": "counts"' in line][-1])
    named_counts = collections.Counter(line["reason"] for line in named)
    skip_reasons = pipeline.COUNT_KEYS[: pipeline.COUNT_KEYS.index("crops_reduced")]
    assert {k: counts[k] for k in skip_reasons if counts[k]} == dict(named_counts)



def test_a_stopped_run_with_a_truncated_latest_checkpoint_falls_back_and_resumes_exactly(awkward, tmp_path,
                                                                                          monkeypatch, caplog):
    """SIGTERM at step 7 (checkpoints 4 and 7 then), step 7's arrays truncated: the resumed run warns,
    falls back to step 4 and trains steps 5-8 as the straight run did, skips named once each."""
    corpus, _, straight = awkward
    original, calls = trainer.to_global, []

    def sigterm_at_step_7(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "to_global", sigterm_at_step_7)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert train(awkward_config(corpus), tmp_path, stop_on_sigterm()) == {}
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    assert max(losses(tmp_path)) == 7
    for array_file in (tmp_path / "checkpoints" / "7" / "state").rglob("d/*"):
        array_file.write_bytes(array_file.read_bytes()[:8])
    with caplog.at_level(logging.WARNING, logger=run_checkpoints.__name__):
        train(awkward_config(corpus), tmp_path)
    assert "checkpoint step 7" in caplog.text and "unreadable" in caplog.text
    assert losses(tmp_path) == pytest.approx(losses(straight), rel=1e-6, abs=1e-7)
    assert skip_lines(tmp_path) == skip_lines(straight)
    assert (tmp_path / trainer.REWARD_MODEL_DIR).is_dir()


def test_a_corpus_whose_every_record_is_skipped_is_an_error_not_an_endless_run(tmp_path):
    corpus = synthetic.write_corpus(tmp_path / "data", num_images=4, num_videos=0, seed=0)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for image in (tmp_path / "data").glob("*.png"):  # every image a link out of the media root
        image.rename(outside / image.name)
        image.symlink_to(outside / image.name)
    with pytest.raises(pipeline.PipelineError, match="path_outside_root"):
        train(small_config(**{"data.train": str(corpus), "data.eval": "", "data.num_workers": 0}), tmp_path / "run")


def _sigterm_on_call(number: int, function):
    """`function`, sending this process SIGTERM when it is called the `number`-th time (after the call
    has started its work, e.g. an async save)."""
    calls = []

    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        calls.append(1)
        if len(calls) == number:
            os.kill(os.getpid(), signal.SIGTERM)
        return result
    return wrapped


@pytest.mark.slow
def test_sigterm_at_five_seeded_points_resumes_with_identical_losses(tmp_path, monkeypatch):
    """Points drawn with a seed: two training steps, inside a periodic and inside the final evaluation,
    and during an (async) checkpoint save. Each run is resumed to the end and must equal a straight run."""
    cfg = lambda: small_config(**{"eval.every_steps": 3, "eval.controls": ()})
    kinds = []  # what each `to_global` call of a straight run moved: a training step or an eval batch
    original_to_global = trainer.to_global
    monkeypatch.setattr(trainer, "to_global", lambda local, mesh, micro_steps=None: (
        kinds.append("eval" if micro_steps is None else "train"), original_to_global(local, mesh, micro_steps))[1])
    saves = []
    original_save = run_checkpoints.RunCheckpoints.save
    monkeypatch.setattr(run_checkpoints.RunCheckpoints, "save",
                        lambda self, *args, **kwargs: (saves.append(args[0]), original_save(self, *args, **kwargs))[1])
    reference = train(cfg(), tmp_path / "straight")
    monkeypatch.undo()
    reference_losses = losses(tmp_path / "straight")

    rng = np.random.default_rng(0)
    train_calls = [i + 1 for i, kind in enumerate(kinds) if kind == "train"]
    eval_calls = [i + 1 for i, kind in enumerate(kinds) if kind == "eval"]
    last_train = train_calls[-1]
    points = [("to_global", int(c)) for c in rng.choice(train_calls[1:-1], 2, replace=False)]
    points.append(("to_global", int(rng.choice([c for c in eval_calls if c < last_train]))))  # a periodic eval
    points.append(("to_global", int(rng.choice([c for c in eval_calls if c > last_train]))))  # the final eval
    points.append(("save", int(rng.integers(1, len(saves) + 1))))
    previous = signal.getsignal(signal.SIGTERM)
    for number, (where, call) in enumerate(points):
        workdir = tmp_path / f"point{number}"
        with monkeypatch.context() as patch:
            if where == "save":
                patch.setattr(run_checkpoints.RunCheckpoints, "save", _sigterm_on_call(call, original_save))
            else:
                patch.setattr(trainer, "to_global", _sigterm_on_call(call, original_to_global))
            try:
                assert train(cfg(), workdir, stop_on_sigterm()) == {}, (where, call)
            finally:
                signal.signal(signal.SIGTERM, previous)
        assert train(cfg(), workdir) == reference, (where, call)
        assert losses(workdir) == pytest.approx(reference_losses, rel=1e-6, abs=1e-7), (where, call)
