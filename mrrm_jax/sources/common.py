"""What every release converter shares: the candidate record, the one multi-turn rendering, placeholder
stripping, rank rules, and streaming readers for parquet and JSON lines.

A converter turns one release row into a `Candidate` (text, responses, ranks 1 = best, media as bytes
or a file) or raises `Skip` naming the record and the field; `conversion.py` does the rest (permutation,
ties, media files, decontamination) the same way for every source.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Iterator

import pyarrow.parquet as pq

from mrrm_jax.data.examples import Skip

PARQUET_BATCH_ROWS = 256  # rows decoded at a time: a shard with image bytes is never whole in memory


@dataclasses.dataclass
class Candidate:
    id: str  # the release's own id of the row (its file:row position when it has none)
    prompt: str
    responses: list[str]
    rankings: list[int]  # 1 = best, ties allowed; same order as `responses`
    image: bytes | pathlib.Path | None = None  # embedded bytes, or a file of the release's media tree
    video: pathlib.Path | None = None  # a video file or a frame folder
    media_name: str | None = None  # a file's name under media/<source>/ (embedded bytes are named by hash)
    extra: dict = dataclasses.field(default_factory=dict)  # kept in the record (e.g. sampling_interval)
    events: list[str] = dataclasses.field(default_factory=list)  # counted in the report (e.g. a rating dropped)


# -- text ------------------------------------------------------------------------------------------

# LLaVA-style sources put the image where the model saw it; our processors insert their own tokens.
_PLACEHOLDER = re.compile(r"[ \t]*<image>[ \t]*\n?")
ROLE_NAMES = {"human": "User", "user": "User", "gpt": "Assistant", "assistant": "Assistant", "system": "System"}


def strip_placeholders(text: str) -> str:
    return _PLACEHOLDER.sub("", text).strip()


def render_turns(turns: list[tuple[str, str]], where: str) -> str:
    """The prompt of a conversation that ends with the user's turn: the last user turn as it is when it
    is the only turn; otherwise every turn as `Role: text`, separated by blank lines, e.g.

        User: What is in the box?

        Assistant: A cat.

        User: What colour is it?

    One rendering for every multi-turn source (how the paper flattened turns is not published)."""
    if not turns or ROLE_NAMES.get(turns[-1][0].lower()) != "User":
        raise Skip("bad_turns", f"{where}: the conversation before the answer must end with a user turn")
    named = []
    for role, text in turns:
        if ROLE_NAMES.get(role.lower()) is None or not isinstance(text, str):
            raise Skip("bad_turns", f"{where}: a turn has role {role!r} or a non-text content")
        named.append((ROLE_NAMES[role.lower()], strip_placeholders(text)))
    if len(named) == 1:
        return named[0][1]
    return "\n\n".join(f"{role}: {text}" for role, text in named)


def field(row: dict, name: str, kind: type | tuple[type, ...], where: str):
    """`row[name]`, checked to be of `kind`; a missing or mistyped field is a `missing_field` skip."""
    value = row.get(name)
    if value is None or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        got = "missing" if value is None else type(value).__name__
        raise Skip("missing_field", f"{where}: field {name!r} must be {names}, got {got}")
    return value


def messages(value, where: str, name: str, role_key: str = "role", text_key: str = "content") -> list[tuple[str, str]]:
    """A list of {role, content} dicts as (role, text) pairs."""
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise Skip("missing_field", f"{where}: field {name!r} must be a non-empty list of messages")
    return [(str(m.get(role_key, "")), m.get(text_key)) for m in value]


# -- ranks -----------------------------------------------------------------------------------------

def pair(first_wins: bool) -> list[int]:
    return [1, 2] if first_wins else [2, 1]


def ranks(value, count: int, where: str, name: str) -> list[int]:
    """A release's ranks (1 = best) as ints: `count` whole numbers >= 1, else a `bad_rankings` skip."""
    if (not isinstance(value, list) or len(value) != count
            or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r == int(r) and r >= 1 for r in value)):
        raise Skip("bad_rankings", f"{where}: field {name!r} must be {count} whole numbers >= 1 (1 = best), got {value!r}")
    return [int(r) for r in value]


def dense_rank_descending(values: list[float]) -> list[int]:
    """1 for the highest value; equal values share a rank (VLFeedback's means, MM-RLHF's fallback)."""
    distinct = sorted(set(values), reverse=True)
    return [distinct.index(v) + 1 for v in values]


# -- streaming readers -------------------------------------------------------------------------------

def files(path: pathlib.Path, pattern: str) -> list[pathlib.Path]:
    """`path` itself when it is a file, else its files matching `pattern` (recursively), sorted."""
    if path.is_file():
        return [path]
    found = sorted(p for p in path.glob(pattern) if p.is_file())
    if not found:
        raise FileNotFoundError(f"no {pattern} under {path}")
    return found


def parquet_rows(paths: list[pathlib.Path]) -> Iterator[tuple[str, dict]]:
    """(file:row, row dict) for every row of the parquet files, a batch of rows at a time."""
    for path in paths:
        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                yield f"{path.name}:{number}", row
                number += 1


def jsonl_rows(paths: list[pathlib.Path]) -> Iterator[tuple[str, dict | str]]:
    """(file:line, object) per non-empty line, read line by line; a line that is not a JSON object
    stays a string (the converter makes it a `bad_json` skip)."""
    for path in paths:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    try:
                        value = json.loads(line)
                    except json.JSONDecodeError:
                        value = line
                    yield f"{path.name}:{number}", value
