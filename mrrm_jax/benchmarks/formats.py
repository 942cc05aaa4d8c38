"""The benchmarks' release formats -> one record shape (`EvalRecord`), and how each is judged.

Every converter reads its benchmark's file with the field names exactly as released and yields, per
record, an `EvalRecord` (prompt, responses, rankings with 1 = best, category, media) or, for a record
that cannot be read, a `RecordError` naming the record and the field; only a file that cannot be read
at all raises `BenchmarkError`. Rules taken from the official scripts are noted where they are applied.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow.parquet as pq

from mrrm_jax.data import records


class BenchmarkError(Exception):
    """The benchmark file as a whole cannot be used."""


@dataclasses.dataclass
class EvalRecord:
    index: int  # position in the file: the resume key and the seed of its shuffle
    id: str
    category: str
    prompt: str
    responses: list[str]
    rankings: list[int]  # 1 = best, ties allowed
    media: dict  # `records.load_media`'s record: "image" name(s), "video" name, "fps"
    files: object  # where the media names resolve: `records.MediaDir` or `records.MediaBlobs`
    group: str | None = None  # MM-RLHF's question id, for Acc+
    video_files: int | None = None  # a benchmark's own sampling of a frame directory (MM-RLHF: 32)


@dataclasses.dataclass
class RecordError:
    index: int
    id: str
    error: str


@dataclasses.dataclass(frozen=True)
class Benchmark:
    read: Callable[..., Iterator[EvalRecord | RecordError]]
    headline: str  # "overall" (micro) or "macro" (mean over categories)
    metric: str  # the headline's name, as the paper's column reads
    paper: float | None  # the paper's Molmo2-4B multi-response RM on this benchmark, as a fraction
    rank_metrics: bool = False  # pairwise accuracy over ranked pairs and Kendall tau (N > 2)
    acc_plus: bool = False


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}"
                         f" (record keys: {sorted(record)})")
    return value


def _ranked(responses, rankings, where: str, num_responses: int | None = None) -> tuple[list[str], list[int]]:
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise ValueError(f"{where}: field 'responses' must be a list of strings")
    if num_responses is not None and len(responses) != num_responses:
        raise ValueError(f"{where}: {num_responses} responses expected, got {len(responses)}")
    if len(responses) < 2:
        raise ValueError(f"{where}: at least 2 responses are needed to judge, got {len(responses)}")
    if (not isinstance(rankings, list) or len(rankings) != len(responses)
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rankings)):
        raise ValueError(f"{where}: field 'rankings' must be {len(responses)} integers >= 1 (1 = best), "
                         f"got {rankings!r}")
    if len(set(rankings)) == 1:
        raise ValueError(f"{where}: rankings {rankings} prefer no response over another")
    return responses, rankings


def _records(read_one: Callable[[int, dict], EvalRecord], items: list) -> Iterator[EvalRecord | RecordError]:
    """Applies a per-record converter; a record it cannot convert becomes a `RecordError`."""
    for index, item in enumerate(items):
        record_id = str(item.get("id", item.get("ID", index))) if isinstance(item, dict) else str(index)
        try:
            if not isinstance(item, dict):
                raise ValueError(f"record {index}: not a JSON object")
            yield read_one(index, item)
        except (ValueError, TypeError, KeyError) as error:
            yield RecordError(index, record_id, str(error))


def _json_items(path: pathlib.Path) -> list:
    """A JSON list, a JSON object of lists (concatenated, as the authors' loader does), or JSON lines
    (a line that is not JSON stays a string and becomes that record's error)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise BenchmarkError(f"cannot read {path}: {error}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [record for _, record in records.read_jsonl(path)]
    if isinstance(data, dict):
        data = [item for value in data.values() if isinstance(value, list) for item in value]
    if not isinstance(data, list):
        raise BenchmarkError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


# -- VL-RewardBench: the HF parquet ---------------------------------------------------------------

# cal.py: the id's prefix (text before the first "_" or "-") -> dataset -> group; case-sensitive,
# anything else is vlfeedback ("hallucination" is POVID: the official "fix povid bug").
_VLRB_DATASETS = {"RLAIF": "rlaif-v", "RLHF": "rlhf-v", "mathverse": "reasoning_tasks", "mmmu": "reasoning_tasks",
                  "wildvision": "wildvision-battle", "hallucination": "povid"}
_VLRB_GROUPS = {"vlfeedback": "general", "wildvision-battle": "general", "povid": "hallucination",
                "rlhf-v": "hallucination", "rlaif-v": "hallucination", "reasoning_tasks": "reasoning"}


def vlrb_group(record_id: str) -> str:
    cuts = [i for i in (record_id.find("_"), record_id.find("-")) if i != -1]
    prefix = record_id[: min(cuts)] if cuts else record_id
    return _VLRB_GROUPS[_VLRB_DATASETS.get(prefix, "vlfeedback")]


def read_vl_rewardbench(path: pathlib.Path, media_root: pathlib.Path, field_map=None):
    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a file that is not parquet
        raise BenchmarkError(f"cannot read {path} as parquet: {error}") from error
    index = 0
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        try:
            rows = parquet.read_row_group(group).to_pylist()
        except Exception as error:  # one damaged row group: its rows are errors, the rest is read
            for offset in range(size):
                yield RecordError(index + offset, str(index + offset), f"row {index + offset} unreadable: {error}")
            index += size
            continue
        yield from (_vlrb_record(index + i, row, media_root) for i, row in enumerate(rows))
        index += size


def _vlrb_record(index: int, row: dict, media_root: pathlib.Path) -> EvalRecord | RecordError:
    record_id = str(row.get("id", index))
    where = f"row {index} (id {record_id})"
    try:
        ranking = row.get("human_ranking")
        if not isinstance(ranking, list) or not all(isinstance(h, int) for h in ranking):
            raise ValueError(f"{where}: field 'human_ranking' must be a list of integers, got {ranking!r}")
        # human_ranking is 0-based with 0 = preferred; ours is 1-based.
        responses, rankings = _ranked(row.get("response"), [h + 1 for h in ranking], where, num_responses=2)
        image = row.get("image") or {}
        if image.get("bytes"):
            media, files = {"image": "image"}, records.MediaBlobs({"image": image["bytes"]})
        elif image.get("path"):
            media, files = {"image": image["path"]}, records.MediaDir(media_root)
        else:
            raise ValueError(f"{where}: field 'image' has neither bytes nor a path")
        return EvalRecord(index, record_id, vlrb_group(record_id), _text(row, "query", where), responses, rankings,
                          media, files)
    except (ValueError, TypeError, AttributeError) as error:
        return RecordError(index, record_id, str(error))


# -- Multimodal RewardBench: all_data.json after the official downloader --------------------------

def mmrb_category(record_id: str, category: str) -> str:
    """2_get_accuracy.py: safety splits into bias (ID starts with "pairs") / toxicity, reasoning into
    math (ID starts with "math") / coding, both tests on the lower-cased ID."""
    if category == "safety":
        return "safety/bias" if record_id.lower().startswith("pairs") else "safety/toxicity"
    if category == "reasoning":
        return "reasoning/math" if record_id.lower().startswith("math") else "reasoning/coding"
    return category


def read_multimodal_rewardbench(path: pathlib.Path, media_root: pathlib.Path, field_map=None):
    files = records.MediaDir(media_root)

    def read_one(index: int, item: dict) -> EvalRecord:
        record_id = _text(item, "ID", f"record {index}")
        where = f"record {index} (ID {record_id})"
        better = item.get("Better")
        if better not in ("Output1", "Output2"):
            raise ValueError(f"{where}: field 'Better' must be \"Output1\" or \"Output2\", got {better!r}")
        responses, rankings = _ranked([item.get("Output1"), item.get("Output2")],
                                      [1, 2] if better == "Output1" else [2, 1], where)
        return EvalRecord(index, record_id, mmrb_category(record_id, _text(item, "Category", where)),
                          _text(item, "Text", where), responses, rankings,
                          {"image": _text(item, "Image", where)}, files)

    yield from _records(read_one, _json_items(path))


# -- MM-RLHF RewardBench: mm_reward_bench.jsonl ----------------------------------------------------

MMRLHF_KEYWORDS = ("mcq", "long", "short", "safety", "video")  # the official order: first match wins
MMRLHF_FRAMES = 32  # eval_mm_reward_bench.py: 32 files of a frame directory, np.linspace(..., dtype=int)
# A frame directory carries no frame rate and the official script writes no timestamps; Molmo2 needs
# one for its timestamp text. Our choice, overridden by a record's own `fps`.
FRAME_DIR_FPS = 1.0


def read_mm_rlhf_rewardbench(path: pathlib.Path, media_root: pathlib.Path, field_map=None):
    files = records.MediaDir(media_root)

    def read_one(index: int, item: dict) -> EvalRecord:
        record_id = str(item.get("id", index))
        where = f"line {index + 1} (id {record_id})"
        image, video = item.get("image"), item.get("video")
        if bool(image) == bool(video):
            raise ValueError(f"{where}: needs exactly one of the fields 'image' and 'video'")
        media_path = _text(item, "image" if image else "video", where)
        category = next((k for k in MMRLHF_KEYWORDS if k in media_path), "other")
        # The file always lists the preferred answer first (the official `rewards[0] > rewards[1]`).
        responses, rankings = _ranked([item.get("chosen"), item.get("rejected")], [1, 2], where)
        media = {"image": media_path} if image else {"video": media_path, "fps": item.get("fps") or FRAME_DIR_FPS}
        return EvalRecord(index, record_id, category, _text(item, "prompt", where), responses, rankings, media,
                          files, group=record_id, video_files=None if image else MMRLHF_FRAMES)

    yield from _records(read_one, _json_items(path))


def official_frame_files(files: list, count: int) -> list:
    """eval_mm_reward_bench.py: `count` files at np.linspace(0, n - 1, count, dtype=int) (truncated; a
    short directory repeats files)."""
    return [files[i] for i in np.linspace(0, len(files) - 1, count, dtype=int)]


# -- VideoRewardBench: pairs with a video; field names chosen by --field_map ------------------------

# Field -> candidate keys, first present wins; `--field_map=field:KEY,...` replaces a field's candidates.
VRB_FIELDS = {"prompt": ("prompt", "question", "query"), "chosen": ("chosen", "chosen_response", "response_chosen"),
              "rejected": ("rejected", "rejected_response", "response_rejected"),
              "video": ("video", "video_path", "video_file"), "category": ("dimension", "category", "task_type")}


def parse_field_map(text: str | None) -> dict[str, tuple[str, ...]]:
    fields = dict(VRB_FIELDS)
    for part in filter(None, (text or "").split(",")):
        name, sep, key = part.partition(":")
        if not sep or name not in VRB_FIELDS or not key:
            raise BenchmarkError(f"--field_map entry {part!r}: expected FIELD:KEY with FIELD one of {list(VRB_FIELDS)}")
        fields[name] = (key,)
    return fields


def read_videorewardbench(path: pathlib.Path, media_root: pathlib.Path, field_map=None):
    fields, files = parse_field_map(field_map), records.MediaDir(media_root)

    def read_one(index: int, item: dict) -> EvalRecord:
        values = {}
        for name, keys in fields.items():
            key = next((k for k in keys if item.get(k) is not None), None)
            if key is None:
                raise ValueError(f"record {index}: no {name} field (tried {list(keys)}); the record's keys are "
                                 f"{sorted(item)}: pass --field_map={name}:KEY")
            values[name] = item[key]
        record_id = str(item.get("id", index))
        where = f"record {index} (id {record_id})"
        responses, rankings = _ranked([values["chosen"], values["rejected"]], [1, 2], where)
        if not isinstance(values["prompt"], str) or not isinstance(values["video"], str):
            raise ValueError(f"{where}: the prompt and the video path must be strings")
        media = {"video": values["video"], **({"fps": item["fps"]} if item.get("fps") else {})}
        return EvalRecord(index, record_id, str(values["category"]), values["prompt"], responses, rankings,
                          media, files)

    yield from _records(read_one, _json_items(path))


# -- MR2Bench and any file in the authors' schema --------------------------------------------------

# The authors' loader spaces a frame directory's timestamps by the record's `sampling_interval`, else
# its `fps` (sic), else 4.0 seconds; a video file keeps its own frame rate.
AUTHORS_FRAME_INTERVAL_S = 4.0


def read_jsonl(path: pathlib.Path, media_root: pathlib.Path, field_map=None):
    """MR2Bench and any file in the authors' schema: N >= 2 responses. MR2Bench's 4-response variants are
    judged as released (never re-sampled from a full ranking); a full ranking (8 image responses, more
    for video) is judged best-of-N with the ranking metrics beside it."""
    files = records.MediaDir(media_root)

    def read_one(index: int, item: dict) -> EvalRecord:
        record_id = str(item.get("id", index))
        where = f"record {index} (id {record_id})"
        responses, rankings = _ranked(item.get("responses"), item.get("rankings"), where)
        prompt = item.get("prompt") or item.get("question", "")  # the authors' loader falls back the same way
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: field 'prompt' must be a string")
        media = {k: item[k] for k in ("image", "video", "fps", "sampling_interval") if item.get(k) is not None}
        if isinstance(media.get("video"), str) and "fps" not in media and "sampling_interval" not in media \
                and (pathlib.Path(media_root) / media["video"]).is_dir():
            media["sampling_interval"] = AUTHORS_FRAME_INTERVAL_S
        kind = "video" if "video" in media else "image" if "image" in media else "text"
        return EvalRecord(index, record_id, str(item.get("category", kind)), prompt, responses, rankings, media,
                          files)

    yield from _records(read_one, _json_items(path))


BENCHMARKS = {
    "vl_rewardbench": Benchmark(read_vl_rewardbench, "macro", "macro accuracy over general / hallucination / "
                                "reasoning", 0.822),
    "multimodal_rewardbench": Benchmark(read_multimodal_rewardbench, "overall", "overall accuracy", 0.732),
    "mm_rlhf_rewardbench": Benchmark(read_mm_rlhf_rewardbench, "overall", "accuracy", 0.924, acc_plus=True),
    # VideoRewardBench's own paper reports "Overall" as micro accuracy (its per-dimension figures and
    # counts give it); the macro mean over the five dimensions is reported beside it.
    "videorewardbench": Benchmark(read_videorewardbench, "overall", "overall (micro) pairwise accuracy", 0.663),
    "mr2bench_image": Benchmark(read_jsonl, "overall", "best-of-N accuracy (best-of-4 on the 4-response release)",
                                0.625, rank_metrics=True),
    "mr2bench_video": Benchmark(read_jsonl, "overall", "best-of-N accuracy (best-of-4 on the 4-response release)",
                                0.507, rank_metrics=True),
    "jsonl": Benchmark(read_jsonl, "overall", "best-of-N accuracy", None, rank_metrics=True),
}


def read(name: str, path: pathlib.Path, media_root: pathlib.Path | None = None, field_map: str | None = None):
    """(the benchmark's spec, its records and record errors in file order)."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown --benchmark {name!r}; one of {', '.join(BENCHMARKS)}")
    path = pathlib.Path(path)
    if not path.is_file():
        raise BenchmarkError(f"--data {path} is not a file")
    spec = BENCHMARKS[name]
    return spec, list(spec.read(path, pathlib.Path(media_root) if media_root else path.parent, field_map))
