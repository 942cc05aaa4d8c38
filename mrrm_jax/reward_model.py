"""A loaded multi-response reward model: `RewardModel.load(dir).score(prompt, responses, images, video)`,
and `score_file`, which scores a JSONL file of records with it.

Used by `mrrm_jax.score` (JSONL files), `mrrm_jax.evaluate` (benchmarks), the server and anything in
Python. Records follow the paper's schema (`prompt`, `responses`, optional `image` path or list, `video`
path; paths relative to the input file). Each output line of `score_file` is `{"index", "id"?,
"scores"}` or, for a record that cannot be scored, `{"index", "id"?, "error"}`; the other records are
still scored. `mode="single"` is the conventional baseline: every response in its own pass.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mrrm_jax import checkpoint, lora, reward
from mrrm_jax.data import collate, formatting, preprocess, records
from mrrm_jax.hf_interop import batch_from_processor
from mrrm_jax.models.molmo2 import Molmo2


class RewardModel:
    """A loaded reward model: the base with its LoRA merged in (fast scoring), the head, the processor.

    Scoring is data-parallel over every local device: the parameters are replicated and a batch's rows
    are split over a 1-D ('data',) mesh (rows padded to a multiple of the device count). `programs`
    holds the batch shapes met so far: one compiled program each.
    """

    def __init__(self, config, params, head_config, head_params, processor, devices=None):
        self.config = config.replace(with_lm_head=False)
        self.backbone, self.head = Molmo2(self.config), reward.ValueHead(head_config)
        self.mesh = Mesh(np.asarray(devices if devices is not None else jax.local_devices()), ("data",))
        replicated = NamedSharding(self.mesh, P())
        self.params, self.head_params = jax.device_put((params, head_params), replicated)
        self.processor, self.programs = processor, set()
        self._rows = NamedSharding(self.mesh, P("data"))
        self._scores = jax.jit(lambda p, h, batch: reward.forward_scores(
            self.backbone, self.head, p, {"head": h, "lora": {}}, batch))

    @classmethod
    def load(cls, reward_dir: str | pathlib.Path, dtype: str | None = None) -> RewardModel:
        reward_dir = pathlib.Path(reward_dir)
        config, base = checkpoint.load_base(reward_dir / checkpoint.BASE_DIR, dtype=dtype)
        trainable, head_config, spec = checkpoint.load_trainable(reward_dir)
        params = lora.merge(base, trainable["lora"], spec) if trainable["lora"] else base
        params.pop("lm_head", None)  # the reward path never uses it (design decision 8)
        if dtype is not None:
            config = config.replace(dtype=dtype, param_dtype=dtype)
        processor = formatting.load_processor(reward_dir / checkpoint.PROCESSOR_DIR)
        return cls(config, params, head_config, trainable["head"], processor)

    def example(self, prompt, responses, images=None, video=None, video_metadata=None, media_cache=None) -> dict:
        """One example as a one-row model batch with its read positions. `media_cache`: a dict kept across
        calls with the same media (other response orders), which are then preprocessed once."""
        formatted = formatting.format_example(self.processor, prompt, responses, images, video, video_metadata,
                                              media_cache=media_cache)
        batch = batch_from_processor(formatted.processor_outputs, self.config)
        batch["read_positions"] = formatted.read_positions[None].astype(np.int32)
        batch["response_starts"] = formatted.response_starts[None].astype(np.int32)
        return batch

    def score_examples(self, examples: list[dict], rows: int = 0) -> list[np.ndarray]:
        """Scores of several examples (from `example`) in one padded batch of at least `rows` rows (a
        fixed `rows` bounds the number of programs): one array [N_i] each."""
        devices = self.mesh.size
        rows = -(-max(len(examples), rows) // devices) * devices
        scores_bn = self.score_batch(collate.collate(examples, batch_size=rows, geometric=True))
        return [scores_bn[i, : e["read_positions"].shape[1]] for i, e in enumerate(examples)]

    def score_batch(self, batch: dict) -> np.ndarray:
        """Scores of a model batch (`collate`d [B, N], or packed rows [B, E, N]; rows a multiple of the
        device count), -inf where a read position is -1."""
        self.programs.add(tuple(sorted((name, array.shape) for name, array in batch.items())))
        return np.asarray(self._scores(self.params, self.head_params, jax.device_put(batch, self._rows)))

    def score(self, prompt, responses, images=None, video=None, video_metadata=None) -> np.ndarray:
        """Scores [N] of the N responses, in one forward pass."""
        return self.score_examples([self.example(prompt, responses, images, video, video_metadata)])[0]

    def score_single(self, prompt, responses, images=None, video=None, video_metadata=None) -> np.ndarray:
        """The conventional baseline: each response scored in its own pass."""
        examples = [self.example(prompt, [r], images, video, video_metadata) for r in responses]
        return np.concatenate(self.score_examples(examples))


def score_file(model: RewardModel, input_path: pathlib.Path, output_path: pathlib.Path, batch_size: int = 8,
               mode: str = "multi") -> tuple[int, int]:
    """Scores every record of a JSONL file; returns (scored, failed)."""
    lines = input_path.read_text().splitlines()
    media_files = records.MediaDir(input_path.parent)
    keep_frames = functools.partial(preprocess.sample_frame_indices,
                                    options=model.processor.options)
    scored = failed = 0
    start = time.time()
    with open(output_path, "w") as out:
        pending: list[tuple[dict, list[dict]]] = []

        def flush():
            nonlocal scored
            flat = [e for _, examples in pending for e in examples]
            results = iter(model.score_examples(flat, rows=batch_size)) if flat else iter(())
            for entry, examples in pending:
                parts = [next(results) for _ in examples]
                out.write(json.dumps({**entry, "scores": np.concatenate(parts).tolist()}) + "\n")
                scored += 1
            pending.clear()

        for index, line in enumerate(lines):
            if not line.strip():
                continue
            entry = {"index": index}
            try:
                record = json.loads(line)
                if "id" in record:
                    entry["id"] = record["id"]
                if not isinstance(record.get("responses"), list):
                    raise ValueError("field 'responses' must be a list of strings")
                loaded = records.load_media(record, f"{input_path.name}:{index + 1}", media_files, keep_frames)
                groups = [record["responses"]] if mode == "multi" else [[r] for r in record["responses"]]
                examples = [model.example(record.get("prompt", ""), g, **loaded) for g in groups]
            except Exception as error:  # a bad record must not stop the file: report it in its line
                flush()
                out.write(json.dumps({**entry, "error": f"{type(error).__name__}: {error}"}) + "\n")
                failed += 1
                continue
            pending.append((entry, examples))
            if sum(len(e) for _, e in pending) >= batch_size:
                flush()
                print(f"\r{scored + failed}/{len(lines)} records, {time.time() - start:.1f}s", end="", file=sys.stderr)
        flush()
    # The model's compiled programs so far (one per batch shape): what compiling cost this process.
    print(f"\rscored {scored}, failed {failed} of {len(lines)} records in {time.time() - start:.1f}s; "
          f"{len(model.programs)} compiled programs", file=sys.stderr)
    return scored, failed
