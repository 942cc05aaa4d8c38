"""`python -m mrrm_jax.prepare` on each source's release files (tests/release_files.py): every row becomes
the record or the counted skip written down for it by hand; bad input, resume, workers."""

from __future__ import annotations

import io
import json
import pathlib
import re
import subprocess
import sys

import pytest
from PIL import Image

from mrrm_jax.sources import beam_runner, conversion
from tests import release_files

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mrrm_jax.prepare", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def lines(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_against_expectations(out: pathlib.Path, dataset: str, expected: dict) -> None:
    records = {r["id"].split("/", 1)[1]: r for r in lines(out / "records.jsonl")}
    skips = lines(out / "skipped.jsonl")
    want_records = {k: v for k, v in expected.items() if v[0] == "record"}
    assert sorted(records) == sorted(want_records)
    for key, (_, responses, rankings, *prompt) in want_records.items():
        record = records[key]
        assert record["source"] == dataset
        permutation = record["permutation"]
        assert sorted(permutation) == list(range(len(responses)))
        assert record["responses"] == [responses[i] for i in permutation]
        assert record["rankings"] == [rankings[i] for i in permutation]
        if prompt:
            assert record["prompt"] == prompt[0]
        assert "<image>" not in record["prompt"]
        for kind in ("image", "video"):
            if kind in record:
                path = out / record[kind]
                assert path.exists() and path.resolve().is_relative_to(out.resolve())
                if kind == "image":
                    Image.open(path).load()
    want_skips = {k: v[1] for k, v in expected.items() if v[0] == "skip"}
    assert len(skips) == len(want_skips)
    for key, reason in want_skips.items():
        named = [s for s in skips if re.search(rf"(^|[ (/]){re.escape(key)}([):]|$)", s["detail"] + " " + s["id"])]
        assert [s["skip"] for s in named] == [reason], (key, named)
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["records_read"] == len(expected)
    assert report["records_written"] == len(want_records)
    assert {k: v["count"] for k, v in report["skipped"].items()} == {
        r: list(want_skips.values()).count(r) for r in set(want_skips.values())}
    assert report["ties"]["pairwise_dropped"] == list(want_skips.values()).count("pairwise_tie")


@pytest.mark.parametrize("dataset", sorted(release_files.WRITERS))
def test_each_source_converts_as_released(dataset, tmp_path):
    input_path, media_root, expected = release_files.write(dataset, tmp_path / "release")
    out = tmp_path / "out"
    result = run_cli(f"--dataset={dataset}", f"--input={input_path}", f"--out={out}",
                     *([f"--media_root={media_root}"] if media_root else []))
    assert result.returncode == 0, result.stderr
    summary = [line for line in result.stderr.splitlines() if line.startswith("[prepare]")]
    assert len(summary) == 1 and f"read {len(expected)}," in summary[0]
    check_against_expectations(out, dataset, expected)


def test_mm_rlhf_reads_its_parquet_copy_the_same(tmp_path):
    root, _, expected = release_files.write("mm_rlhf", tmp_path / "release")
    out = tmp_path / "out"
    run = conversion.settings("mm_rlhf", str(root / "data" / "train-00000-of-00001.parquet"), str(out), str(root))
    conversion.prepare(run)
    check_against_expectations(out, "mm_rlhf", expected)
    video = next(r for r in lines(out / "records.jsonl") if "video" in r)
    assert video["sampling_interval"] == 0.5 and len(list((out / video["video"]).iterdir())) == 3


@pytest.mark.parametrize("label", ["better", "agree"])
def test_pku_saferlhf_label_option(label, tmp_path):
    root, _, expected = release_files.pku_saferlhf(tmp_path / "release", label=label)
    result = run_cli("--dataset=pku_saferlhf", f"--input={root}", f"--out={tmp_path / 'out'}", f"--option=label={label}")
    assert result.returncode == 0, result.stderr
    check_against_expectations(tmp_path / "out", "pku_saferlhf", expected)


def test_bad_input_is_one_error_line(tmp_path):
    root, _, _ = release_files.write("rlaif_v", tmp_path / "release")
    cases = {
        "--dataset=rlaif": ["--dataset=rlaif", f"--input={root}", f"--out={tmp_path / 'a'}"],
        "missing input": ["--dataset=rlaif_v", f"--input={tmp_path / 'nowhere'}", f"--out={tmp_path / 'b'}"],
        "bad option": ["--dataset=pku_saferlhf", f"--input={root}", f"--out={tmp_path / 'c'}", "--option=label=kind"],
    }
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "RLAIF-V-Dataset_000.parquet").write_bytes(b"PAR1 not parquet at all")
    cases["unreadable parquet"] = ["--dataset=rlaif_v", f"--input={broken}", f"--out={tmp_path / 'd'}"]
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("mine")
    cases["foreign --out"] = ["--dataset=rlaif_v", f"--input={root}", f"--out={tmp_path / 'e'}"]
    for name, args in cases.items():
        result = run_cli(*args)
        assert result.returncode == 2, (name, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("error: "), (name, result.stderr)
        assert "Traceback" not in result.stderr


def test_an_interrupted_run_resumes_without_duplicates(tmp_path, monkeypatch):
    root, _, expected = release_files.write("wildvision", tmp_path / "release")
    whole = conversion.prepare(conversion.settings("wildvision", str(root), str(tmp_path / "whole")))
    monkeypatch.setattr(conversion, "CHUNK_ROWS", 2)
    saves = []

    def save_then_die(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the second chunk's records are written, its state is not: a kill just then
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)
    real_save = conversion._save_state
    monkeypatch.setattr(conversion, "_save_state", save_then_die)
    run = conversion.settings("wildvision", str(root), str(tmp_path / "out"))
    with pytest.raises(KeyboardInterrupt):
        conversion.prepare(run)
    monkeypatch.setattr(conversion, "_save_state", real_save)
    assert len(lines(tmp_path / "out" / "records.jsonl")) == 2  # chunk 1's and chunk 2's records
    resumed = conversion.prepare(run)
    check_against_expectations(tmp_path / "out", "wildvision", expected)
    assert (tmp_path / "out" / "records.jsonl").read_text() == (tmp_path / "whole" / "records.jsonl").read_text()
    assert {k: resumed[k] for k in ("records_read", "skipped")} == {k: whole[k] for k in ("records_read", "skipped")}
    again = conversion.prepare(run)  # complete: left as it is
    assert again["records_written"] == whole["records_written"]
    assert len(lines(tmp_path / "out" / "records.jsonl")) == whole["records_written"]
    with pytest.raises(conversion.PrepareError, match="other arguments .*seed"):
        conversion.prepare(conversion.settings("wildvision", str(root), str(tmp_path / "out"), seed=1))


def test_workers_give_the_same_records_in_the_same_order(tmp_path):
    root, _, _ = release_files.write("llava_critic", tmp_path / "release")
    one = conversion.prepare(conversion.settings("llava_critic", str(root), str(tmp_path / "one")))
    two = conversion.prepare(conversion.settings("llava_critic", str(root), str(tmp_path / "two")), workers=2)
    assert (tmp_path / "one" / "records.jsonl").read_text() == (tmp_path / "two" / "records.jsonl").read_text()
    assert one["skipped"] == two["skipped"]


def test_limit_and_seed(tmp_path):
    root, _, _ = release_files.write("nectar", tmp_path / "release")
    assert conversion.prepare(conversion.settings("nectar", str(root), str(tmp_path / "a"), limit=1))["records_read"] == 1
    orders = []
    for seed in (0, 1):
        conversion.prepare(conversion.settings("nectar", str(root), str(tmp_path / f"seed{seed}"), seed=seed))
        orders.append(lines(tmp_path / f"seed{seed}" / "records.jsonl")[0]["permutation"])
    assert orders[0] != orders[1]


def test_embedded_images_are_written_once_per_content(tmp_path):
    root, _, _ = release_files.write("rlaif_v", tmp_path / "release")  # r1 and r2 share their picture
    report = conversion.prepare(conversion.settings("rlaif_v", str(root), str(tmp_path / "out")))
    records = lines(tmp_path / "out" / "records.jsonl")
    assert records[0]["image"] == records[1]["image"] and report["media_files_written"] == 1
    assert report["media_bytes_written"] == (tmp_path / "out" / records[0]["image"]).stat().st_size
    assert Image.open(io.BytesIO((tmp_path / "out" / records[0]["image"]).read_bytes())).size == (160, 120)


# -- decontamination -----------------------------------------------------------------------------------

def write_vl_rewardbench(path: pathlib.Path, items: list[tuple[str, str, bytes]]) -> None:
    """VL-RewardBench's parquet (data/test-00000-of-00001.parquet): its columns, the image embedded."""
    rows = [{"id": item_id, "query": query, "response": ["good", "bad"], "image": {"bytes": raw, "path": None},
             "human_ranking": [0, 1], "models": ["m1", "m2"], "judge": "human", "rationale": "",
             "query_source": "RLAIF-V", "ground_truth": ""} for item_id, query, raw in items]
    schema = release_files.pa.schema([
        ("id", release_files.pa.string()), ("query", release_files.pa.string()),
        ("response", release_files.pa.list_(release_files.pa.string())), ("image", release_files.IMAGE_TYPE),
        ("human_ranking", release_files.pa.list_(release_files.pa.int64())),
        ("models", release_files.pa.list_(release_files.pa.string())), ("judge", release_files.pa.string()),
        ("rationale", release_files.pa.string()), ("query_source", release_files.pa.string()),
        ("ground_truth", release_files.pa.string())])
    release_files.write_parquet(path, rows, schema)


def planted_release(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, dict]:
    """An RLAIF-V release with three rows that duplicate a VL-RewardBench item and three near misses:
    (release, benchmark file, {idx: (question, image bytes, the benchmark item it duplicates or None)})."""
    picture = release_files.picture
    colour, count = "What is the colour of the large ellipse?", "How many shapes are there?"
    bench = tmp_path / "vlrb" / "data" / "test-00000-of-00001.parquet"
    write_vl_rewardbench(bench, [("RLAIF-V_1", "<image>\n" + colour, release_files.encoded(picture(100))),
                                 ("RLAIF-V_2", count, release_files.encoded(picture(101)))])
    rows = {  # idx -> (question, image bytes, a duplicate of)
        "exact": (colour, release_files.encoded(picture(100)), "RLAIF-V_1"),
        "jpeg": ("  what is the COLOUR of the large ellipse ?? ", release_files.encoded(picture(100), "JPEG", quality=60),
                 "RLAIF-V_1"),
        "resized": (count, release_files.encoded(picture(101).resize((80, 60)), "JPEG", quality=85), "RLAIF-V_2"),
        "other_question": ("Describe the background gradient.", release_files.encoded(picture(100)), None),
        "other_image": (colour, release_files.encoded(picture(102)), None),
        "longer_question": ("How many shapes are there in the top half?", release_files.encoded(picture(101)), None),
    }
    release = tmp_path / "release"
    release_files.write_parquet(release / "RLAIF-V-Dataset_000.parquet",
                                [release_files.rlaif_v_row(idx, q, raw) for idx, (q, raw, _) in rows.items()],
                                release_files.RLAIF_SCHEMA)
    return release, bench, rows


def test_decontamination_drops_every_planted_duplicate_and_keeps_every_near_miss(tmp_path):
    release, bench, rows = planted_release(tmp_path)
    result = run_cli("--dataset=rlaif_v", f"--input={release}", f"--out={tmp_path / 'out'}", f"--decontaminate={bench}")
    assert result.returncode == 0, result.stderr
    kept = {r["id"].split("/")[1] for r in lines(tmp_path / "out" / "records.jsonl")}
    assert kept == {idx for idx, (_, _, duplicate) in rows.items() if duplicate is None}
    dropped = {s["id"].split("/")[1]: s for s in lines(tmp_path / "out" / "skipped.jsonl")}
    assert {idx: s["skip"] for idx, s in dropped.items()} == {idx: "contaminated" for idx, v in rows.items() if v[2]}
    for idx, skip in dropped.items():
        assert rows[idx][2] in skip["detail"]
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["decontamination"]["hits"]["vl_rewardbench"]["count"] == 3
    assert report["decontamination"]["indexed"] == {"vl_rewardbench": 2}
    assert "benchmark duplicates: vl_rewardbench 3" in result.stderr


def test_prepared_records_train_with_their_media(tmp_path):
    """The demo trainer reads a prepared directory as it is: images and a frame folder under media/, the
    frame folder's sampling interval, every record used (no skip of any kind)."""
    root, _, _ = release_files.write("mm_rlhf", tmp_path / "release")
    out = tmp_path / "out"
    conversion.prepare(conversion.settings("mm_rlhf", str(root), str(out)))
    done = subprocess.run([sys.executable, "-m", "mrrm_jax.train", "--config=configs/demo.py",
                           f"--workdir={tmp_path / 'run'}", f"--config.data.train={out / 'records.jsonl'}",
                           "--config.data.eval=", "--config.train.num_steps=2", "--config.log_every=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = lines(tmp_path / "run" / "metrics.jsonl")
    counts = [m for m in metrics if m["kind"] == "counts"][-1]
    assert not any(v for k, v in counts.items() if k not in ("step", "kind")), counts
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1, 2]


def test_the_demo_trains_on_a_mixture_of_three_prepared_sources(tmp_path):
    """data.mixture: three prepared fixtures mixed 2:1:1; metrics.jsonl counts each source's examples and
    skips at every logged step; a resumed run carries the counts on."""
    pairs = []
    for name, weight in (("mm_rlhf", 2.0), ("rlaif_v", 1.0), ("tulu", 1.0)):
        root, _, _ = release_files.write(name, tmp_path / name / "release")
        conversion.prepare(conversion.settings(name, str(root), str(tmp_path / "prepared" / name)))
        pairs.append((str(tmp_path / "prepared" / name), weight))
    config = tmp_path / "mix.py"
    config.write_text("from configs import demo\n\n\ndef get_config():\n    c = demo.get_config()\n"
                      f"    c.data.train = ''\n    c.data.eval = ''\n    c.data.mixture = {tuple(pairs)!r}\n"
                      "    c.train.num_steps = 2\n    c.log_every = 1\n    c.checkpoint.every_steps = 1\n    return c\n")

    def train(*extra):
        done = subprocess.run([sys.executable, "-m", "mrrm_jax.train", f"--config={config}",
                               f"--workdir={tmp_path / 'run'}", *extra], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return [m for m in lines(tmp_path / "run" / "metrics.jsonl") if m["kind"] == "train"]
    steps = train()
    for name in ("mm_rlhf", "rlaif_v", "tulu"):
        assert steps[-1][f"examples/{name}"] > 0 and steps[-1][f"skipped/{name}"] == 0
        assert steps[0][f"examples/{name}"] <= steps[-1][f"examples/{name}"]
    resumed = train("--config.train.num_steps=3")
    assert resumed[-1]["step"] == 3
    assert all(resumed[-1][f"examples/{n}"] >= steps[-1][f"examples/{n}"] for n in ("mm_rlhf", "rlaif_v", "tulu"))


# -- the Beam runner -----------------------------------------------------------------------------------

def same_outputs(one: pathlib.Path, other: pathlib.Path) -> None:
    for name in ("records.jsonl", "skipped.jsonl"):
        assert (one / name).read_bytes() == (other / name).read_bytes(), name
    reports = [json.loads((out / "prepare_report.json").read_text()) for out in (one, other)]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in reports[:1]] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in reports[1:]]
    assert sorted(p.relative_to(one) for p in one.rglob("*") if "media" in p.parts) == sorted(
        p.relative_to(other) for p in other.rglob("*") if "media" in p.parts)


def test_beam_direct_runner_writes_the_local_runners_files(tmp_path):
    """Every source, a release of several files (one of them empty), decontamination: the Beam pipeline's
    records, skips, report and media are the local runner's, byte for byte."""
    for dataset in sorted(release_files.WRITERS):
        root, media_root, _ = release_files.write(dataset, tmp_path / dataset / "release")
        media = str(media_root) if media_root else None
        conversion.prepare(conversion.settings(dataset, str(root), str(tmp_path / dataset / "local"), media))
        beam_runner.prepare(conversion.settings(dataset, str(root), str(tmp_path / dataset / "beam"), media), "direct", [])
        same_outputs(tmp_path / dataset / "local", tmp_path / dataset / "beam")
        assert not (tmp_path / dataset / "beam" / beam_runner.SHARDS_DIR).exists()
    release, bench, rows = planted_release(tmp_path / "planted")
    table = release_files.pq.read_table(release / "RLAIF-V-Dataset_000.parquet")
    for shard, (start, stop) in enumerate([(0, 2), (2, 2), (2, len(rows))]):
        release_files.pq.write_table(table.slice(start, stop - start), release / f"RLAIF-V-Dataset_{shard:03d}.parquet")
    for runner in ("local", "direct"):
        run = conversion.settings("rlaif_v", str(release), str(tmp_path / "planted" / runner), decontaminate=[str(bench)])
        report = conversion.prepare(run) if runner == "local" else beam_runner.prepare(run, runner, [])
        assert report["decontamination"]["hits"]["vl_rewardbench"]["count"] == 3
        assert report["records_read"] == len(rows)
    same_outputs(tmp_path / "planted" / "local", tmp_path / "planted" / "direct")


def test_beam_runner_resumes_per_file(tmp_path, monkeypatch):
    root, _, _ = release_files.write("pku_saferlhf", tmp_path / "release")
    rows = (root / "data" / "Alpaca-7B" / "train.jsonl").read_text().splitlines(keepends=True)
    (root / "data" / "Alpaca-7B" / "train.jsonl").write_text("".join(rows[:3]))
    (root / "data" / "Alpaca-7B" / "z_test.jsonl").write_text("".join(rows[3:]))
    conversion.prepare(conversion.settings("pku_saferlhf", str(root), str(tmp_path / "local")))
    run = conversion.settings("pku_saferlhf", str(root), str(tmp_path / "beam"))
    monkeypatch.setattr(beam_runner, "_merge", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed after the pipeline, before the files were joined
        beam_runner.prepare(run, "direct", [])
    monkeypatch.undo()
    shards = tmp_path / "beam" / beam_runner.SHARDS_DIR
    assert sorted(p.name for p in shards.glob("*.report.json")) == ["00000.report.json", "00001.report.json"]
    (shards / "00001.report.json").unlink()  # as if file 1's bundle had not finished
    with pytest.raises(conversion.PrepareError, match="--runner=beam"):  # the local runner leaves it alone
        conversion.prepare(run)
    real_read, marks = beam_runner._read_shard, tmp_path / "marks"
    marks.mkdir()

    def read_marked(item, dataset):  # runs pickled, maybe elsewhere: it leaves its mark on disk
        (marks / str(item[0])).touch()
        yield from real_read(item, dataset)
    monkeypatch.setattr(beam_runner, "_read_shard", read_marked)
    beam_runner.prepare(run, "direct", [])
    assert sorted(p.name for p in marks.iterdir()) == ["1"]  # file 0 was done
    same_outputs(tmp_path / "local", tmp_path / "beam")


def test_beam_runner_from_the_command_line(tmp_path):
    root, _, expected = release_files.write("llava_critic", tmp_path / "release")
    result = run_cli("--dataset=llava_critic", f"--input={root}", f"--out={tmp_path / 'out'}", "--runner=direct",
                     "--beam_option=--direct_num_workers=2", "--beam_option=--direct_running_mode=multi_processing")
    assert result.returncode == 0, result.stderr
    check_against_expectations(tmp_path / "out", "llava_critic", expected)
    for args, message in (
            (["--runner=spark_streaming"], "unknown --runner"), (["--runner=direct", "--limit=2"], "--limit"),
            (["--runner=direct", "--workers=2"], "direct_num_workers")):
        result = run_cli("--dataset=llava_critic", f"--input={root}", f"--out={tmp_path / 'bad'}", *args)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr
        assert "Traceback" not in result.stderr
