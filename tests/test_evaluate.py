"""Evaluation: metrics against hand-computed values, every release format end to end, orders, resume,
data-parallel scoring on 8 simulated devices, and the command line's errors.

No test imports a command-line module (`mrrm_jax.evaluate`, `mrrm_jax.score`): each defines its absl
flags, and two of them in one process would define `--checkpoint` twice."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mrrm_jax.benchmarks import formats, metrics, runner
from mrrm_jax.data import collate, media
from tests import benchmark_files

# -- metrics, by hand ------------------------------------------------------------------------------


def test_a_record_is_correct_only_when_the_best_response_scores_strictly_highest():
    assert metrics.top_correct([0.3, 0.1], [1, 2]) and not metrics.top_correct([0.1, 0.3], [1, 2])
    assert not metrics.top_correct([0.2, 0.2], [1, 2])  # a tie is wrong, as the official scripts count it
    assert metrics.top_correct([0.1, 0.9, 0.5, 0.2], [2, 1, 1, 4])  # argmax is one of the tied best
    assert metrics.top_correct([0.1, 0.4, 0.9, 0.2], [2, 1, 1, 4])
    assert not metrics.top_correct([0.9, 0.9, 0.1, 0.1], [1, 2, 3, 4])  # tied with a worse response
    assert metrics.margin([0.1, 0.9, 0.5, 0.2], [2, 1, 1, 4]) == pytest.approx(0.9 - 0.2)
    with pytest.raises(ValueError, match="non-finite"):
        metrics.top_correct([np.nan, 0.1], [1, 2])
    with pytest.raises(ValueError, match="prefer no response"):
        metrics.top_correct([0.1, 0.2], [1, 1])


def test_ranked_pairs_and_kendall_tau_by_hand():
    # Pairs (0,1) (0,2) (0,3) (2,3) are ordered as the human orders them; (1,2) (1,3) are not.
    assert metrics.ranked_pairs([4, 1, 3, 2], [1, 2, 3, 4]) == (4, 6)
    assert metrics.kendall_tau([4, 1, 3, 2], [1, 2, 3, 4]) == pytest.approx((4 - 2) / 6)
    # A tie in the ranking is no pair: 5 pairs, 3 concordant, 2 discordant; tau-b = 1 / sqrt(6 * 5).
    assert metrics.ranked_pairs([4, 1, 3, 2], [1, 1, 3, 4]) == (3, 5)
    assert metrics.kendall_tau([4, 1, 3, 2], [1, 1, 3, 4]) == pytest.approx(1 / math.sqrt(30))
    assert metrics.kendall_tau([1, 1, 1, 1], [1, 2, 3, 4]) is None


def test_aggregates_by_hand():
    per_category = metrics.by_category([True, False, False, True, True], ["x", "x", "x", "y", "y"])
    assert per_category == {"x": {"accuracy": pytest.approx(1 / 3), "n": 3}, "y": {"accuracy": 1.0, "n": 2}}
    assert metrics.macro(per_category) == pytest.approx(2 / 3)
    assert metrics.acc_plus([True, True, False, True], ["a", "a", "b", "b"]) == 0.5
    low, high = metrics.bootstrap_interval([True] * 30 + [False] * 10)
    assert low < 0.75 < high and 0.5 < low and high < 0.95
    assert metrics.mean([]) is None


def test_official_category_rules():
    groups = {"RLAIF-V_1": "hallucination", "mathverse_2": "reasoning", "wildvision_3": "general",
              "hallucination_pair_4": "hallucination", "VLFeedback_5": "general", "mmmu-6": "reasoning",
              "RLHF_7": "hallucination", "rlaif_8": "general", "plain": "general"}
    assert {i: formats.vlrb_group(i) for i in groups} == groups
    assert formats.mmrb_category("pairs_3", "safety") == "safety/bias"
    assert formats.mmrb_category("Pairs_9", "safety") == "safety/bias"
    assert formats.mmrb_category("hateful_4", "safety") == "safety/toxicity"
    assert formats.mmrb_category("MathVista_5", "reasoning") == "reasoning/math"
    assert formats.mmrb_category("EMMA-Coding_6", "reasoning") == "reasoning/coding"
    assert formats.mmrb_category("vqa_7", "vqa") == "vqa"
    # eval_mm_reward_bench.py on a 10-file directory: linspace(0, 9, 32, dtype=int) repeats files.
    picked = formats.official_frame_files(list(range(10)), 32)
    assert len(picked) == 32 and picked[:8] == [0, 0, 0, 0, 1, 1, 1, 2] and picked[-1] == 9


def test_mr2bench_reads_a_full_ranking_as_released_and_videorewardbench_leads_with_micro(tmp_path):
    data, media_root, bad = benchmark_files.write("mr2bench_image", tmp_path / "bench")
    rows = json.loads(data.read_text())
    full = {**rows[0], "id": "mr2_full8", "responses": [f"answer {k}" for k in range(8)],
            "rankings": [3, 1, 8, 2, 5, 4, 7, 6]}  # the 8-model ranking the image release is built from
    data.write_text(json.dumps(rows + [full]))
    _, read = formats.read("mr2bench_image", data, media_root)
    by_id = {r.id: r for r in read}
    assert by_id["mr2_full8"].responses == full["responses"] and by_id["mr2_full8"].rankings == full["rankings"]
    assert len(by_id["mr2_0"].responses) == 4  # the 4-response variant as released, not re-sampled
    assert {r.id for r in read if isinstance(r, formats.RecordError)} == bad
    # VideoRewardBench's paper: "Overall" is the micro accuracy over its 1,563 pairs
    assert formats.BENCHMARKS["videorewardbench"].headline == "overall"


def test_geometric_buckets():
    assert [collate.geometric_bucket(n) for n in (0, 1, 2, 3, 4, 5, 7, 9, 13)] == [0, 1, 2, 3, 4, 6, 8, 12, 16]
    assert [collate.geometric_bucket(n, 128) for n in (1, 128, 129, 193, 300)] == [128, 128, 192, 256, 384]


# -- end to end ------------------------------------------------------------------------------------

def _lines(out_dir) -> list[dict]:
    return [json.loads(t) for t in (pathlib.Path(out_dir) / runner.SCORES_FILE).read_text().splitlines()]


def _raw_records(name, path) -> dict[str, dict]:
    """The file's records by id, read here without the converters."""
    if name == "vl_rewardbench":
        import pyarrow.parquet as pq
        return {r["id"]: r for r in pq.read_table(path).to_pylist()}
    if path.suffix == ".jsonl":
        rows = [json.loads(t) for t in path.read_text().splitlines() if t.startswith("{\"")]
    else:
        rows = json.loads(path.read_text())
    key = "ID" if name == "multimodal_rewardbench" else "id"
    return {str(r[key]): r for r in rows}


# What the official scripts prefer (index in the file's order), each from its own field.
PREFERRED = {"vl_rewardbench": lambda r: r["human_ranking"].index(0),
             "multimodal_rewardbench": lambda r: 0 if r["Better"] == "Output1" else 1,
             "mm_rlhf_rewardbench": lambda r: 0, "videorewardbench": lambda r: 0}
CATEGORIES = {
    "vl_rewardbench": {"RLAIF-V_1": "hallucination", "mathverse_2": "reasoning", "wildvision_3": "general",
                       "hallucination_pair_4": "hallucination", "VLFeedback_5": "general", "mmmu-6": "reasoning",
                       "RLHF_7": "hallucination", "rlaif_8": "general"},
    "multimodal_rewardbench": {"nocaps_1": "open_generation/correctness_task", "pairs_3": "safety/bias",
                               "visitbench_2": "open_generation/preference_task", "hatefulmemes_4": "safety/toxicity",
                               "mathvista_5": "reasoning/math", "EMMA-Coding_6": "reasoning/coding", "vqa_7": "vqa",
                               "knowledge_8": "knowledge"},
}


@pytest.mark.parametrize("name", list(benchmark_files.WRITERS))
def test_each_release_format_end_to_end(name, model, tmp_path):
    data, media_root, bad_ids = benchmark_files.write(name, tmp_path / "bench")
    result = runner.evaluate(model, name, data, tmp_path / "out", media_root=media_root, seed=3)
    lines = _lines(tmp_path / "out")
    raw = _raw_records(name, data)
    assert {line["id"] for line in lines if "error" in line} == bad_ids
    scored = [line for line in lines if "scores" in line]
    assert len(scored) == len(lines) - len(bad_ids) and result["num_errors"] == len(bad_ids)
    # Correctness and the headline recomputed here from the scores and the file's own fields.
    correct, categories = [], []
    for line in scored:
        record, scores = raw[line["id"]], np.asarray(line["scores"])
        if name in PREFERRED:
            preferred = PREFERRED[name](record)
            correct.append(bool(scores[preferred] > np.delete(scores, preferred).max()))
        else:
            rankings = np.asarray(record["rankings"])
            best = rankings == rankings.min()
            correct.append(bool(scores[best].max() > scores[~best].max()))
        assert line["correct"] == correct[-1]
        assert sorted(line["order"]) == list(range(len(scores)))
        categories.append(line["category"])
        if name in CATEGORIES:
            assert line["category"] == CATEGORIES[name][line["id"]]
    groups = {c: [ok for ok, cat in zip(correct, categories) if cat == c] for c in set(categories)}
    expected = {"overall": np.mean(correct), "macro": np.mean([np.mean(g) for g in groups.values()])}
    assert result["headline"]["value"] == pytest.approx(expected[formats.BENCHMARKS[name].headline])
    assert result["overall"] == pytest.approx(expected["overall"])
    assert result["paper"]["value"] == formats.BENCHMARKS[name].paper
    for file in ("report.json", "report.md", "accuracy_by_category.png", "score_margins.png",
                 "accuracy_by_position.png"):
        assert (tmp_path / "out" / file).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["headline"] == result["headline"]


def test_mm_rlhf_categories_acc_plus_and_official_frames(model, tmp_path):
    data, media_root, _ = benchmark_files.write("mm_rlhf_rewardbench", tmp_path / "bench")
    result = runner.evaluate(model, "mm_rlhf_rewardbench", data, tmp_path / "out", media_root=media_root)
    lines = {line["index"]: line for line in _lines(tmp_path / "out") if "scores" in line}
    assert [lines[i]["category"] for i in range(8)] == ["mcq", "long", "short", "safety", "mcq", "long", "video",
                                                        "video"]
    by_id = {}
    for line in lines.values():
        by_id.setdefault(line["group"], []).append(line["correct"])
    assert result["acc_plus"] == pytest.approx(np.mean([all(v) for v in by_id.values()]))
    # The 40-frame clip is read as the official 32 files (Molmo2's sampler then keeps all of them).
    _, metadata = media.load_video(media_root / "videos/video/clip1", fps=1.0,
                                   pick_files=lambda files: formats.official_frame_files(files, 32))
    assert metadata["total_num_frames"] == 32


def test_scores_are_those_of_the_model_on_the_order_it_saw(model, tmp_path):
    data, media_root, _ = benchmark_files.write("mr2bench_image", tmp_path / "bench")
    runner.evaluate(model, "mr2bench_image", data, tmp_path / "out", media_root=media_root, seed=5)
    raw = _raw_records("mr2bench_image", data)
    for line in [line for line in _lines(tmp_path / "out") if "scores" in line][:2]:
        record = raw[line["id"]]
        presented = [record["responses"][i] for i in line["order"]]
        image = media.load_image(media_root / record["image"])
        direct = model.score(record["prompt"], presented, images=[image])
        np.testing.assert_allclose(np.asarray(line["scores"])[line["order"]], direct, atol=1e-5)


def test_single_mode_scores_each_response_alone(model, tmp_path):
    data, media_root, _ = benchmark_files.write("jsonl", tmp_path / "bench")
    result = runner.evaluate(model, "jsonl", data, tmp_path / "out", media_root=media_root, mode="single")
    raw = _raw_records("jsonl", data)
    line = next(line for line in _lines(tmp_path / "out") if line["id"] == "t2")
    direct = model.score_single(raw["t2"]["prompt"], raw["t2"]["responses"])
    np.testing.assert_allclose(line["scores"], direct, atol=1e-5)
    assert result["settings"]["mode"] == "single"
    with pytest.raises(runner.EvaluationError, match="rotations needs --mode=multi"):
        runner.evaluate(model, "jsonl", data, tmp_path / "out2", order="rotations", mode="single")


def _permuted_copy(path: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """The same benchmark with each record's responses (and rankings) in another order."""
    records = json.loads(path.read_text())
    for n, record in enumerate(records):
        if len(record["responses"]) == 4:
            perm = [[3, 1, 0, 2], [1, 0, 3, 2], [2, 3, 1, 0]][n % 3]
            record["responses"] = [record["responses"][i] for i in perm]
            record["rankings"] = [record["rankings"][i] for i in perm]
    out.write_text(json.dumps(records))
    return out


def test_rotations_report_each_rotation_and_averaged_scores_ignore_the_file_order(model, tmp_path):
    data, media_root, _ = benchmark_files.write("mr2bench_image", tmp_path / "bench")
    result = runner.evaluate(model, "mr2bench_image", data, tmp_path / "out", media_root=media_root,
                               order="rotations")
    lines = [line for line in _lines(tmp_path / "out") if "scores" in line]
    rotations = result["rotations"]
    assert [r["n"] for r in rotations["per_rotation"]] == [5, 5, 5, 5] and rotations["passes_per_record"] == 4
    for shift, entry in enumerate(rotations["per_rotation"]):
        oks = [metrics.top_correct(line["rotation_scores"][shift], line["rankings"]) for line in lines]
        assert entry["accuracy"] == pytest.approx(np.mean(oks))
    for line in lines:
        np.testing.assert_allclose(line["scores"], np.mean(line["rotation_scores"], axis=0), rtol=1e-6)
    agree = [len({int(np.argmax(s)) for s in line["rotation_scores"]}) == 1 for line in lines]
    assert rotations["top1_agreement"] == pytest.approx(np.mean(agree))
    # Every response is seen once at every position: 4 passes of the 4 records with one best (mr2_2 has two).
    assert sum(entry["n"] for entry in result["by_position"].values()) == 4 * 4

    permuted = _permuted_copy(data, tmp_path / "bench" / "permuted.json")
    runner.evaluate(model, "mr2bench_image", permuted, tmp_path / "out_permuted", media_root=media_root,
                      order="rotations")
    original = {line["id"]: line for line in lines}
    raw_permuted = _raw_records("mr2bench_image", permuted)
    raw_original = _raw_records("mr2bench_image", data)
    for line in [line for line in _lines(tmp_path / "out_permuted") if "scores" in line]:
        by_text = dict(zip(raw_permuted[line["id"]]["responses"], line["scores"]))
        expected = original[line["id"]]["scores"]
        got = [by_text[text] for text in raw_original[line["id"]]["responses"]]
        np.testing.assert_allclose(got, expected, atol=1e-5)


def _rounded(value):
    """`value` (a report) with every float to 5 significant digits."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return float(f"{value:.5g}") if isinstance(value, float) else value


def test_a_killed_run_resumes_to_the_same_report(model, tmp_path):
    data, media_root, _ = benchmark_files.write("multimodal_rewardbench", tmp_path / "bench")
    full = runner.evaluate(model, "multimodal_rewardbench", data, tmp_path / "out", media_root=media_root)
    scores_file = tmp_path / "out" / runner.SCORES_FILE
    lines = scores_file.read_text().splitlines()
    half = len(lines) // 2
    # What a kill leaves: the lines written so far and one cut short.
    scores_file.write_text("\n".join(lines[:half]) + "\n" + lines[half][: len(lines[half]) // 2])
    resumed = runner.evaluate(model, "multimodal_rewardbench", data, tmp_path / "out", media_root=media_root)
    kept = [json.loads(t) for t in lines[:half]]
    assert resumed["timing"]["records_scored_in_this_run"] == full["num_scored"] - sum("scores" in k for k in kept)
    # The same report; scores only to float32 noise (a record's batch neighbours, hence its row shape, differ).
    assert _rounded({k: v for k, v in resumed.items() if k != "timing"}) == _rounded(
        {k: v for k, v in full.items() if k != "timing"})
    with pytest.raises(runner.EvaluationError, match="other settings"):
        runner.evaluate(model, "multimodal_rewardbench", data, tmp_path / "out", media_root=media_root,
                          order="as_is")


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "mrrm_jax.evaluate", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=pathlib.Path(__file__).parent.parent)


def test_eight_devices_score_as_one_through_the_command_line(model, tiny_reward_dir, tmp_path):
    data, media_root, _ = benchmark_files.write("mr2bench_image", tmp_path / "bench")
    one = runner.evaluate(model, "mr2bench_image", data, tmp_path / "one", media_root=media_root,
                            order="rotations")
    done = _cli(f"--checkpoint={tiny_reward_dir}", "--benchmark=mr2bench_image", f"--data={data}",
                f"--media_root={media_root}", f"--output={tmp_path / 'eight'}", "--order=rotations",
                env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "best-of-N accuracy" in done.stdout
    eight = json.loads((tmp_path / "eight" / "report.json").read_text())
    assert eight["timing"]["devices"] == 8 and one["timing"]["devices"] == 1
    assert 1 <= eight["timing"]["compiled_programs"] <= 4
    by_index = {line["index"]: line for line in _lines(tmp_path / "one")}
    for line in _lines(tmp_path / "eight"):
        if "scores" in line:
            np.testing.assert_allclose(line["rotation_scores"], by_index[line["index"]]["rotation_scores"], atol=1e-5)
    for key in ("headline", "overall", "by_category", "by_position", "rotations", "pairwise_accuracy"):
        assert eight[key] == one[key], key
    assert eight["margins"]["mean"] == pytest.approx(one["margins"]["mean"], abs=1e-5)


def test_command_line_errors_are_one_line(model, tiny_reward_dir, tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    broken, out = f"--data={tmp_path / 'broken.parquet'}", f"--output={tmp_path / 'o'}"
    for args, last_line in [
        (["--benchmark=nope", f"--checkpoint={tiny_reward_dir}", broken, out],
         "error: unknown --benchmark 'nope'; one of " + ", ".join(formats.BENCHMARKS)),
        (["--benchmark=jsonl", f"--checkpoint={tmp_path / 'none'}", broken, out],
         f"error: --checkpoint {tmp_path / 'none'} is not a directory"),
    ]:
        done = _cli(*args)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == last_line
    # What the command line turns into such a line, raised by the library.
    with pytest.raises(formats.BenchmarkError, match="as parquet"):
        runner.evaluate(model, "vl_rewardbench", tmp_path / "broken.parquet", tmp_path / "o")
    with pytest.raises(formats.BenchmarkError, match="is not a file"):
        runner.evaluate(model, "jsonl", tmp_path / "none.jsonl", tmp_path / "o")
