"""The ten training sources as released -> `Candidate`s, one reader and one converter per source.

Field names are the releases' own (docs/data.md lists each source's files, fields and rule). A reader
streams (position, row) pairs in a fixed order (sorted files, file order within), so a position is a
resume point; a converter turns one row into a `Candidate` or raises `Skip` naming the row and field.
Converters run in worker processes: they take plain data and return plain data.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import zipfile
from collections.abc import Callable, Iterator

from mrrm_jax.data.examples import Skip
from mrrm_jax.sources.common import (Candidate, dense_rank_descending, field, files, jsonl_rows, messages, pair,
                                     parquet_rows, ranks, render_turns, strip_placeholders)


@dataclasses.dataclass(frozen=True)
class Context:
    """What a converter may look at besides the row: the release's media tree and the --option values."""
    media_root: pathlib.Path
    options: dict


@dataclasses.dataclass(frozen=True)
class Source:
    shards: Callable[[pathlib.Path], list[pathlib.Path]]  # --input -> the release's row files, sorted
    rows: Callable[[list[pathlib.Path]], Iterator[tuple[str, object]]]  # those files -> (position, row)
    convert: Callable[[str, dict, Context], Candidate]
    options: dict = dataclasses.field(default_factory=dict)  # --option keys -> (default, allowed values or None)

    def read(self, path: pathlib.Path) -> Iterator[tuple[str, object]]:
        """Every row of the release at `path` (its folder, or one of its row files), in order."""
        return self.rows(self.shards(path))


def _matching(pattern: str) -> Callable[[pathlib.Path], list[pathlib.Path]]:
    return lambda path: files(path, pattern)


def _where(position: str, row: dict, key: str) -> str:
    """How a skip names the row: its position, and its release id when it has one."""
    return f"{position} ({key} {row[key]})" if row.get(key) not in (None, "") else position


def _row_id(row: dict, key: str, position: str) -> str:
    value = row.get(key)
    return str(value) if value not in (None, "") else position


def _image_bytes(row: dict, where: str) -> bytes:
    """An HF Image column: a parquet struct {bytes, path} with the bytes embedded."""
    image = row.get("image")
    if not isinstance(image, dict) or not isinstance(image.get("bytes"), bytes) or not image["bytes"]:
        raise Skip("missing_field", f"{where}: field 'image' must be an image struct with bytes")
    return image["bytes"]


def _under(root: pathlib.Path, name: str, where: str, name_field: str) -> pathlib.Path:
    path = root / name.lstrip("/")
    if not path.exists():
        raise Skip("missing_file", f"{where}: field {name_field!r} names {name!r}, not found under {root}")
    return path


# -- 1. MM-RLHF: data.jsonl (or its parquet copy), media unzipped under the root -------------------

def mm_rlhf_shards(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_dir() and (path / "data.jsonl").exists():
        return [path / "data.jsonl"]
    return files(path, "data/*.parquet")


def mm_rlhf_rows(paths: list[pathlib.Path]):
    return (parquet_rows if paths[0].suffix == ".parquet" else jsonl_rows)(paths)


MM_RLHF_ASPECTS = ("faithfulness", "helpfulness", "ethical")


def convert_mm_rlhf(position: str, row: dict, context: Context) -> Candidate:
    where = _where(position, row, "id")
    responses = field(row, "models_output", list, where)
    if row.get("final_ranking") is not None:
        rankings = ranks(row["final_ranking"], len(responses), where, "final_ranking")
    else:  # the card's fallback: a dense rank of the three aspect scores' mean
        scores = [_scores(row.get(a), len(responses), where, a) for a in MM_RLHF_ASPECTS]
        rankings = dense_rank_descending([sum(s) / len(s) for s in zip(*scores)])
    image, video = row.get("image") or None, row.get("video") or None
    if bool(image) == bool(video):
        raise Skip("missing_field", f"{where}: needs exactly one of the fields 'image' and 'video'")
    candidate = Candidate(_row_id(row, "id", position), strip_placeholders(field(row, "question", str, where)),
                          responses, rankings)
    if image:
        candidate.image, candidate.media_name = _under(context.media_root, image, where, "image"), image
    else:  # a frame folder; MM-RLHF's own training reads ShareGPTVideo frames at 2 fps
        candidate.video, candidate.media_name = _under(context.media_root, video, where, "video"), video
        candidate.extra["sampling_interval"] = float(context.options["sampling_interval"])
    return candidate


def _scores(value, count: int, where: str, name: str) -> list[float]:
    if not isinstance(value, list) or len(value) != count or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise Skip("bad_rankings", f"{where}: no 'final_ranking', and field {name!r} is not {count} numbers")
    return [float(v) for v in value]


# -- 2. LLaVA-Critic-113K: pairwise parquet, the answers and the verdict inside the judge's text ------

# The critic prompt quotes the question and both answers in square brackets; the verdict names the
# winner in brackets too, or calls the two "equally good" near its end (a tie).
_CRITIC_PROMPT = re.compile(r"Question: \[(?P<question>.*?)\]\s*\n\s*(?:Response 1|Response A|The first response): "
                            r"\[(?P<first>.*?)\]\s*\n\s*(?:Response 2|Response B|The second response): "
                            r"\[(?P<second>.*)\]", re.S)
_CRITIC_VERDICT = re.compile(r"The better response: \[(\w+)\]")
_FIRST, _SECOND = {"first", "1", "a"}, {"second", "2", "b"}
TIE_WINDOW_CHARS = 300  # "equally good" counts as the verdict only near the end of the judgment


def convert_llava_critic(position: str, row: dict, context: Context) -> Candidate:
    where = _where(position, row, "id")
    turns = messages(row.get("conversations"), where, "conversations", "from", "value")
    if len(turns) != 2 or not all(isinstance(text, str) for _, text in turns):
        raise Skip("missing_field", f"{where}: field 'conversations' must be one human and one gpt turn")
    judged = _CRITIC_PROMPT.search(turns[0][1].replace("<image>", ""))
    if judged is None:
        raise Skip("unparseable_verdict", f"{where}: the human turn does not quote a question and two responses")
    verdict = _CRITIC_VERDICT.search(turns[1][1])
    winner = verdict.group(1).lower() if verdict else None
    if winner in _FIRST | _SECOND:
        rankings = pair(winner in _FIRST)
    elif verdict is None and "equally good" in turns[1][1][-TIE_WINDOW_CHARS:]:
        rankings = [1, 1]
    else:
        raise Skip("unparseable_verdict", f"{where}: the gpt turn names no better response ({winner!r})")
    return Candidate(_row_id(row, "id", position), strip_placeholders(judged["question"]),
                     [judged["first"].strip(), judged["second"].strip()], rankings, image=_image_bytes(row, where))


# -- 3. RLAIF-V: parquet shards at the root, one chosen/rejected pair per row ------------------------

def convert_rlaif_v(position: str, row: dict, context: Context) -> Candidate:
    where = _where(position, row, "idx")
    return Candidate(_row_id(row, "idx", position), strip_placeholders(field(row, "question", str, where)),
                     [field(row, "chosen", str, where), field(row, "rejected", str, where)], [1, 2],
                     image=_image_bytes(row, where))


# -- 4. VLFeedback: vlfeedback_80k.jsonl + merged_images.zip (merged_images/<id>.jpg) -----------------

VLFEEDBACK_ZIP = "merged_images.zip"


def vlfeedback_rows(paths: list[pathlib.Path]):
    """Rows with their image's bytes from the zip beside the jsonl attached as `_image_bytes` (None when
    not there; the converter then looks under --media_root for an unzipped merged_images/)."""
    root = paths[0].parent
    images = zipfile.ZipFile(root / VLFEEDBACK_ZIP) if (root / VLFEEDBACK_ZIP).exists() else None
    try:
        members = set(images.namelist()) if images else set()
        for position, row in jsonl_rows(paths):
            if isinstance(row, dict):
                name = f"merged_images/{row.get('id')}.jpg"
                row["_image_bytes"] = images.read(name) if name in members else None
            yield position, row
    finally:
        if images:
            images.close()


def _completions(value, where: str) -> list[dict]:
    """The raw jsonl's list of completion objects, or `datasets`' dict of lists (run_dpo.py reads that)."""
    if isinstance(value, dict) and all(isinstance(v, list) for v in value.values()):
        value = [dict(zip(value, items)) for items in zip(*value.values())]
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise Skip("missing_field", f"{where}: field 'completions' must be a list of completions")
    return value


def _mean_rating(annotations, where: str) -> float | None:
    """run_dpo.py's score: the unweighted mean of every aspect's rating; None when one is not a number."""
    if not isinstance(annotations, dict) or not annotations:
        raise Skip("missing_field", f"{where}: a completion's 'annotations' must be a dict of aspects")
    try:
        return sum(float(aspect["Rating"]) for aspect in annotations.values()) / len(annotations)
    except (ValueError, TypeError, KeyError):
        return None


def convert_vlfeedback(position: str, row: dict, context: Context) -> Candidate:
    record_id = field(row, "id", str, position)
    where = _where(position, row, "id")
    responses, means, events = [], [], []
    for completion in _completions(row.get("completions"), where):
        mean = _mean_rating(completion.get("annotations"), where)
        if mean is None or not isinstance(completion.get("response"), str):
            events.append("completion_without_numeric_rating")
            continue
        responses.append(completion["response"])
        means.append(mean)
    image = row.get("_image_bytes") or _under(context.media_root, f"merged_images/{record_id}.jpg", where, "id")
    return Candidate(record_id, strip_placeholders(field(row, "prompt", str, where)), responses,
                     dense_rank_descending(means), image=image, events=events)


# -- 5. POVID: one JSON array; images are COCO train2014 files under --media_root ---------------------

def povid_rows(paths: list[pathlib.Path]):
    for path_ in paths:
        try:
            rows = json.loads(path_.read_text())  # ~21 MB of text, no media: read whole
        except json.JSONDecodeError as error:
            raise ValueError(f"{path_} is not a JSON array ({error})") from error
        if not isinstance(rows, list):
            raise ValueError(f"{path_}: expected a JSON array of records, got {type(rows).__name__}")
        for number, row in enumerate(rows):
            yield f"{path_.name}:{number}", row


def _last(turns: list[tuple[str, str]], role: str, where: str, name: str) -> str:
    texts = [text for r, text in turns if r.lower() == role and isinstance(text, str)]
    if not texts:
        raise Skip("missing_field", f"{where}: field {name!r} has no {role} turn")
    return texts[-1]


def convert_povid(position: str, row: dict, context: Context) -> Candidate:
    where = _where(position, row, "id")
    chosen = messages(row.get("conversations"), where, "conversations", "from", "value")
    rejected = messages(row.get("rejected_conversations"), where, "rejected_conversations", "from", "value")
    image = field(row, "image", str, where)
    # The release writes paths of the authors' machine (./data/coco/...): the COCO file name is the key.
    return Candidate(_row_id(row, "id", position), strip_placeholders(_last(chosen, "human", where, "conversations")),
                     [_last(chosen, "gpt", where, "conversations"),
                      _last(rejected, "gpt", where, "rejected_conversations")], [1, 2],
                     image=_under(context.media_root, pathlib.PurePosixPath(image).name, where, "image"))


# -- 6. WildVision battles: parquet, winner model_a / model_b / tie / tie (bothbad) ------------------

WILDVISION_WINNERS = {"model_a": [1, 2], "model_b": [2, 1], "tie": [1, 1], "tie (bothbad)": [1, 1]}


def convert_wildvision(position: str, row: dict, context: Context) -> Candidate:
    where = _where(position, row, "question_id")
    winner = row.get("winner")
    if winner not in WILDVISION_WINNERS:
        raise Skip("bad_rankings", f"{where}: field 'winner' must be one of {list(WILDVISION_WINNERS)}, got {winner!r}")
    sides = [messages(row.get(name), where, name) for name in ("conversation_a", "conversation_b")]
    if any(len(turns) != 2 for turns in sides):
        # After the first turn the two sides continue different conversations: no shared prompt.
        raise Skip("multi_turn_battle", f"{where}: a battle of {row.get('turn')} turns has no prompt both answers share")
    if sides[0][0] != sides[1][0]:
        raise Skip("context_mismatch", f"{where}: the two conversations open with different user turns")
    return Candidate(_row_id(row, "question_id", position), render_turns(sides[0][:1], where),
                     [_last(turns, "assistant", where, name) for turns, name in zip(sides, ("conversation_a", "conversation_b"))],
                     WILDVISION_WINNERS[winner], image=_image_bytes(row, where))


# -- 7, 8. Tulu 3 preference mixture, Skywork-Reward 80K: chosen/rejected message lists ---------------

def convert_message_pair(position: str, row: dict, context: Context) -> Candidate:
    where = _where(position, row, "id")
    chosen, rejected = messages(row.get("chosen"), where, "chosen"), messages(row.get("rejected"), where, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise Skip("context_mismatch", f"{where}: 'chosen' and 'rejected' differ before their last turn")
    if not all(turns[-1][0] == "assistant" and isinstance(turns[-1][1], str) for turns in (chosen, rejected)):
        raise Skip("missing_field", f"{where}: 'chosen' and 'rejected' must end with an assistant turn")
    return Candidate(_row_id(row, "id", position), render_turns(chosen[:-1], where), [chosen[-1][1], rejected[-1][1]],
                     [1, 2])


# -- 9. Nectar: data/rlaif.parquet, 7 ranked answers per Anthropic-HH style transcript -----------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_turns(transcript: str, where: str) -> list[tuple[str, str]]:
    """"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:" -> (role, text) turns, the
    trailing empty Assistant cue dropped."""
    pieces = _HH_TURN.split("\n\n" + transcript.lstrip("\n") if not transcript.startswith("\n\n") else transcript)
    turns = [(role, text.strip()) for role, text in zip(pieces[1::2], pieces[2::2])]
    if turns and turns[-1] == ("Assistant", ""):
        turns = turns[:-1]
    if not turns:
        raise Skip("bad_turns", f"{where}: field 'prompt' holds no Human: turn")
    return [("user" if role == "Human" else "assistant", text) for role, text in turns]


def convert_nectar(position: str, row: dict, context: Context) -> Candidate:
    where = position
    answers = field(row, "answers", list, where)
    if not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
        raise Skip("missing_field", f"{where}: field 'answers' must hold {{answer, model, rank}} structs")
    return Candidate(position, render_turns(hh_turns(field(row, "prompt", str, where), where), where),
                     [a["answer"] for a in answers], ranks([a.get("rank") for a in answers], len(answers), where,
                                                           "answers.rank"))


# -- 10. PKU-SafeRLHF: jsonl per generating model and split; two labels, chosen by --option=label -----

PKU_LABELS = {"safer": ("safer_response_id",), "better": ("better_response_id",),
              "agree": ("safer_response_id", "better_response_id")}


def convert_pku_saferlhf(position: str, row: dict, context: Context) -> Candidate:
    where = position
    prompt, responses = field(row, "prompt", str, where), [field(row, f"response_{i}", str, where) for i in (0, 1)]
    ids = {field(row, name, int, where) for name in PKU_LABELS[context.options["label"]]}
    if len(ids) > 1:
        raise Skip("labels_disagree", f"{where}: label=agree, and safer_response_id differs from better_response_id")
    (winner,) = ids
    if winner not in (0, 1):
        raise Skip("bad_rankings", f"{where}: the response id must be 0 or 1, got {winner}")
    return Candidate(position, prompt, responses, pair(winner == 0))


SOURCES = {
    "mm_rlhf": Source(mm_rlhf_shards, mm_rlhf_rows, convert_mm_rlhf, {"sampling_interval": ("0.5", None)}),
    "llava_critic": Source(_matching("pairwise/*.parquet"), parquet_rows, convert_llava_critic),
    "rlaif_v": Source(_matching("RLAIF-V-Dataset_*.parquet"), parquet_rows, convert_rlaif_v),
    "vlfeedback": Source(_matching("vlfeedback_80k.jsonl"), vlfeedback_rows, convert_vlfeedback),
    "povid": Source(_matching("*.json"), povid_rows, convert_povid),
    "wildvision": Source(_matching("**/*.parquet"), parquet_rows, convert_wildvision),
    "tulu": Source(_matching("**/*.parquet"), parquet_rows, convert_message_pair),
    "skywork": Source(_matching("**/*.parquet"), parquet_rows, convert_message_pair),
    "nectar": Source(_matching("**/*.parquet"), parquet_rows, convert_nectar),
    "pku_saferlhf": Source(_matching("**/*.jsonl"), jsonl_rows, convert_pku_saferlhf,
                           {"label": ("safer", tuple(PKU_LABELS))}),
}
