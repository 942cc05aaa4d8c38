"""A loaded multi-response reward model: `RewardModel.load(dir).score(prompt, responses, images, video)`.

Used by `mrrm_jax.score` (JSONL files), `mrrm_jax.evaluate` (benchmarks) and anything in Python.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mrrm_jax import checkpoint, lora, reward
from mrrm_jax.data import collate, formatting
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
