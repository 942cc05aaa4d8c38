"""`score` and `evaluate` on 2 processes x 4 simulated CPU devices under `jax.distributed` (127.0.0.1),
against this process's own scoring: the same lines, scores to float32 noise, one joined output, and a
killed run's part files resumed (`mrrm_jax.scoring.shards`)."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
from PIL import Image

from mrrm_jax.benchmarks import runner
from mrrm_jax.scoring.reward_model import score_file
from tests import benchmark_files
from tests.test_multihost import Group, environment, free_port

PROCESSES, DEVICES_PER_PROCESS = 2, 4


def on_processes(module: str, args: list[str], logs: pathlib.Path) -> list[str]:
    """`python -m module args` on PROCESSES processes; their stdouts."""
    port = free_port()
    commands = [[sys.executable, "-m", module, *args, "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                 f"--num_processes={PROCESSES}", f"--process_id={i}"] for i in range(PROCESSES)]
    return Group(commands, environment(DEVICES_PER_PROCESS, port), logs).wait()


def lines(path: pathlib.Path) -> list[dict]:
    return [json.loads(text) for text in path.read_text().splitlines()]


def scoring_input(root: pathlib.Path) -> pathlib.Path:
    """Eleven records: images, text, video-free; two that fail (a missing image, no responses)."""
    root.mkdir()
    for seed in range(3):
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (90 + 10 * seed, 120, 3), np.uint8)).save(
            root / f"{seed}.png")
    records = [{"id": f"r{i}", "prompt": f"Question {i}?", "responses": [f"answer {j} to {i}" for j in range(2 + i % 3)],
                **({"image": f"{i % 3}.png"} if i % 2 else {})} for i in range(9)]
    records += [{"id": "missing", "prompt": "?", "responses": ["a", "b"], "image": "none.png"}, {"id": "bare"}]
    (root / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root / "in.jsonl"


def assert_same_lines(got: list[dict], want: list[dict]) -> None:
    assert [(g["index"], g.get("id"), "error" in g) for g in got] == [(w["index"], w.get("id"), "error" in w) for w in want]
    for g, w in zip(got, want):
        if "scores" in w:
            np.testing.assert_allclose(g["scores"], w["scores"], atol=1e-5, err_msg=str(w["index"]))


def test_multihost_scoring_score_matches_one_process_and_resumes_a_killed_run(model, tiny_reward_dir, tmp_path):
    data = scoring_input(tmp_path / "data")
    score_file(model, data, tmp_path / "one.jsonl")
    one = lines(tmp_path / "one.jsonl")
    args = [f"--checkpoint={tiny_reward_dir}", f"--input={data}", f"--output={tmp_path / 'two.jsonl'}"]
    on_processes("mrrm_jax.score", args, tmp_path / "logs_two")
    assert_same_lines(lines(tmp_path / "two.jsonl"), one)
    assert not list(tmp_path.glob("two.jsonl.part-*"))

    # What a kill of a 2-process run leaves: process 0 wrote records 0 and 2 and half of 4's line, process 1
    # nothing. The rerun keeps those two lines as written (marked here, so a rescored line would show).
    marked = [{**one[i], "scores": [7.0] * len(one[i]["scores"])} for i in (0, 2)]
    cut = json.dumps(one[4])[:20]
    (tmp_path / "resumed.jsonl.part-00000-of-00002").write_text("".join(json.dumps(m) + "\n" for m in marked) + cut)
    (tmp_path / "resumed.jsonl.part-00001-of-00002").write_text("")
    args[-1] = f"--output={tmp_path / 'resumed.jsonl'}"
    on_processes("mrrm_jax.score", args, tmp_path / "logs_resumed")
    resumed = lines(tmp_path / "resumed.jsonl")
    assert [resumed[0], resumed[2]] == marked
    assert_same_lines([r for r in resumed if r["index"] not in (0, 2)], [o for o in one if o["index"] not in (0, 2)])
    assert not list(tmp_path.glob("resumed.jsonl.part-*"))


def test_multihost_scoring_evaluate_matches_one_process(model, tiny_reward_dir, tmp_path):
    data, media_root, _ = benchmark_files.write("multimodal_rewardbench", tmp_path / "bench")
    one = runner.evaluate(model, "multimodal_rewardbench", data, tmp_path / "one", media_root=media_root)
    stdouts = on_processes("mrrm_jax.evaluate", [
        f"--checkpoint={tiny_reward_dir}", "--benchmark=multimodal_rewardbench", f"--data={data}",
        f"--media_root={media_root}", f"--output={tmp_path / 'two'}"], tmp_path / "logs")
    summaries = [[line for line in out.splitlines() if line.startswith("multimodal_rewardbench:")] for out in stdouts]
    assert len(summaries[0]) == 1 and summaries[1] == []  # process 0 reports
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["timing"]["processes"] == PROCESSES and two["timing"]["devices"] == PROCESSES * DEVICES_PER_PROCESS
    assert_same_lines(lines(tmp_path / "two" / runner.SCORES_FILE), lines(tmp_path / "one" / runner.SCORES_FILE))
    for key in ("headline", "overall", "by_category", "num_scored", "num_errors"):
        assert two[key] == one[key], key
    assert not list((tmp_path / "two").glob("*.part-*"))
