"""A loaded multi-response reward model: `RewardModel.load(dir).score(prompt, responses, images, video)`,
and `score_file`, which scores a JSONL file of records with it.

Used by `mrrm_jax.score` (JSONL files), `mrrm_jax.evaluate` (benchmarks), the server and anything in
Python. Records follow the paper's schema (`prompt`, `responses`, optional `image` path or list, `video`
path; paths relative to the input file). Each output line of `score_file` is `{"index", "id"?,
"scores"}` or, for a record that cannot be scored, `{"index", "id"?, "error"}`; the other records are
still scored. `mode="single"` is the conventional baseline: every response in its own pass.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mrrm_jax.scoring import batch_shapes, shards
from mrrm_jax.backbones import checkpoint
from mrrm_jax.core import lora
from mrrm_jax.core import reward
from mrrm_jax.data import formatting, records
from mrrm_jax import backbones
from mrrm_jax.models.attention import inference_backend

# How a group's responses reach the model: all in one pass, or each in its own (the baseline).
MODES = ("multi", "single")


def forward(backbone, head, vision_crops: int | None, devices: int, params, head_params, batch: dict):
    """Scores [B, E, N] of a batch of packed rows on `devices` data-parallel devices (jit it with the
    first four bound)."""
    hidden_btd = backbones.hidden_states(backbone, params, batch, vision_crops, devices)
    return reward.scores(head, head_params, hidden_btd, batch)


class RewardModel:
    """A loaded reward model: the base with its LoRA merged in (fast scoring), the head, the processor.

    Examples are scored as segments of packed rows, in batches of `rows` rows of `row_tokens` tokens and
    `row_crops` ViT crops (or a fraction of that: `batch_shapes`). Scoring is data-parallel over every
    local device: the parameters are replicated and a batch's rows are split over a 1-D ('data',) mesh.
    The ViT runs only the crops that pooled tokens read, `vision_crops` at a time (its memory is bounded
    by one pass; each device runs its own rows' crops; None: the backbone's choice for the platform).
    `programs` holds the batch shapes met so far: one compiled program each. `deterministic`: scores
    bit-identical however a group is batched (`batch_shapes.BatchShapes`; costs the packing).
    """

    def __init__(self, config, params, head_config, head_params, processor, devices=None, rows: int = 4,
                 row_tokens: int = 4096, row_crops: int = 32, vision_crops: int | None = None,
                 deterministic: bool = False):
        self.config = config.replace(with_lm_head=False)
        self.backbone, self.head = backbones.module(self.config), reward.ValueHead(head_config)
        self.mesh = Mesh(np.asarray(devices if devices is not None else jax.local_devices()), ("data",))
        replicated = NamedSharding(self.mesh, P())
        self.params, self.head_params = jax.device_put((params, head_params), replicated)
        self.processor, self.programs, self.vision_crops = processor, set(), vision_crops
        budget = batch_shapes.row_budget(processor, row_tokens, row_crops, row_examples=16, max_responses=16)
        self.shapes = batch_shapes.BatchShapes(budget, backbones.media(self.config), rows, self.mesh.size,
                                              deterministic=deterministic)
        self._rows = NamedSharding(self.mesh, P("data"))
        self._scores = jax.jit(functools.partial(forward, self.backbone, self.head, self.vision_crops, self.mesh.size))

    @classmethod
    def load(cls, reward_dir: str | pathlib.Path, dtype: str | None = None, attention: str | None = None,
             **shape) -> RewardModel:
        """`dtype`, `attention`: override the saved model's (without `attention`, the saved backend's
        `attention.inference_backend`); `shape`: `rows`, `row_tokens`, `row_crops`, `deterministic`."""
        reward_dir = pathlib.Path(reward_dir)
        # The reward path never uses the LM head (design decision 8).
        config, base = checkpoint.load_base(reward_dir / checkpoint.BASE_DIR, dtype=dtype, skip=("lm_head",))
        trainable, head_config, spec = checkpoint.load_trainable(reward_dir)
        params = lora.merge(base, trainable["lora"], spec) if trainable["lora"] else base
        if dtype is not None:
            config = config.replace(dtype=dtype, param_dtype=dtype)
        config = config.replace(attention=attention or inference_backend(config.attention))
        processor = backbones.load_processor(reward_dir / checkpoint.PROCESSOR_DIR)
        return cls(backbones.with_processor(config, processor), params, head_config, trainable["head"], processor,
                   **shape)

    def example(self, prompt, responses, images=None, video=None, video_metadata=None, media_cache=None) -> dict:
        """One example as a one-row model batch with its read positions. `media_cache`: a dict kept across
        calls with the same media (other response orders), which are then preprocessed once."""
        formatted = formatting.format_example(self.processor, prompt, responses, images, video, video_metadata,
                                              media_cache=media_cache)
        batch = self.processor.model_batch(formatted.processor_outputs)
        batch["read_positions"] = formatted.read_positions[None].astype(np.int32)
        batch["response_starts"] = formatted.response_starts[None].astype(np.int32)
        return batch

    def examples(self, prompt, responses, mode: str = "multi", media_cache=None, **media) -> list[dict]:
        """A group's examples, the one path from a group to the model for every scorer: one example of all
        responses (`mode="multi"`), or one per response (`"single"`, the conventional baseline). The
        media (`images`, `video`, `video_metadata`) are preprocessed once for all of them."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {MODES}")
        groups = [responses] if mode == "multi" else [[response] for response in responses]
        cache = {} if media_cache is None else media_cache
        return [self.example(prompt, group, media_cache=cache, **media) for group in groups]

    def score_examples(self, examples: list[dict]) -> list[np.ndarray]:
        """Scores of several examples (from `example`), packed into as few batches as hold them: one array
        [N_i] each."""
        scores = []
        for indices, layout in self.shapes.split(examples):
            batch_examples = [examples[i] for i in indices]
            scores_ben = self.score_batch(self.shapes.pack(batch_examples, layout))
            scores += self.shapes.unpack(batch_examples, layout, scores_ben)
        return scores

    def score_runs(self, items, examples_of):
        """Scores a stream of items (records, requests), each with a list of examples (`examples_of(item)`;
        [] for an item that failed before the model): yields, per run of consecutive items that fill one
        batch, [(item, scores [N] of each of its examples)]. An item's examples stay in one run; a run of
        one item may take more than one batch (an example larger than a row, many examples)."""
        empty = self.shapes.filling()
        run, filling = [], empty
        for item in items:
            grown = filling.added(examples_of(item))
            if run and grown is None:  # the batch is full: this item starts the next
                yield self._scored(run, examples_of)
                run, grown = [], empty.added(examples_of(item))
            run.append(item)
            if grown is None:  # more than one batch holds: a run of its own
                yield self._scored(run, examples_of)
                run, grown = [], empty
            filling = grown
        if run:
            yield self._scored(run, examples_of)

    def _scored(self, run: list, examples_of) -> list[tuple[object, list[np.ndarray]]]:
        scores = iter(self.score_examples([e for item in run for e in examples_of(item)]))
        return [(item, [next(scores) for _ in examples_of(item)]) for item in run]

    def score_batch(self, batch: dict) -> np.ndarray:
        """Scores [B, E, N] of a batch of packed rows (rows a multiple of the device count), -inf where a
        read position is -1."""
        self.programs.add(tuple(sorted((name, array.shape) for name, array in batch.items())))
        return np.asarray(self._scores(self.params, self.head_params, jax.device_put(batch, self._rows)))

    def score(self, prompt, responses, images=None, video=None, video_metadata=None) -> np.ndarray:
        """Scores [N] of the N responses, in one forward pass."""
        return self.score_examples(self.examples(prompt, responses, images=images, video=video,
                                                 video_metadata=video_metadata))[0]

    def score_single(self, prompt, responses, images=None, video=None, video_metadata=None) -> np.ndarray:
        """The conventional baseline: each response scored in its own pass."""
        examples = self.examples(prompt, responses, "single", images=images, video=video, video_metadata=video_metadata)
        return np.concatenate(self.score_examples(examples))


def prefetch(fn, items, workers: int, ahead: int):
    """fn(item) for every item, in order, computed by `workers` threads at most `ahead` items early."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def score_file(model: RewardModel, input_path: pathlib.Path, output_path: pathlib.Path, mode: str = "multi",
               workers: int | None = None, share: shards.Share | None = None) -> tuple[int, int]:
    """Scores every record of a JSONL file; returns (scored, failed) of this process's share. Records are
    read, decoded and formatted by `workers` threads ahead of the model. Under `jax.distributed` each
    process scores its share into a part file and process 0 joins them (`shards`); the parts of a killed
    run are resumed."""
    share = share or shards.Share.of_this_process()
    lines = input_path.read_text().splitlines()
    media_files = records.MediaDir(input_path.parent)
    keep_frames = model.processor.frame_indices

    def prepare(index: int) -> tuple[dict, list[dict] | str]:
        """(output line so far, the record's examples or its error)."""
        entry = {"index": index}
        try:
            record = json.loads(lines[index])
            if "id" in record:
                entry["id"] = record["id"]
            if not isinstance(record.get("responses"), list):
                raise ValueError("field 'responses' must be a list of strings")
            loaded = records.load_media(record, f"{input_path.name}:{index + 1}", media_files, keep_frames)
            return entry, model.examples(record.get("prompt", ""), record["responses"], mode, **loaded)
        except Exception as error:  # a bad record must not stop the file: report it in its line
            return entry, f"{type(error).__name__}: {error}"

    scored = failed = 0
    start = time.time()
    examples_of = lambda prepared: prepared[1] if isinstance(prepared[1], list) else []
    finished = lambda line: "scores" in line or "error" in line
    done = shards.done_indices(output_path, finished)
    todo = [index for index, line in enumerate(lines) if line.strip() and share.holds(index) and index not in done]
    with shards.open_part(output_path, share, finished) as out:
        prepared = prefetch(prepare, todo, workers or min(4, os.cpu_count() or 1), ahead=8)
        for run in model.score_runs(prepared, examples_of):
            for (entry, examples), scores in run:
                if isinstance(examples, str):
                    out.write(json.dumps({**entry, "error": examples}) + "\n")
                    failed += 1
                else:
                    out.write(json.dumps({**entry, "scores": np.concatenate(scores).tolist()}) + "\n")
                    scored += 1
            out.flush()  # a killed run keeps every finished batch
            print(f"\r{scored + failed}/{len(todo)} records, {time.time() - start:.1f}s", end="", file=sys.stderr)
    # The model's compiled programs so far (one per batch shape): what compiling cost this process.
    print(f"\rscored {scored}, failed {failed} of {len(todo)} records in {time.time() - start:.1f}s"
          f"{f' (process {share.index} of {share.count})' if share.count > 1 else ''}; "
          f"{len(model.programs)} compiled programs", file=sys.stderr)
    shards.wait_for_all("score_file")
    if share.leader:
        shards.join(output_path)
    return scored, failed
