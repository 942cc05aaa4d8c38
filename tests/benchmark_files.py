"""Small benchmark files in each release's format (field names and file types as released), with
their media, and a few bad records each. `write(name, root)` -> (data path, media root, bad ids)."""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mrrm_jax.data import media

ANSWERS = ["A red square.", "A blue circle on grey.", "Two green lines.", "Nothing is shown."]


def image(seed: int, size=(96, 72)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(seed: int, size=(96, 72)) -> bytes:
    buffer = io.BytesIO()
    image(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


def frame_dir(path: pathlib.Path, count: int, seed: int) -> None:
    path.mkdir(parents=True)
    for i in range(count):
        image(seed * 100 + i, (64, 48)).save(path / f"frame_{i:03d}.jpg")


def vl_rewardbench(root: pathlib.Path):
    ids = ["RLAIF-V_1", "mathverse_2", "wildvision_3", "hallucination_pair_4", "VLFeedback_5", "mmmu-6",
           "RLHF_7", "rlaif_8"]
    rows = [dict(id=i, query=f"Question {n}: what is shown?", response=[ANSWERS[n % 4], ANSWERS[(n + 1) % 4]],
                 image={"bytes": png_bytes(n, (80 + 8 * n, 60)), "path": f"{i}.png"},
                 human_ranking=[n % 2, 1 - n % 2], models=["m1", "m2"], judge="human", rationale="",
                 query_source="src", ground_truth="") for n, i in enumerate(ids)]
    rows.append({**rows[0], "id": "RLAIF-V_bad_ranking", "human_ranking": [0, 1, 2]})
    rows.append({**rows[1], "id": "mathverse_bad_image", "image": {"bytes": b"not an image", "path": "x.png"}})
    path = root / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    return path, root, {"RLAIF-V_bad_ranking", "mathverse_bad_image"}


def multimodal_rewardbench(root: pathlib.Path):
    specs = [("nocaps_1", "open_generation/correctness_task"), ("visitbench_2", "open_generation/preference_task"),
             ("pairs_3", "safety"), ("hatefulmemes_4", "safety"), ("mathvista_5", "reasoning"),
             ("EMMA-Coding_6", "reasoning"), ("vqa_7", "vqa"), ("knowledge_8", "knowledge")]
    records = []
    for n, (record_id, category) in enumerate(specs):
        name = f"images/{record_id.split('_')[0]}/{n}.jpg"
        (root / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        image(10 + n).save(root / "data" / name)
        records.append({"ID": record_id, "Text": f"Judge question {n}.", "Image": name, "Output1": ANSWERS[n % 4],
                        "Output2": ANSWERS[(n + 2) % 4], "Better": "Output1" if n % 3 else "Output2",
                        "Category": category})
    records.append({**records[0], "ID": "nocaps_bad_better", "Better": "Output3"})
    records.append({**records[1], "ID": "nocaps_missing_image", "Image": "images/nocaps/none.jpg"})
    path = root / "data" / "all_data.json"
    path.write_text(json.dumps(records))
    return path, root / "data", {"nocaps_bad_better", "nocaps_missing_image"}


def mm_rlhf_rewardbench(root: pathlib.Path):
    lines = []
    for n, kind in enumerate(["mcq", "long", "short", "safety", "mcq", "long"]):
        name = f"images/{kind}/{n}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image(20 + n).save(root / name)
        lines.append({"id": f"q{n // 2}", "prompt": f"Question {n}?", "chosen": ANSWERS[n % 4],
                      "rejected": ANSWERS[(n + 1) % 4], "chosen_reason": "", "rejected_reason": "", "image": name})
    for n in range(2):
        frame_dir(root / "videos" / "video" / f"clip{n}", 10 + 30 * n, 30 + n)
        lines.append({"id": "qv", "prompt": "What happens in the video?", "chosen": ANSWERS[n],
                      "rejected": ANSWERS[n + 2], "chosen_reason": "", "rejected_reason": "",
                      "video": f"videos/video/clip{n}"})
    path = root / "mm_reward_bench.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n")
    return path, root, {"8"}


def videorewardbench(root: pathlib.Path):
    records = []
    for n, dimension in enumerate(["long-form perception", "short-form perception", "knowledge", "reasoning",
                                   "safety", "reasoning"]):
        name = f"videos/{n}.mp4"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        frames = np.random.RandomState(40 + n).randint(0, 256, (6 + n, 48, 64, 3), dtype=np.uint8)
        media.write_mp4(root / name, frames, fps=2.0)
        records.append({"id": f"vrb{n}", "question": f"About the video {n}?", "chosen": ANSWERS[n % 4],
                        "rejected": ANSWERS[(n + 3) % 4], "video_path": name, "dimension": dimension})
    records.append({"id": "vrb_no_chosen", "question": "?", "rejected": "x", "video_path": "videos/0.mp4",
                    "dimension": "safety"})
    path = root / "videorewardbench.json"
    path.write_text(json.dumps(records))
    return path, root, {"vrb_no_chosen"}


def mr2bench(root: pathlib.Path, video: bool = False, num: int = 5):
    records = []
    for n in range(num):
        if video:
            name = f"videos/{n}.mp4"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            media.write_mp4(root / name, np.random.RandomState(60 + n).randint(0, 256, (5, 48, 64, 3), np.uint8), 2.0)
            medium = {"video": name}
        else:
            name = f"images/{n}.png"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            image(50 + n, (72 + 16 * n, 64)).save(root / name)
            medium = {"image": name}
        rankings = [[1, 2, 3, 4], [3, 1, 2, 4], [1, 1, 3, 4], [4, 3, 2, 1], [2, 2, 1, 3]][n % 5]
        records.append({"id": f"mr2_{n}", "prompt": f"Rank the answers to question {n}.",
                        "responses": [ANSWERS[(n + k) % 4] + f" ({k})" for k in range(4)], "rankings": rankings,
                        **medium})
    if video:  # a frame directory without fps or sampling_interval: the authors' 4 s spacing
        frame_dir(root / "videos" / "frames", 6, 70)
        records.append({**records[0], "id": "mr2_frames", "video": "videos/frames"})
    records.append({"id": "mr2_one", "prompt": "?", "responses": ANSWERS[:1], "rankings": [1]})
    records.append({"id": "mr2_all_tied", "prompt": "?", "responses": ANSWERS, "rankings": [1, 1, 1, 1]})
    path = root / ("mr2bench_video.json" if video else "mr2bench_image.json")
    path.write_text(json.dumps(records))
    return path, root, {"mr2_one", "mr2_all_tied"}


def jsonl(root: pathlib.Path):
    lines = [{"id": f"t{n}", "prompt": f"Text question {n}?", "responses": ANSWERS[: 2 + n % 3],
              "rankings": list(range(1, 3 + n % 3))[::-1] if n % 2 else list(range(1, 3 + n % 3))}
             for n in range(5)]
    lines.append({"id": "t_bad", "prompt": "?", "responses": ["one", "two"], "rankings": [1]})
    path = root / "records.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path, root, {"t_bad"}


WRITERS = {"vl_rewardbench": vl_rewardbench, "multimodal_rewardbench": multimodal_rewardbench,
           "mm_rlhf_rewardbench": mm_rlhf_rewardbench, "videorewardbench": videorewardbench,
           "mr2bench_image": mr2bench, "mr2bench_video": lambda root: mr2bench(root, video=True), "jsonl": jsonl}


def write(name: str, root: pathlib.Path):
    root.mkdir(parents=True, exist_ok=True)
    return WRITERS[name](root)
