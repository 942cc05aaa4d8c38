"""Scoring groups: over HTTP (`RewardClient`, POST /score) or in process (`LocalScorer`, a `RewardModel`).

Both take groups `{"prompt": str, "responses": [str], "image": ref | [refs] (optional), "video": ref
(optional)}` and return one list of scores per group; scores are comparable only within a group.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np

from mrrm_jax.serving import groups as groups_lib
from mrrm_jax.serving import templates


class RewardClient:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 180.0):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s

    def score(self, groups: list[dict]) -> list[list[float]]:
        reply = httpx.post(f"{self.url}/score", json={"groups": groups}, headers=self.headers, timeout=self.timeout_s)
        if reply.status_code != 200:
            raise RuntimeError(f"reward server {self.url}: HTTP {reply.status_code}: {reply.text[:500]}")
        return [group["scores"] for group in reply.json()["groups"]]


class LocalScorer:
    """The same interface on a `RewardModel` in this process (no server); media refs resolve as the
    server resolves them (paths under `media_root`, data: URIs, base64) and blank responses get the
    server's floor (`groups.with_blank_floor`). `mode`: "multi" (a group in one pass) or "single"
    (each response in its own, the baseline)."""

    def __init__(self, model, media_root=None, mode: str = "multi"):
        # Imported here: it brings the media decoders and jax, which an HTTP client inside a PyTorch
        # trainer's process must not load.
        from mrrm_jax.serving import media_refs

        self.model, self.media_root, self.mode, self._load = model, media_root, mode, media_refs.load

    def score(self, groups: list[dict]) -> list[list[float]]:
        prepared = []
        for index, group in enumerate(groups):
            images = group.get("image") or []
            images = [images] if isinstance(images, str) else images
            answered_a = groups_lib.answered(group["responses"])
            examples = []
            if answered_a:
                loaded = self._load(images, group.get("video"), self.media_root, f"groups[{index}]")
                examples = self.model.examples(group["prompt"], [group["responses"][i] for i in answered_a],
                                               self.mode, **loaded)
            prepared.append((group, answered_a, examples))
        return [groups_lib.with_blank_floor(len(group["responses"]), answered_a,
                                            np.concatenate(scores) if scores else np.zeros(0)).tolist()
                for run in self.model.score_runs(prepared, lambda item: item[2])
                for (group, answered_a, _), scores in run]


def column_at(column, index: int):
    """Row `index` of a framework's per-row column, None when the column is absent."""
    return None if column is None else column[index]


def message_text(value) -> str:
    """A string, or the text of a conversation: the last message's text parts (media parts skipped)."""
    if isinstance(value, str):
        return value
    content = value[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def question_of(prompt) -> str:
    """The question of a prompt: a conversation's last user turn, or a string rendered by a chat template
    (`serving.templates`)."""
    if not isinstance(prompt, str):
        prompt = message_text([message for message in prompt if message["role"] == "user"] or prompt)
    return templates.question(prompt)[0]


def media_ref(value):
    """A media value as the server takes it: a ref string as is (a path under its media root, a data:
    URI, base64); a decoded image (PIL, as TRL and verl hand them over) as a PNG data URI; raw bytes or
    a datasets `{"bytes", "path"}` cell as base64 (or its path); a list of them as a list. None, and ''
    (a numpy string column's missing value, as tunix passes it), mean no media."""
    if value is None or (isinstance(value, str) and not value):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1):
        refs = [ref for ref in map(media_ref, list(value)) if ref is not None]
        return refs or None
    if isinstance(value, dict):
        return media_ref(value.get("bytes") or value.get("path"))
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if hasattr(value, "save"):  # a PIL image
        png = io.BytesIO()
        value.save(png, format="PNG")
        return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    raise TypeError(f"a media value must be a ref string, an image, bytes or a list of them; got {type(value).__name__}")


def runs(keys: list) -> list[list[int]]:
    """Indices grouped by key, groups in order of first appearance (a key's entries need not be adjacent)."""
    groups: dict = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def score_entries(scorer, entries: list[tuple[str, str, dict]], keys: list) -> list[float]:
    """`entries[i]` = (prompt, response, media {"image", "video"}); entries sharing a key are one group.
    Returns one score per entry, in entry order."""
    groups = runs(keys)
    requests = [{"prompt": entries[g[0]][0], "responses": [entries[i][1] for i in g],
                 **{k: v for k, v in entries[g[0]][2].items() if v is not None}} for g in groups]
    rewards = [0.0] * len(entries)
    for group, scores in zip(groups, scorer.score(requests)):
        for index, score in zip(group, scores):
            rewards[index] = float(score)
    return rewards
