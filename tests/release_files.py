"""The ten training sources in their releases' file types and field names (docs/data.md), a few rows
each with the odd rows the releases have, and per row what the converter must make of it.

`write(name, root)` -> (--input path, --media_root or None, expected) where `expected` maps each row's
release id (or file:row position) to ("record", release responses, release rankings) or
("skip", reason).
"""

from __future__ import annotations

import io
import json
import pathlib
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def picture(seed: int, size=(160, 120)) -> Image.Image:
    """A smooth picture (gradient and a few shapes): what a perceptual hash is made for, unlike noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
    base = (np.stack([x, y, 1 - x], -1) * rng.uniform(60, 200, 3)).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.integers(0, size[0] - 30), rng.integers(0, size[1] - 30)
        box = [x0, y0, x0 + rng.integers(20, 60), y0 + rng.integers(20, 60)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def image_struct(seed: int | None, raw: bytes | None = None) -> dict:
    return {"bytes": raw if raw is not None else encoded(picture(seed)), "path": f"{seed}.png"}


def write_parquet(path: pathlib.Path, rows: list[dict], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def write_jsonl(path: pathlib.Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


BROKEN_IMAGE = b"\x89PNG\r\n\x1a\n not an image"
MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
TURNS = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))


# -- 1. MM-RLHF -----------------------------------------------------------------------------------------

def mm_rlhf(root: pathlib.Path):
    (root / "short").mkdir(parents=True)
    picture(1).save(root / "short" / "a.jpg")
    (root / "long").mkdir()
    picture(2).save(root / "long" / "b.jpg")
    for i in range(3):
        (root / "video" / "clip1").mkdir(parents=True, exist_ok=True)
        picture(10 + i, (64, 48)).save(root / "video" / "clip1" / f"{i + 1:06d}.jpg")
    (root / "video" / "empty").mkdir()
    base = {"faithfulness": None, "helpfulness": None, "ethical": None, "video": "", "image": ""}
    rows = [
        {**base, "id": "m1", "question": "<image>\nWhat is shown?", "image": "short/a.jpg",
         "models_output": ["a cat", "a dog", "a car"], "final_ranking": [2, 1, 3]},
        {**base, "id": "m2", "question": "What happens in the clip?", "video": "video/clip1",
         "models_output": ["w", "x", "y", "z"], "final_ranking": [1, 1, 3, 4]},  # an N-way tie: kept
        {**base, "id": "m3", "question": "Q3", "image": "short/a.jpg", "models_output": ["p", "q", "r"],
         "final_ranking": [1, 2]},  # ranks do not match the responses
        {**base, "id": "m4", "image": "short/a.jpg", "models_output": ["p", "q"], "final_ranking": [1, 2],
         "question": None},
        {**base, "id": "m5", "question": "Q5", "image": "short/missing.jpg", "models_output": ["p", "q"],
         "final_ranking": [1, 2]},
        {**base, "id": "m6", "question": "Q6", "image": "long/b.jpg", "models_output": ["p", "q", "r"],
         "final_ranking": None, "faithfulness": [3, 5, 1], "helpfulness": [3, 4, 1], "ethical": [3, 3, 1]},
        {**base, "id": "m7", "question": "Q7", "image": "long/b.jpg", "models_output": ["", "b", "c"],
         "final_ranking": [1, 2, 3]},  # the empty best answer goes with its rank
        {**base, "id": "m8", "question": "Q8", "video": "video/empty", "models_output": ["p", "q"],
         "final_ranking": [1, 2]},
    ]
    write_jsonl(root / "data.jsonl", [{k: v for k, v in r.items() if v is not None} for r in rows])
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("image", pa.string()), ("video", pa.string()),
                        ("models_output", pa.list_(pa.string())), ("final_ranking", pa.list_(pa.int64())),
                        *[(a, pa.list_(pa.float64())) for a in ("faithfulness", "helpfulness", "ethical")]])
    write_parquet(root / "data" / "train-00000-of-00001.parquet", rows, schema)
    expected = {"m1": ("record", ["a cat", "a dog", "a car"], [2, 1, 3]),
                "m2": ("record", ["w", "x", "y", "z"], [1, 1, 3, 4]),
                "m3": ("skip", "bad_rankings"), "m4": ("skip", "missing_field"), "m5": ("skip", "missing_file"),
                # means 3, 4, 1 -> dense ranks 2, 1, 3
                "m6": ("record", ["p", "q", "r"], [2, 1, 3]),
                "m7": ("record", ["b", "c"], [2, 3]), "m8": ("skip", "no_frames")}
    return root, None, expected


# -- 2. LLaVA-Critic-113K --------------------------------------------------------------------------------

CRITIC = ("Given an image and a corresponding question, please serve as an unbiased and fair judge to evaluate "
          "the quality of the answers provided by a Large Multimodal Model (LMM).\n"
          "Question: [{q}]\nThe first response: [{a}]\nThe second response: [{b}]\nASSISTANT:\n")


def llava_critic(root: pathlib.Path):
    def row(i, verdict, human=None, raw=None):
        human = human or CRITIC.format(q=f"<image>\nWhat colour is shape {i}?", a=f"red {i}", b=f"blue {i}")
        return {"id": f"vlfeedback_{i}", "source": "vlfeedback",
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": verdict}],
                "image": image_struct(i, raw)}
    shard0 = [row(1, "Both are fine. The better response: [first]. Because it is right."),
              row(2, "The better response: [B] since the second is accurate.")]
    shard1 = [row(3, "Response 1 is accurate and Response 2 too. Overall, two responses are equally good."),
              row(4, "I cannot decide."),
              row(5, "The better response: [1]", human="Question without the brackets"),
              row(6, "The better response: [second]", raw=BROKEN_IMAGE)]
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("conversations", TURNS), ("image", IMAGE_TYPE)])
    write_parquet(root / "pairwise" / "train-00000-of-00002.parquet", shard0, schema)
    write_parquet(root / "pairwise" / "train-00001-of-00002.parquet", shard1, schema)
    expected = {"vlfeedback_1": ("record", ["red 1", "blue 1"], [1, 2]),
                "vlfeedback_2": ("record", ["red 2", "blue 2"], [2, 1]),
                "vlfeedback_3": ("skip", "pairwise_tie"), "vlfeedback_4": ("skip", "unparseable_verdict"),
                "vlfeedback_5": ("skip", "unparseable_verdict"), "vlfeedback_6": ("skip", "bad_image")}
    return root, None, expected


# -- 3. RLAIF-V ----------------------------------------------------------------------------------------------

RLAIF_SCHEMA = pa.schema([("ds_name", pa.string()), ("image", IMAGE_TYPE), ("question", pa.string()),
                          ("chosen", pa.string()), ("rejected", pa.string()), ("origin_dataset", pa.string()),
                          ("origin_split", pa.string()), ("idx", pa.string()), ("image_path", pa.string())])


def rlaif_v_row(idx: str, question: str, raw: bytes, chosen="right", rejected="wrong") -> dict:
    return {"ds_name": "RLAIF-V", "image": {"bytes": raw, "path": f"{idx}.png"}, "question": question,
            "chosen": chosen, "rejected": rejected, "origin_dataset": "COCO",
            "origin_split": json.dumps({"type": "question answering"}), "idx": idx, "image_path": f"{idx}.png"}


def rlaif_v(root: pathlib.Path):
    write_parquet(root / "RLAIF-V-Dataset_000.parquet",
                  [rlaif_v_row("r1", "Describe the image.", encoded(picture(1)), "a blue sky", "a red car"),
                   rlaif_v_row("r2", "Describe it again.", encoded(picture(1)), "sky", "car")], RLAIF_SCHEMA)
    rows = [rlaif_v_row("r3", "What is here?", BROKEN_IMAGE), {**rlaif_v_row("r4", "Q", encoded(picture(2))),
                                                                "chosen": None},
            rlaif_v_row("r5", "Empty rejection", encoded(picture(3)), "fine", "  ")]
    write_parquet(root / "RLAIF-V-Dataset_001.parquet", rows, RLAIF_SCHEMA)
    expected = {"r1": ("record", ["a blue sky", "a red car"], [1, 2]), "r2": ("record", ["sky", "car"], [1, 2]),
                "r3": ("skip", "bad_image"), "r4": ("skip", "missing_field"), "r5": ("skip", "too_few_responses")}
    return root, None, expected


# -- 4. VLFeedback -------------------------------------------------------------------------------------------

def _completion(model: str, response: str, ratings: tuple) -> dict:
    aspects = ("Helpfulness", "Ethical Considerations", "Visual Faithfulness")
    return {"annotations": {a: {"Rating": r, "Rationale": "because"} for a, r in zip(aspects, ratings)},
            "model": model, "response": response}


def vlfeedback(root: pathlib.Path):
    rows = [
        {"id": "svit-conversation-1", "prompt": "What is on the table?", "models": ["m1", "m2", "m3", "m4"],
         "completions": [_completion("m1", "apples", ("5", "5", "4")), _completion("m2", "pears", ("3", "5", "1")),
                         _completion("m3", "nothing", ("N/A", "5", "5")), _completion("m4", "plums", ("3", "3", "3"))]},
        {"id": "svit-conversation-2", "prompt": "Tied?", "models": ["m1", "m2"],
         "completions": [_completion("m1", "x", ("4", "4", "4")), _completion("m2", "y", ("4", "4", "4"))]},
        {"id": "svit-conversation-3", "prompt": "No image", "models": ["m1", "m2"],
         "completions": [_completion("m1", "x", ("5", "4", "4")), _completion("m2", "y", ("1", "4", "4"))]},
        "not json {",
    ]
    write_jsonl(root / "vlfeedback_80k.jsonl", rows)
    with zipfile.ZipFile(root / "merged_images.zip", "w") as archive:
        for i in (1, 2):
            archive.writestr(f"merged_images/svit-conversation-{i}.jpg", encoded(picture(i), "JPEG"))
    # means 4.67, 3.0, (N/A dropped), 3.0 -> dense ranks 1, 2, 2
    expected = {"svit-conversation-1": ("record", ["apples", "pears", "plums"], [1, 2, 2]),
                "svit-conversation-2": ("skip", "pairwise_tie"), "svit-conversation-3": ("skip", "missing_file"),
                "vlfeedback_80k.jsonl:4": ("skip", "bad_json")}
    return root, None, expected


# -- 5. POVID ---------------------------------------------------------------------------------------------

def povid(root: pathlib.Path):
    coco = root / "coco" / "train2014"
    coco.mkdir(parents=True)
    picture(5).save(coco / "COCO_train2014_000000000005.jpg")

    def record(i, image):
        human = {"from": "human", "value": f"<image>\nDescribe picture {i} in detail."}
        return {"id": f"COCO_train2014_{i:012d}", "image": image,
                "conversations": [human, {"from": "gpt", "value": f"faithful {i}"}],
                "rejected_conversations": [human, {"from": "gpt", "value": f"hallucinated {i}"}]}
    rows = [record(5, "./data/coco/COCO_train2014_000000000005.jpg"),
            record(6, "./data/coco/COCO_train2014_000000000006.jpg"),
            {**record(7, "./data/coco/COCO_train2014_000000000005.jpg"), "rejected_conversations": []}]
    (root / "POVID_preference_data_for_VLLMs_version_1.json").write_text(json.dumps(rows))
    expected = {"COCO_train2014_000000000005": ("record", ["faithful 5", "hallucinated 5"], [1, 2]),
                "COCO_train2014_000000000006": ("skip", "missing_file"),
                "COCO_train2014_000000000007": ("skip", "missing_field")}
    return root / "POVID_preference_data_for_VLLMs_version_1.json", coco, expected


# -- 6. WildVision battles ---------------------------------------------------------------------------

def wildvision(root: pathlib.Path):
    def battle(i, winner, turns=1):
        a, b = [], []
        for t in range(turns):
            user = {"role": "user", "content": f"<image>\nquestion {i}.{t}"}
            a += [user, {"role": "assistant", "content": f"answer A {i}.{t}"}]
            b += [user, {"role": "assistant", "content": f"answer B {i}.{t}"}]
        return {"question_id": f"q{i}", "model_a": "ma", "model_b": "mb", "conversation_a": a, "conversation_b": b,
                "language": "English", "image": image_struct(i), "turn": turns, "anony": True, "winner": winner,
                "tstamp": 1700000000 + i, "judge": "arena_user"}
    rows = [battle(1, "model_a"), battle(2, "model_b"), battle(3, "tie"), battle(4, "tie (bothbad)"),
            battle(5, "model_a", turns=2), battle(6, "leftvote")]
    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    schema = pa.schema([("question_id", pa.string()), ("model_a", pa.string()), ("model_b", pa.string()),
                        ("conversation_a", message), ("conversation_b", message), ("language", pa.string()),
                        ("image", IMAGE_TYPE), ("turn", pa.int32()), ("anony", pa.bool_()), ("winner", pa.string()),
                        ("tstamp", pa.int32()), ("judge", pa.string())])
    write_parquet(root / "battle" / "test-00000-of-00002.parquet", rows[:4], schema)
    write_parquet(root / "battle" / "test-00001-of-00002.parquet", rows[4:], schema)
    expected = {"q1": ("record", ["answer A 1.0", "answer B 1.0"], [1, 2]),
                "q2": ("record", ["answer A 2.0", "answer B 2.0"], [2, 1]),
                "q3": ("skip", "pairwise_tie"), "q4": ("skip", "pairwise_tie"), "q5": ("skip", "multi_turn_battle"),
                "q6": ("skip", "bad_rankings")}
    return root, None, expected


# -- 7, 8. Tulu 3 and Skywork: chosen/rejected message lists --------------------------------------------

def _pair_rows(with_id: bool):
    def msgs(*pairs):
        return [{"role": r, "content": c} for r, c in pairs]
    rows = [
        (msgs(("user", "Name a colour."), ("assistant", "Blue.")), msgs(("user", "Name a colour."), ("assistant", "Seven."))),
        (msgs(("user", "Hi"), ("assistant", "Hello!"), ("user", "Add 2 and 2."), ("assistant", "4")),
         msgs(("user", "Hi"), ("assistant", "Hello!"), ("user", "Add 2 and 2."), ("assistant", "5"))),
        (msgs(("user", "A"), ("assistant", "B")), msgs(("user", "C"), ("assistant", "D"))),
    ]
    out = []
    for i, (chosen, rejected) in enumerate(rows):
        row = {"chosen": chosen, "rejected": rejected, "source": "magpie_ultra"}
        if with_id:
            row = {"id": f"t{i}", "prompt": chosen[-2]["content"], **row}
        out.append(row)
    return out


def tulu(root: pathlib.Path):
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("chosen", MESSAGES), ("rejected", MESSAGES),
                        ("source", pa.string())])
    write_parquet(root / "data" / "train-00000-of-00001.parquet", _pair_rows(True), schema)
    expected = {"t0": ("record", ["Blue.", "Seven."], [1, 2], "Name a colour."),
                "t1": ("record", ["4", "5"], [1, 2], "User: Hi\n\nAssistant: Hello!\n\nUser: Add 2 and 2."),
                "t2": ("skip", "context_mismatch")}
    return root, None, expected


def skywork(root: pathlib.Path):
    schema = pa.schema([("chosen", MESSAGES), ("rejected", MESSAGES), ("source", pa.string())])
    write_parquet(root / "data" / "train-00000-of-00001.parquet", _pair_rows(False), schema)
    name = "train-00000-of-00001.parquet"
    expected = {f"{name}:0": ("record", ["Blue.", "Seven."], [1, 2]), f"{name}:1": ("record", ["4", "5"], [1, 2]),
                f"{name}:2": ("skip", "context_mismatch")}
    return root, None, expected


# -- 9. Nectar ----------------------------------------------------------------------------------------------

def nectar(root: pathlib.Path):
    def answers(ranks):
        return [{"answer": f"answer ranked {r}", "model": f"model{i}", "rank": float(r)} for i, r in enumerate(ranks)]
    rows = [{"prompt": "\n\nHuman: How do I boil an egg?\n\nAssistant:", "answers": answers([1, 2, 3, 4, 5, 6, 7]),
             "turns": 1, "num_responses": 7, "source": ["anthropic-hh"], "good_natured": True},
            {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Tell a joke.\n\nAssistant:",
             "answers": answers([3, 1, 2, 7, 6, 5, 4]), "turns": 2, "num_responses": 7, "source": ["sharegpt"],
             "good_natured": True},
            {"prompt": "\n\nHuman: Bad ranks\n\nAssistant:", "answers": answers([1, 2.5, 3, 4, 5, 6, 7]), "turns": 1,
             "num_responses": 7, "source": ["lmsys"], "good_natured": False}]
    schema = pa.schema([("prompt", pa.string()),
                        ("answers", pa.list_(pa.struct([("answer", pa.string()), ("model", pa.string()),
                                                        ("rank", pa.float64())]))),
                        ("turns", pa.int64()), ("num_responses", pa.int64()), ("source", pa.list_(pa.string())),
                        ("good_natured", pa.bool_())])
    write_parquet(root / "data" / "rlaif.parquet", rows, schema)
    expected = {"rlaif.parquet:0": ("record", [f"answer ranked {r}" for r in range(1, 8)], list(range(1, 8)),
                                    "How do I boil an egg?"),
                "rlaif.parquet:1": ("record", [f"answer ranked {r}" for r in [3, 1, 2, 7, 6, 5, 4]],
                                    [3, 1, 2, 7, 6, 5, 4], "User: Hi\n\nAssistant: Hello.\n\nUser: Tell a joke."),
                "rlaif.parquet:2": ("skip", "bad_rankings")}
    return root, None, expected


# -- 10. PKU-SafeRLHF -----------------------------------------------------------------------------------------

def pku_row(i: int, better: int, safer: int) -> dict:
    harm = {"Psychological Harm": False, "Privacy Violation": i % 2 == 0}
    return {"prompt": f"prompt {i}", "response_0": f"zero {i}", "response_1": f"one {i}", "prompt_source": "Alpaca",
            "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca-7B", "is_response_0_safe": safer == 0,
            "is_response_1_safe": safer == 1, "response_0_harm_category": harm, "response_1_harm_category": harm,
            "response_0_severity_level": 0 if safer == 0 else 2, "response_1_severity_level": 0 if safer == 1 else 2,
            "better_response_id": better, "safer_response_id": safer}


def pku_saferlhf(root: pathlib.Path, label: str = "safer"):
    rows = [pku_row(0, 0, 0), pku_row(1, 1, 0), {**pku_row(2, 0, 1), "response_1": None}, pku_row(3, 0, 1)]
    write_jsonl(root / "data" / "Alpaca-7B" / "train.jsonl", rows)
    name = "train.jsonl"
    winners = {"safer": [0, 0, None, 1], "better": [0, 1, None, 0], "agree": [0, None, None, None]}[label]
    expected = {}
    for i, winner in enumerate(winners):
        key = f"{name}:{i + 1}"
        if i == 2:
            expected[key] = ("skip", "missing_field")
        elif winner is None:
            expected[key] = ("skip", "labels_disagree")
        else:
            expected[key] = ("record", [f"zero {i}", f"one {i}"], [1, 2] if winner == 0 else [2, 1])
    return root, None, expected


WRITERS = {"mm_rlhf": mm_rlhf, "llava_critic": llava_critic, "rlaif_v": rlaif_v, "vlfeedback": vlfeedback,
           "povid": povid, "wildvision": wildvision, "tulu": tulu, "skywork": skywork, "nectar": nectar,
           "pku_saferlhf": pku_saferlhf}


def write(name: str, root: pathlib.Path, **kwargs):
    root.mkdir(parents=True, exist_ok=True)
    return WRITERS[name](root, **kwargs)
