"""One-GPU benchmark at Molmo2-4B dimensions: ours (JAX) beside the PyTorch reference.

    python -m bench.gpu --out=/tmp/gpu.json [--budget_s=480] [--peak_tflops=989] [--parts=train,score,xla_flops]
    python -m bench.gpu --tiny --out=/tmp/gpu_tiny.json      # tiny dimensions on CPU (tests/test_bench_gpu.py)

Run from the repository root, on a machine with one NVIDIA GPU. Nothing is downloaded and no tokenizer or
processor files are needed: token ids are random, images are random 300 x 300 pictures run through our
numpy Molmo2 image preprocessing (2 crops of 27 x 27 patches each, 424 image-block tokens). Weights are
random in bfloat16 (a speed comparison, not a numerical one): ours from the Flax initialisers, the
reference's from transformers' own. Parts, each in order and each on its own (one that fails prints
`part X failed: ...` and the rest still run; past `--budget_s` the rest print `skipped: out of time`):

  ours_train    `step.train_step` (the trainer's jitted step: LoRA r 64 / alpha 16 / dropout 0.05 on the
                LM's seven projections, value head, N-way cross-entropy, AdamW, clip 1.0) on ONE packed
                row of `--row_tokens` (8,192) tokens: 6 examples of 1,365 tokens (a 765-token prompt
                with one image, 4 responses of 150), bf16, `--remat` full as the 4B configs,
                `--attention` cudnn (xla is tried instead if cudnn fails)
  ours_score    groups/s scoring `--score_groups` (16) groups of N = 4 responses (prompt 600 tokens with
                the image, responses 150): multi = one row per group with all 4 responses, single =
                4 rows per group with one response each (the image encoded 4 times), each one padded
                batch (`collate`, tokens to a multiple of 128), `reward.forward_scores` jitted
  ours_xla_flops  XLA's `cost_analysis()` of the same train step, lowered with every layer unrolled
                (XLA counts a loop body once) and attention "xla" (a cuDNN call counts no FLOPs)
  torch_train   transformers `Molmo2ForConditionalGeneration` (attn_implementation="sdpa") + PEFT LoRA
                on the same modules + the same value head, on the same 6 examples as a batch of 6
                rows (no packing: transformers has no segment-aware mask), forward + backward +
                clip + AdamW, gradient checkpointing on (`--no-torch_checkpointing` turns it off)
  torch_score   the same groups, LoRA unloaded (the cost of a merged model), under inference_mode

The JAX parts run in one child process and the PyTorch parts in another (each framework gets the
whole GPU; a crash or a kill loses only that process's unfinished part). Timing, both sides: compile /
first call excluded, `--warmup` (3) calls, then the median (and min) of `--repeats` (5) calls, each ended by a
device sync (`block_until_ready` / `torch.cuda.synchronize`).

Model FLOPs per train step (MFU = model FLOPs / (step time x `--peak_tflops`, default 989: H200 dense
bf16, datasheet)). T = real tokens, P_lm = the LM's projection weights (36 x 100.9 M = 3.63 G),
P_lora = the LoRA factors' weights (36 x 3.67 M), pairs = (query, key) pairs the segment-aware mask
lets attend, summed over examples (Σ L(L+1)/2 + V(V-1)/2, V = the example's vision-block tokens):

    LM         4 T P_lm            forward 2 T P_lm; the base is frozen, so the backward needs only the
                                   activation gradients (2 T P_lm), no weight gradients
    LoRA       6 T P_lora          forward, activation and weight gradients
    attention  12 H d L pairs      forward 4 H d per pair per layer (QK^T, PV); backward twice that
    vision     forward only        ViT 2 (patches) P_vit + 4 H d P^2 per crop and layer; adapter;
                                   no backward reaches it (nothing trainable before it)

Not counted: norms, rope, softmax, the value head, the optimizer (elementwise, small). The rematerialised
forward is NOT model work; "executed" adds it (one more LM forward) and counts attention over every
(query, key) pair, as a dense mask makes the kernel do: that is what XLA's count is compared with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np
from PIL import Image

from mrrm_jax.data import collate, packing
from mrrm_jax import backbones
from mrrm_jax.backbones.molmo2 import preprocess
from mrrm_jax.backbones.molmo2.hf_batch import batch_from_processor
from mrrm_jax.backbones.molmo2.config import (EXTRA_TOKENS, VISION_BLOCK_TOKENS, AdapterConfig, Molmo2Config, TextConfig,
                                           VisionConfig)

# `<|resp_sep|>`: the id the processor gives it, the next after Molmo2's extra tokens (formatting.py).
RESP_SEP_ID = 151936 + len(EXTRA_TOKENS)
TEXT_IDS = 151643  # Qwen's ordinary vocabulary: random text is drawn below its special tokens
EXTRA_IDS = {token: 151936 + i for i, token in enumerate(EXTRA_TOKENS)}
# The LM modules LoRA adapts (lora.DEFAULT_TARGETS), in transformers' names.
PEFT_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
PARTS = ("train", "score", "xla_flops")
SIDES = {"jax": PARTS, "torch": ("train", "score")}
PREFIX = {"jax": "ours", "torch": "torch"}  # part names: ours_train, torch_score, ...


@dataclasses.dataclass(frozen=True)
class Sizes:
    config: Molmo2Config
    vision: preprocess.VisionOptions
    image_px: int
    row_tokens: int
    prompt_tokens: int
    response_tokens: int
    num_responses: int
    score_groups: int
    lora_rank: int
    warmup: int
    repeats: int


FULL = Sizes(Molmo2Config.molmo2_4b(param_dtype="bfloat16", dtype="bfloat16", remat="full", with_lm_head=False),
             preprocess.VisionOptions(), image_px=300, row_tokens=8192, prompt_tokens=600, response_tokens=150,
             num_responses=4, score_groups=16, lora_rank=64, warmup=3, repeats=5)
# Molmo2-shaped, small enough for a test on 2 CPU cores: LM 2 x 64, ViT 2 x 32 on 56-pixel crops.
TINY = Sizes(Molmo2Config(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, head_dim=16,
                        image_size=(56, 56)),
    adapter=AdapterConfig(feature_layers=(1, 0), hidden_size=32, num_heads=2, num_kv_heads=2, head_dim=16,
                          intermediate_size=64),
    text=TextConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128),
    param_dtype="bfloat16", dtype="bfloat16", remat="full", with_lm_head=False),
    preprocess.VisionOptions(crop_size=56, overlap_margins=(1, 1)), image_px=40, row_tokens=512, prompt_tokens=100,
    response_tokens=20, num_responses=4, score_groups=2, lora_rank=4, warmup=1, repeats=2)


# -- inputs: random groups, laid out as Molmo2's processor lays them out ---------------------------

@dataclasses.dataclass
class Example:
    """One sequence in `Molmo2Processor`'s terms: ids [T], the image's crops [C, P, patch_dim] and pooling
    [K, S] (indices into its own crops), grid [4]; read positions and response starts [N]."""

    ids: np.ndarray
    pixel_values: np.ndarray
    pooling: np.ndarray
    grid: np.ndarray
    read_positions: np.ndarray
    response_starts: np.ndarray
    label: int


@dataclasses.dataclass
class Group:
    """A prompt (random text around one random image) and its responses (random text)."""

    prompt_ids: np.ndarray
    media: dict
    responses: list[np.ndarray]

    def example(self, which: list[int], label: int = 0) -> Example:
        """The prompt followed by the responses `which`, separated by `<|resp_sep|>` (read at the token
        before it, and at the last token)."""
        ids, starts, reads = list(self.prompt_ids), [], []
        for i, response in enumerate(self.responses[r] for r in which):
            if i:
                ids.append(RESP_SEP_ID)
            starts.append(len(ids))
            ids.extend(response)
            reads.append(len(ids) - 1)
        return Example(np.asarray(ids, np.int32), self.media["pixel_values"], self.media["image_token_pooling"],
                       self.media["image_grids"][0], np.asarray(reads, np.int32), np.asarray(starts, np.int32), label)


def make_group(rng: np.random.Generator, sizes: Sizes, prompt_tokens: int) -> Group:
    image = Image.fromarray(rng.integers(0, 256, (sizes.image_px, sizes.image_px, 3), dtype=np.uint8))
    media = preprocess.image_inputs([image], sizes.vision, normalized=False)  # uint8 pixels, as our processor's
    image_ids = [EXTRA_IDS[t] for t in re.findall(r"<[^<>]+>", preprocess.image_tokens(media["image_grids"][0],
                                                                                          sizes.vision))]
    text = prompt_tokens - len(image_ids)
    if text < 2:
        raise ValueError(f"prompt_tokens={prompt_tokens} leaves no text beside {len(image_ids)} image tokens")
    before = rng.integers(0, TEXT_IDS, text // 4)
    prompt = np.concatenate([before, image_ids, rng.integers(0, TEXT_IDS, text - len(before))])
    # Every response but the last is followed by a separator, which counts in its length.
    lengths = [sizes.response_tokens - 1] * (sizes.num_responses - 1) + [sizes.response_tokens]
    return Group(prompt.astype(np.int32), media, [rng.integers(0, TEXT_IDS, n).astype(np.int32) for n in lengths])


def train_groups(sizes: Sizes, row_tokens: int, seed: int = 0) -> list[Group]:
    """As many groups as fit one row, their prompts lengthened so that they fill it."""
    example = sizes.prompt_tokens + sizes.num_responses * sizes.response_tokens
    count = max(row_tokens // example, 1)
    prompt = sizes.prompt_tokens + (row_tokens // count - example)
    rng = np.random.default_rng(seed)
    return [make_group(rng, sizes, prompt) for _ in range(count)]


def train_examples(sizes: Sizes, groups: list[Group], seed: int = 0) -> list[Example]:
    labels = np.random.default_rng(seed).integers(0, sizes.num_responses, len(groups))
    return [g.example(list(range(sizes.num_responses)), int(label)) for g, label in zip(groups, labels)]


def ours_example(example: Example, config: Molmo2Config) -> dict:
    """One example as a one-row batch of ours (the layout `RewardModel.example` makes)."""
    batch = batch_from_processor(hf_inputs([example]), config.image_patch_id)
    batch.update(read_positions=example.read_positions[None], response_starts=example.response_starts[None],
                 labels=np.asarray([example.label], np.int32))
    return batch


def ours_row(examples: list[Example], config: Molmo2Config, row_tokens: int) -> dict:
    """The examples packed into one row (data/packing.py), as the trainer's pipeline packs them."""
    ones = [ours_example(e, config) for e in examples]
    budget = packing.RowBudget(row_tokens, sum(o["crops"].shape[1] for o in ones),
                               sum(o["pooling"].shape[1] for o in ones), len(ones),
                               max(len(e.read_positions) for e in examples), pool_slots=ones[0]["pooling"].shape[2])
    row = packing.pack_row(ones, budget, backbones.media(config))
    row.pop("media_kind")  # host-side bookkeeping
    return row


def hf_inputs(examples: list[Example], vision: preprocess.VisionOptions | None = None) -> dict:
    """transformers' Molmo2 inputs (numpy) for a right-padded batch of the examples; `vision`: normalise
    the pixels with its mean and std, as transformers' processor does (None: keep the uint8 pixels,
    which our model normalises)."""
    length = max(len(e.ids) for e in examples)
    ids = np.zeros((len(examples), length), np.int64)
    mask = np.zeros_like(ids)
    pooling, offset = [], 0
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)], mask[row, : len(e.ids)] = e.ids, 1
        pooling.append(np.where(e.pooling >= 0, e.pooling + offset, -1))  # indices over the whole batch's patches
        offset += e.pixel_values.shape[0] * e.pixel_values.shape[1]
    vision_bt = np.isin(ids, [EXTRA_IDS[t] for t in VISION_BLOCK_TOKENS]) & (mask > 0)
    pixels = np.concatenate([e.pixel_values for e in examples])
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": vision_bt.astype(np.int64),
            "pixel_values": pixels if vision is None else preprocess.normalize(pixels, vision.mean, vision.std),
            "image_token_pooling": np.concatenate(pooling), "image_grids": np.stack([e.grid for e in examples]),
            "image_num_crops": np.asarray([e.pixel_values.shape[0] for e in examples], np.int64)}


def padded(values: list[np.ndarray], fill: int = -1) -> np.ndarray:
    out = np.full((len(values), max(len(v) for v in values)), fill, np.int32)
    for row, v in enumerate(values):
        out[row, : len(v)] = v
    return out


def score_examples(sizes: Sizes, seed: int = 1) -> dict[str, list[Example]]:
    """{"multi": one example per group with all N responses, "single": N one-response examples per group}."""
    rng = np.random.default_rng(seed)
    groups = [make_group(rng, sizes, sizes.prompt_tokens) for _ in range(sizes.score_groups)]
    every = list(range(sizes.num_responses))
    return {"multi": [g.example(every) for g in groups],
            "single": [g.example([r]) for g in groups for r in every]}


# -- model FLOPs -----------------------------------------------------------------------------------

def attention_pairs(example: Example, vision_ids: tuple[int, ...]) -> int:
    """(query, key) pairs the segment-aware mask lets attend in one example: the causal ones, plus the
    later vision tokens each vision token sees in its bidirectional block."""
    length, vision = len(example.ids), int(np.isin(example.ids, vision_ids).sum())
    return length * (length + 1) // 2 + vision * (vision - 1) // 2


def train_flops(config: Molmo2Config, lora_rank: int, examples: list[Example], dense_tokens: int) -> dict:
    """Model FLOPs of one train step over `examples` (the formula of the module docstring), and the
    "executed" estimate: plus the rematerialised forward, attention over `dense_tokens`^2 pairs."""
    t, v, a = config.text, config.vision, config.adapter
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    shapes = [(t.hidden_size, q), (t.hidden_size, kv), (t.hidden_size, kv), (q, t.hidden_size),
              (t.hidden_size, t.intermediate_size), (t.hidden_size, t.intermediate_size),
              (t.intermediate_size, t.hidden_size)]
    p_lm = t.num_layers * sum(i * o for i, o in shapes)
    p_lora = t.num_layers * sum(lora_rank * (i + o) for i, o in shapes)
    tokens = sum(len(e.ids) for e in examples)
    pairs = sum(attention_pairs(e, config.vision_token_ids) for e in examples)
    per_pair = 4 * t.num_heads * t.head_dim * t.num_layers

    vq = v.num_heads * v.head_dim
    p_vit = v.num_layers * (3 * v.hidden_size * vq + vq * v.hidden_size + 2 * v.hidden_size * v.intermediate_size)
    patches = v.num_patches
    crops = sum(e.pixel_values.shape[0] for e in examples)
    vit = crops * (2 * patches * (p_vit + v.patch_dim * v.hidden_size)
                   + v.num_layers * 4 * v.num_heads * v.head_dim * patches * patches)
    features = len(a.feature_layers) * v.hidden_size
    pooled = sum(e.pooling.shape[0] for e in examples)
    slots = examples[0].pooling.shape[1]
    aq, akv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    adapter = pooled * (2 * (features * aq + slots * 2 * features * akv + aq * a.hidden_size
                             + 2 * a.hidden_size * a.intermediate_size + a.intermediate_size * t.hidden_size)
                        + 4 * a.num_heads * a.head_dim * slots)
    parts = {"lm": 4 * tokens * p_lm, "lora": 6 * tokens * p_lora, "attention": 3 * per_pair * pairs,
             "vision": vit + adapter}
    model = sum(parts.values())
    executed = (model + 2 * tokens * (p_lm + p_lora)  # the rematerialised forward
                + 4 * per_pair * dense_tokens ** 2 - 3 * per_pair * pairs)  # fwd + recompute + 2x bwd, dense
    return {"model_flops": model, "executed_flops": executed, "parts": parts, "tokens": tokens,
            "attention_pairs": pairs, "dense_pairs": dense_tokens ** 2, "p_lm": p_lm, "p_lora": p_lora}


# -- timing ------------------------------------------------------------------------------------------

def time_calls(call, warmup: int, repeats: int) -> dict:
    """`call` (which ends with a device sync) run `warmup` times, then timed `repeats` times."""
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "seconds": seconds}


def log(message: str) -> None:
    print(message, flush=True)


class Results:
    """The side's JSON, rewritten after every part (a killed process keeps what it finished)."""

    def __init__(self, path: pathlib.Path, side: str):
        self.path, self.side, self.data = path, side, {"meta": {}, "parts": {}}

    def meta(self, **values) -> None:
        self.data["meta"].update(values)
        self.write()

    def part(self, name: str, values: dict) -> None:
        self.data["parts"][f"{PREFIX[self.side]}_{name}"] = values
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=float))


def run_parts(side: str, parts: dict, wanted: list[str], deadline: float, results: Results, min_part_s: float) -> None:
    """Each part in order, on its own: a failure is recorded and the next part runs."""
    for name in wanted:
        label = f"{PREFIX[side]}_{name}"
        if time.time() > deadline - min_part_s:
            log(f"{label}: skipped: out of time")
            results.part(name, {"status": "skipped", "error": "out of time"})
            continue
        log(f"{label}: running")
        start = time.time()
        try:
            values = parts[name]()
            values.update(status="ok", part_s=time.time() - start)
            results.part(name, values)
            log(f"{label}: done in {time.time() - start:.0f} s")
        except Exception as error:  # noqa: BLE001 - one part failing (OOM, no cuDNN) must not stop the others
            message = f"{type(error).__name__}: {str(error)[:600]}"
            log(f"part {label} failed: {message}")
            traceback.print_exc(file=sys.stderr)
            results.part(name, {"status": "failed", "error": message})


# -- ours (JAX) --------------------------------------------------------------------------------------

def jax_side(args, sizes: Sizes, results: Results, deadline: float) -> None:
    import functools

    import jax
    import jax.numpy as jnp

    from mrrm_jax.core import lora
    from mrrm_jax.core import reward
    from mrrm_jax.training import step
    from mrrm_jax.backbones.molmo2 import Molmo2

    backend = jax.default_backend()
    config = sizes.config.replace(attention=args.attention or ("cudnn" if backend == "gpu" else "xla"),
                                  remat=args.remat)
    devices = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    log(f"jax {jax.__version__}, backend {backend}, devices {devices}")
    results.meta(jax_version=jax.__version__, jax_backend=backend, jax_devices=devices)
    spec = lora.LoraSpec(rank=sizes.lora_rank)
    head = reward.ValueHead(reward.HeadConfig())
    tx = step.make_optimizer(1e-4, 1000)
    key = jax.random.key

    examples = train_examples(sizes, train_groups(sizes, args.row_tokens))
    batch_np = {k: v[None] for k, v in ours_row(examples, config, args.row_tokens).items()}  # [micro 1, rows 1, ...]
    flops = train_flops(config, sizes.lora_rank, examples, args.row_tokens)
    results.meta(train_flops=flops, example_tokens=[len(e.ids) for e in examples])
    init_batch = ours_example(examples[0], config)  # one example with an image: every parameter is made
    # The parameters do not depend on the attention backend; xla keeps a failing backend out of the init.
    init_base = lambda key_: Molmo2(config.replace(attention="xla")).init(key_, init_batch)["params"]
    base_shapes = jax.eval_shape(init_base, key(0))

    def initial_state(base):
        head_params = head.init(key(1), jnp.zeros((1, config.text.hidden_size)))["params"]
        return step.initial_state(step.trainable_tree(head_params, lora.init(base, spec, key(2))), tx)

    cache = {"attention": config.attention}

    def base():
        if "base" not in cache:
            start = time.perf_counter()
            cache["base"] = jax.block_until_ready(jax.jit(init_base)(key(0)))
            log(f"  random base: {sum(x.size for x in jax.tree.leaves(base_shapes)) / 1e9:.2f} G weights "
                f"({config.param_dtype}) in {time.perf_counter() - start:.0f} s")
        return cache["base"]

    def with_attention(run) -> dict:
        """`run(config)` with the chosen attention; if that fails (say cuDNN refuses the shapes), with xla."""
        try:
            return run(config.replace(attention=cache["attention"]))
        except Exception as error:  # noqa: BLE001
            if cache["attention"] == "xla" or time.time() > deadline - 60:
                raise
            failed = f"{cache['attention']}: {type(error).__name__}: {str(error)[:400]}"
            log(f"  {failed}; trying xla attention")
            cache["attention"] = "xla"
            return {**run(config.replace(attention="xla")), "failed_attention": failed}

    def train_with(cfg: Molmo2Config) -> dict:
        params = base()
        state = jax.jit(initial_state)(params)
        batch, rng = jax.device_put(batch_np), key(3)
        fn = jax.jit(functools.partial(step.train_step, step.Model(Molmo2(cfg), head, spec, "cross_entropy"), tx),
                     donate_argnums=(0,))
        start = time.perf_counter()
        lowered = fn.lower(state, params, batch, rng)
        lower_s = time.perf_counter() - start
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start - lower_s
        log(f"  train step ({cfg.attention} attention, remat {cfg.remat}): lowered in {lower_s:.0f} s, compiled in "
            f"{compile_s:.0f} s")
        holder = {"state": state}

        def call():
            holder["state"], metrics = compiled(holder["state"], params, batch, rng)
            holder["metrics"] = jax.block_until_ready(metrics)

        timing = time_calls(call, sizes.warmup, sizes.repeats)
        loss = float(holder["metrics"]["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"the train step's loss is {loss}")
        temp_gib = getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0) / 2**30
        return {"attention": cfg.attention, "remat": cfg.remat, "lower_s": lower_s, "compile_s": compile_s,
                "first_call_s": lower_s + compile_s, "loss": loss,
                "lora_params": lora.num_parameters(holder["state"]["trainable"]["lora"]), "temp_gib": temp_gib,
                **timing,
                **step_numbers(timing["median_s"], timing["min_s"], flops, args.peak_tflops)}

    def score_with(cfg: Molmo2Config) -> dict:
        params = base()
        head_params = head.init(key(4), jnp.zeros((1, cfg.text.hidden_size)))["params"]
        backbone = Molmo2(cfg)
        fn = jax.jit(lambda p, h, b: reward.forward_scores(backbone, head, p, {"head": h, "lora": {}}, b))
        out = {"groups": sizes.score_groups, "num_responses": sizes.num_responses, "attention": cfg.attention}
        for mode, examples_ in score_examples(sizes).items():
            batch = jax.device_put(collate.collate([ours_example(e, cfg) for e in examples_]))
            start = time.perf_counter()
            compiled = fn.lower(params, head_params, batch).compile()
            compile_s = time.perf_counter() - start
            scores = np.asarray(compiled(params, head_params, batch))
            if not np.isfinite(scores[np.asarray(batch["read_positions"]) >= 0]).all():
                raise FloatingPointError(f"{mode}: scores {scores} are not finite")
            timing = time_calls(lambda: jax.block_until_ready(compiled(params, head_params, batch)), sizes.warmup,
                                sizes.repeats)
            rows, tokens, crops = batch["tokens"].shape[0], batch["tokens"].shape[1], batch["crops"].shape[1]
            shape = f"{rows} rows x {tokens} tokens, {crops} crops each"
            log(f"  score {mode}: {shape}, compiled in {compile_s:.0f} s, {timing['median_s'] * 1e3:.1f} ms")
            out[mode] = {"shape": shape, "compile_s": compile_s, **timing,
                         "groups_per_s": sizes.score_groups / timing["median_s"]}
        out["multi_over_single"] = out["multi"]["groups_per_s"] / out["single"]["groups_per_s"]
        return out

    def xla_flops() -> dict:
        # Abstract arguments (nothing allocated), lowered only. Every layer is unrolled: the loops left
        # (the unrolled stacks, the one micro-step) run once, and XLA counts a loop body once.
        count_cfg = config.replace(attention="xla", scan_unroll=max(config.vision.num_layers, config.text.num_layers))
        state = jax.eval_shape(initial_state, base_shapes)
        batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch_np)
        fn = jax.jit(functools.partial(step.train_step, step.Model(Molmo2(count_cfg), head, spec, "cross_entropy"), tx))
        start = time.perf_counter()
        lowered = fn.lower(state, base_shapes, batch, key(3))
        # The CPU backend counts the lowered program; the GPU one counts only a compiled one (seen on jax
        # 0.11.2: `Lowered.cost_analysis()` is None there).
        analysis = lowered.cost_analysis() or lowered.compile().cost_analysis()
        counted = float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])
        log(f"  lowered the unrolled step and counted in {time.perf_counter() - start:.0f} s")
        return {"xla_flops": counted, "executed_flops": flops["executed_flops"],
                "xla_over_executed": counted / flops["executed_flops"], "model_flops": flops["model_flops"]}

    run_parts("jax", {"train": lambda: with_attention(train_with), "score": lambda: with_attention(score_with),
                      "xla_flops": xla_flops}, args.part_list, deadline, results, args.min_part_s)


def step_numbers(median_s: float, min_s: float, flops: dict, peak_tflops: float) -> dict:
    peak = peak_tflops * 1e12
    return {"tokens_per_s": flops["tokens"] / median_s, "model_tflops_per_step": flops["model_flops"] / 1e12,
            "mfu": flops["model_flops"] / (median_s * peak), "mfu_at_min": flops["model_flops"] / (min_s * peak),
            "executed_tflops_per_step": flops["executed_flops"] / 1e12}


# -- the PyTorch reference ---------------------------------------------------------------------------

def hf_config_kwargs(config: Molmo2Config) -> dict:
    """transformers `Molmo2Config` arguments for our architecture (the inverse of `Molmo2Config.from_hf_dict`)."""
    v, a, t = config.vision, config.adapter, config.text
    return {
        "vision_config": dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                              num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                              num_key_value_heads=v.num_heads, head_dim=v.head_dim, layer_norm_eps=v.layer_norm_eps,
                              patch_size=v.patch_size, image_size=list(v.image_size), num_channels=v.num_channels,
                              attention_bias=v.attention_bias),
        "adapter_config": dict(vision_feature_layer=list(a.feature_layers), hidden_size=a.hidden_size,
                               num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
                               head_dim=a.head_dim, attention_bias=a.attention_bias,
                               intermediate_size=a.intermediate_size, mlp_bias=a.mlp_bias,
                               text_hidden_size=t.hidden_size),
        "text_config": dict(hidden_size=t.hidden_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                            num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
                            intermediate_size=t.intermediate_size, vocab_size=t.vocab_size,
                            additional_vocab_size=t.additional_vocab_size, attention_bias=t.attention_bias,
                            qk_norm_type=t.qk_norm_type, rms_norm_eps=t.rms_norm_eps, norm_after=t.norm_after,
                            max_position_embeddings=t.max_position_embeddings, rope_parameters=dict(t.rope),
                            rope_scaling_layers=None if t.rope_scaling_layers is None else list(t.rope_scaling_layers)),
        "tie_word_embeddings": t.tie_word_embeddings,
    }


def torch_side(args, sizes: Sizes, results: Results, deadline: float) -> None:
    import peft
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText
    from transformers import Molmo2Config as HFMolmo2Config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, {name}")
    results.meta(torch_version=torch.__version__, transformers_version=transformers.__version__,
                 peft_version=peft.__version__, torch_device=name)
    config = sizes.config
    hf_config = HFMolmo2Config(**hf_config_kwargs(config))
    parsed = Molmo2Config.from_hf_dict(hf_config.to_dict())
    # Our config leaves `rope_scaling_layers` None (every layer); transformers lists them all.
    comparable = lambda c: (dataclasses.replace(c.text, rope_scaling_layers=None), c.text.scaled_rope_layers,
                            c.vision, c.adapter)
    if comparable(parsed) != comparable(config):
        raise AssertionError(f"the transformers config does not read back as ours: {parsed} != {config}")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(hf_config, attn_implementation="sdpa", dtype=torch.bfloat16)
    model.to(device)  # a no-op unless some buffer was made elsewhere
    sync()
    log(f"  random model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} G weights (with the unused LM head) "
        f"in {time.perf_counter() - start:.0f} s, attention {model.config._attn_implementation}")
    hidden = config.text.hidden_size

    def value_head():
        torch.manual_seed(3)  # as ours: Linear(H, 1024) -> SiLU -> Linear(1024, 1), float32
        return torch.nn.Sequential(torch.nn.Linear(hidden, 1024), torch.nn.SiLU(), torch.nn.Linear(1024, 1)).to(device)

    def to_device(examples: list[Example]) -> tuple[dict, torch.Tensor]:
        inputs = {k: torch.from_numpy(v).to(device) for k, v in hf_inputs(examples, sizes.vision).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        reads = torch.from_numpy(padded([e.read_positions for e in examples])).long().to(device)
        return inputs, reads

    def scores_of(backbone, head, inputs, reads):
        hidden_btd = backbone(**inputs, use_cache=False).last_hidden_state
        features = hidden_btd[torch.arange(len(reads), device=device)[:, None], reads.clamp(min=0)]
        return head(features.float())[..., 0] / math.sqrt(hidden)

    state = {}

    def train() -> dict:
        peft_model = peft.get_peft_model(model, peft.LoraConfig(r=sizes.lora_rank, lora_alpha=16, lora_dropout=0.05,
                                                                target_modules=PEFT_TARGETS))
        state["peft"] = peft_model
        if args.torch_checkpointing:
            peft_model.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.train()
        backbone = peft_model.base_model.model.model  # Molmo2Model: the reward path has no LM head
        head = value_head()
        trained = [p for p in peft_model.parameters() if p.requires_grad] + list(head.parameters())
        optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: max(0.0, 1 - i / 1000))
        examples = train_examples(sizes, train_groups(sizes, args.row_tokens))
        inputs, reads = to_device(examples)
        labels = torch.tensor([e.label for e in examples], device=device)
        flops = train_flops(config, sizes.lora_rank, examples, args.row_tokens)
        losses = []

        def call():
            loss = torch.nn.functional.cross_entropy(scores_of(backbone, head, inputs, reads), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            sync()

        start = time.perf_counter()
        call()
        first_s = time.perf_counter() - start
        log(f"  train step: batch {tuple(inputs['input_ids'].shape)}, checkpointing {args.torch_checkpointing}, "
            f"first call {first_s:.1f} s")
        timing = time_calls(call, max(sizes.warmup - 1, 0), sizes.repeats)
        loss = float(losses[-1])
        if not math.isfinite(loss):
            raise FloatingPointError(f"the train step's loss is {loss}")
        peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n)
        return {"batch": list(inputs["input_ids"].shape), "checkpointing": args.torch_checkpointing,
                "lora_params": lora_params,
                "first_call_s": first_s, "loss": loss, "peak_gib": peak_gib, **timing,
                **step_numbers(timing["median_s"], timing["min_s"], flops, args.peak_tflops)}

    def score() -> dict:
        plain = state["peft"].unload() if "peft" in state else model  # LoRA removed: a merged model's cost
        plain.eval()
        backbone, head = plain.model, value_head().eval()
        out = {"groups": sizes.score_groups, "num_responses": sizes.num_responses}
        for mode, examples in score_examples(sizes).items():
            inputs, reads = to_device(examples)

            def call():
                with torch.inference_mode():
                    scores = scores_of(backbone, head, inputs, reads)
                sync()
                return scores

            start = time.perf_counter()
            scores = call().float().cpu().numpy()
            first_s = time.perf_counter() - start
            if not np.isfinite(scores[padded([e.read_positions for e in examples]) >= 0]).all():
                raise FloatingPointError(f"{mode}: scores {scores} are not finite")
            timing = time_calls(call, sizes.warmup, sizes.repeats)
            shape = f"{inputs['input_ids'].shape[0]} rows x {inputs['input_ids'].shape[1]} tokens"
            log(f"  score {mode}: {shape}, first call {first_s:.1f} s, {timing['median_s'] * 1e3:.1f} ms")
            out[mode] = {"shape": shape, "first_call_s": first_s, **timing,
                         "groups_per_s": sizes.score_groups / timing["median_s"]}
        out["multi_over_single"] = out["multi"]["groups_per_s"] / out["single"]["groups_per_s"]
        return out

    run_parts("torch", {"train": train, "score": score}, [p for p in args.part_list if p in SIDES["torch"]],
              deadline, results, args.min_part_s)


# -- the parent: two children, one table ------------------------------------------------------------

def table(merged: dict, peak_tflops: float) -> str:
    parts = merged["parts"]
    get = lambda part, *keys: _dig(parts.get(part), keys)
    rows = [("train step first call s (ours: trace+compile)", "train", ("first_call_s",), "{:.1f}", True),
            ("train step s (median)", "train", ("median_s",), "{:.3f}", True),
            ("train step s (min)", "train", ("min_s",), "{:.3f}", True),
            ("train tokens/s", "train", ("tokens_per_s",), "{:,.0f}", False),
            (f"MFU (model FLOPs, peak {peak_tflops:g} TF/s)", "train", ("mfu",), "{:.1%}", False),
            ("score groups/s, multi (N=4 in 1 pass)", "score", ("multi", "groups_per_s"), "{:.2f}", False),
            ("score groups/s, single (N passes)", "score", ("single", "groups_per_s"), "{:.2f}", False),
            ("multi / single (x)", "score", ("multi_over_single",), "{:.2f}", False)]
    lines = [f"{'':44}{'ours (JAX)':>14}{'PyTorch':>14}{'ours/torch':>12}"]
    for label, part, keys, fmt, lower_is_better in rows:
        ours, torch_ = get(f"ours_{part}", *keys), get(f"torch_{part}", *keys)
        show = lambda x, status: fmt.format(x) if x is not None else status
        ratio = "" if ours is None or torch_ is None or not torch_ else (
            f"{(torch_ / ours if lower_is_better else ours / torch_):.2f}x")
        lines.append(f"{label:44}{show(ours, _status(parts, f'ours_{part}')):>14}"
                     f"{show(torch_, _status(parts, f'torch_{part}')):>14}{ratio:>12}")
    lines.append("(ours/torch > 1: ours faster)")
    return "\n".join(lines)


def _dig(node, keys):
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _status(parts: dict, name: str) -> str:
    return parts.get(name, {}).get("status", "not run")


def run_child(side: str, args, argv: list[str], deadline: float, out: pathlib.Path) -> dict:
    """The side's parts in a child process, killed past the deadline (it keeps what it finished)."""
    json_path = out.with_name(f"{out.stem}.{side}.json")
    log_path = out.with_name(f"{out.stem}.{side}.log")
    json_path.unlink(missing_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "bench.gpu", *argv, "--side", side, "--side_out", str(json_path),
               "--deadline", str(deadline)]
    with open(log_path, "w") as stderr:
        try:
            # stdout (the progress lines) goes straight through; stderr (tracebacks, library noise) to the log.
            timeout = max(deadline - time.time(), 1) + 30
            code = subprocess.run(command, stderr=stderr, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "killed past the deadline"
    merged = json.loads(json_path.read_text()) if json_path.exists() else {"meta": {}, "parts": {}}
    for part in SIDES[side]:
        name = f"{PREFIX[side]}_{part}"
        if part in args.part_list and name not in merged["parts"]:
            merged["parts"][name] = {"status": "failed", "error": f"the {side} process ended ({code}) before it"}
            log(f"part {name} failed: the {side} process ended ({code}) before it; see {log_path}")
    if code != 0:
        tail = log_path.read_text().strip().splitlines()[-8:]
        log(f"{side} process exit {code}; its stderr ends:\n  " + "\n  ".join(tail))
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="JSON results file")
    parser.add_argument("--budget_s", type=float, default=480, help="parts starting after this are skipped")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="H200 dense bf16 (datasheet)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--sides", default="jax,torch", help="jax, torch or both")
    parser.add_argument("--tiny", action="store_true", help="tiny dimensions (a CPU test)")
    parser.add_argument("--row_tokens", type=int, default=None, help="tokens of the packed training row")
    parser.add_argument("--score_groups", type=int, default=None, help="groups per scoring batch")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls after the first")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (median and min reported)")
    parser.add_argument("--attention", default=None, help="ours: cudnn on GPU, xla elsewhere, unless given")
    parser.add_argument("--remat", default="full", help="ours: none, full, dots, dots_no_batch")
    parser.add_argument("--torch_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--jax_share", type=float, default=0.6, help="share of the budget the JAX side may use")
    parser.add_argument("--min_part_s", type=float, default=None, help="no part starts with less time left")
    parser.add_argument("--side", choices=tuple(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--side_out", type=pathlib.Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    sizes = dataclasses.replace(sizes, **{k: getattr(args, k) for k in ("score_groups", "warmup", "repeats")
                                          if getattr(args, k) is not None})
    args.row_tokens = args.row_tokens or sizes.row_tokens
    args.part_list = [p for p in args.parts.split(",") if p]
    if unknown := set(args.part_list) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    args.min_part_s = (0 if args.tiny else 20) if args.min_part_s is None else args.min_part_s

    if args.side:  # a child
        results = Results(args.side_out, args.side)
        (jax_side if args.side == "jax" else torch_side)(args, sizes, results, args.deadline)
        return

    start = time.time()
    deadline = start + args.budget_s
    t, v = sizes.config.text, sizes.config.vision
    log(f"bench.gpu: {'TINY' if args.tiny else 'Molmo2-4B'} dims (LM {t.num_layers} x {t.hidden_size}, ViT "
        f"{v.num_layers} x {v.hidden_size}), {sizes.config.param_dtype}, LoRA r {sizes.lora_rank}; train row "
        f"{args.row_tokens} tokens; score {sizes.score_groups} groups x N={sizes.num_responses}; "
        f"{sizes.warmup} warm-up + {sizes.repeats} timed calls; budget {args.budget_s:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    child_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    merged = {"meta": {"args": {k: str(v) for k, v in vars(args).items()}, "peak_tflops": args.peak_tflops},
              "parts": {}}
    sides = [s for s in args.sides.split(",") if s]
    for side in sides:
        side_deadline = deadline if side == sides[-1] else start + args.jax_share * args.budget_s
        result = run_child(side, args, child_argv, side_deadline, args.out)
        merged["meta"].update(result["meta"])
        merged["parts"].update(result["parts"])
    merged["meta"]["total_s"] = time.time() - start
    args.out.write_text(json.dumps(merged, indent=1, default=float))

    flops = merged["meta"].get("train_flops")
    tera = lambda x: f"{x / 1e12:.4g} T"
    if flops:
        parts = flops["parts"]
        log(f"\nmodel FLOPs per train step: {tera(flops['model_flops'])} over {flops['tokens']} tokens: LM "
            f"{tera(parts['lm'])}, LoRA {tera(parts['lora'])}, attention {tera(parts['attention'])} "
            f"({flops['attention_pairs'] / 1e6:.4g} M visible pairs), vision {tera(parts['vision'])}; executed "
            f"with remat and a dense mask ({flops['dense_pairs'] / 1e6:.4g} M pairs): {tera(flops['executed_flops'])}")
    counted = merged["parts"].get("ours_xla_flops", {})
    if counted.get("status") == "ok":
        log(f"XLA cost_analysis of the step (unrolled, xla attention): {tera(counted['xla_flops'])} = "
            f"{counted['xla_over_executed']:.3f} x the executed estimate")
    for name, part in merged["parts"].items():
        if part.get("status") != "ok":
            log(f"{name}: {part.get('status')}: {part.get('error', '')[:300]}")
    ours, theirs = merged["parts"].get("ours_train", {}), merged["parts"].get("torch_train", {})
    if ours.get("status") == "ok":
        log(f"ours train: {ours['attention']} attention" + (f" (after {ours['failed_attention']})" if
                                                             "failed_attention" in ours else "")
            + f", remat {ours['remat']}, LoRA {ours['lora_params'] / 1e6:.2f} M weights, loss {ours['loss']:.3f}, "
            f"XLA temporaries {ours['temp_gib']:.1f} GiB")
    if theirs.get("status") == "ok":
        log(f"torch train: batch {theirs['batch']}, gradient checkpointing {theirs['checkpointing']}, LoRA "
            f"{theirs['lora_params'] / 1e6:.2f} M weights, loss {theirs['loss']:.3f}, peak {theirs['peak_gib']:.1f} GiB")
    log("\n" + table(merged, args.peak_tflops))
    log(f"\nresults: {args.out}; total {merged['meta']['total_s']:.0f} s")


if __name__ == "__main__":
    main()
