"""The policy's prompts: records of the paper's schema read with their media, and batches of prompt rows
of one static shape (one prompt per row, right-padded), as the sampler takes them.

A record gives the question (`prompt`), its media, and, where it has `responses` and `rankings`, the
answer the corpus marks best (the demo's accuracy) and all its answers (the SFT warm-up's targets). The
group the reward model scores names the record's media by reference (`image`, `video`: paths under the
media root), so the scorer reads the media as a server would.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from mrrm_jax.data import examples, formatting, packing, records

# The arrays of a packed row the model reads; the rest is the reward path's bookkeeping.
SCORING_FIELDS = ("read_positions", "response_starts", "order", "labels", "media_kind")


@dataclasses.dataclass(frozen=True)
class Prompt:
    record_id: str
    question: str
    media: dict  # what the policy sees: {"images": [...]} and/or {"video", "video_metadata"}
    refs: dict  # the group's media references for the scorer: {"image": name | [names], "video": name}
    responses: tuple[str, ...] = ()
    best: str | None = None  # the best-ranked response (a unique rank 1), if any


def blanked(media: dict) -> dict:
    """The media with every pixel black (same sizes and frame count): the demo's control, a policy that
    cannot see what the question asks about."""
    out = dict(media)
    if "images" in media:
        out["images"] = [image.point(lambda _: 0) for image in media["images"]]
    if "video" in media:
        out["video"] = np.zeros_like(media["video"])
    return out


def media_root(path, media_root=None) -> pathlib.Path:
    """Where a JSONL file's media names resolve: `media_root`, or the file's directory."""
    return pathlib.Path(media_root or pathlib.Path(path).parent).absolute()


def read_prompts(path, root: pathlib.Path, ref_root: pathlib.Path, counter: records.SkipCounter,
                 blank: bool = False) -> list[Prompt]:
    """The prompts of a JSONL file, media under `root`; the scorer's refs are paths relative to `ref_root`
    (a directory above `root`). A record that cannot be used is counted by reason and skipped, never fatal."""
    path = pathlib.Path(path)
    files = records.MediaDir(root)
    as_ref = lambda name: str((root / name).relative_to(ref_root))
    prompts = []
    for record_id, record in records.read_jsonl(path):
        try:
            if not isinstance(record, dict):
                raise examples.Skip("not_json", f"{record_id}: not a JSON object")
            question = record.get("prompt")
            if not isinstance(question, str) or not question.strip():
                raise examples.Skip("bad_prompt", f"{record_id}: field 'prompt' must be a non-empty string")
            media = records.load_media(record, record_id, files)
        except examples.Skip as error:
            counter.skip(error)
            continue
        refs = {"image": [as_ref(name) for name in records.image_names(record)]}
        if record.get("video"):
            refs["video"] = as_ref(record["video"])
        responses = tuple(r for r in record.get("responses") or () if isinstance(r, str) and r)
        rankings = record.get("rankings")
        best = None
        if isinstance(rankings, list) and len(rankings) == len(responses) and responses and rankings.count(min(rankings)) == 1:
            best = responses[rankings.index(min(rankings))]
        prompts.append(Prompt(record_id, question, blanked(media) if blank else media, refs, responses, best))
    return prompts


class PromptRows:
    """Prompts -> batches of rows of one shape (`budget`: tokens, crops / pooled tokens or patches of a
    row; one example per row). Each prompt is preprocessed once and kept."""

    def __init__(self, processor, budget: packing.RowBudget, media):
        self.processor, self.budget, self.media, self._rows = processor, budget, media, {}

    def row(self, prompt: Prompt) -> dict:
        if prompt.record_id not in self._rows:
            outputs = formatting.format_prompt(self.processor, prompt.question, **prompt.media)
            example = self.processor.model_batch(outputs)
            example["read_positions"] = np.array([[example["tokens"].shape[1] - 1]], np.int32)
            over = packing.exceeds(example, self.budget)
            if over:
                raise ValueError(f"{prompt.record_id}: the prompt does not fit a policy row: {', '.join(over)}; "
                                 "raise policy.prompt_tokens (or its media room)")
            row = packing.pack_row([example], self.budget, self.media)
            self._rows[prompt.record_id] = {k: v for k, v in row.items() if k not in SCORING_FIELDS}
        return self._rows[prompt.record_id]

    def batch(self, prompts: list[Prompt]) -> dict:
        rows = [self.row(p) for p in prompts]
        return {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}
