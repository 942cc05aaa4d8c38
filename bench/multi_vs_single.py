"""Multi-response scoring (one sequence with all N responses) vs the single-response baseline.

    python -m bench.multi_vs_single [--sizes=1,2,4,8,16] [--repeats=3] [--skip_flops] [--skip_wallclock]
        [--no-forward_only] [--prompt_tokens=40] [--response_tokens=100] [--lm_layers=4] [--hidden=256]

Run from the repository root. One image prompt (a random 640 x 480 image, a ~`--prompt_tokens` token
prompt) and N ~`--response_tokens` token responses (varied English-ish text from a fixed seed), laid
out by our formatter with a Molmo2 processor at its DEFAULT settings (378 x 378 crops, max 8 crops,
2x2 pooling: the image gives 5 crops, 766 image-block tokens). For each N:

1. FLOPs at the REAL Molmo2-4B dimensions (`Molmo2Config.molmo2_4b(with_lm_head=False)`), from XLA's
   `cost_analysis()` of the compiled reward forward (`reward.forward_scores`: ViT, adapter, LM with
   merged weights, value head; no LM head). Parameters are abstract (`jax.eval_shape` of the init),
   nothing is materialised or run: `jit(f).lower(...).compile()` only. `scan_unroll` = the larger
   layer count (LM 36; for the ViT's 25 layers an unroll above the length unrolls all of them too), since
   XLA counts a loop body once; the script checks that no while loop is left. The compile uses
   `xla_backend_optimization_level=0`: cost analysis runs on the optimised HLO, before the LLVM
   backend, so the count is the same and the compile about twice as fast.
   Exact shapes: each sequence at its own length and crop count, no padding. multi = the one
   N-response sequence; single = the SUM over the N one-response sequences (one compile per distinct
   shape; here all N have the same length). The paper's row "640x480 image, prompt 40" is printed
   next to ours. A second table counts the shapes the library actually runs (`collate`: tokens to a
   multiple of 128, crops and pooled tokens to a power of two, `score_single` = one batch of N rows)
   from the lowered (pre-optimisation) HLO, which the first table shows agrees with the compiled count.

2. CPU wall clock, in one process, interleaved, median of `--repeats` runs after a warm-up (which
   compiles), on a SMALL random model with the same processor: a transformers
   `Molmo2ForConditionalGeneration` (LM `--lm_layers` x `--hidden`, head_dim 64; ViT 5 layers x 128
   on 378 x 378 crops) saved, converted with our converter, wrapped in a reward-model directory with
   random LoRA (merged at load) and value head, loaded with `RewardModel.load`.
     multi   `model.score(prompt, responses, images)`: ONE sequence with all N responses
     single  `model.score_single(...)`: N one-response sequences, run as ONE padded batch of N rows
             (that is what `score_single` does), so the image is processed and encoded N times
   Both end to end (formatting + image preprocessing + forward) and, unless `--no-forward_only`, forward
   only (`score_examples` on examples built beforehand). Next to the times: this small model's own FLOP
   ratio at the padded shapes it runs (its ViT is a larger share of the cost than in Molmo2-4B, so its
   ratios are higher than table 1's). Checks that every score is finite.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from bench.measure import busy_cpu_seconds
from mrrm_jax.backbones import checkpoint
from mrrm_jax.interop import convert
from mrrm_jax.core import lora
from mrrm_jax.core import reward
from mrrm_jax.data import collate, formatting
from mrrm_jax.backbones.molmo2.processor_files import write_molmo2_processor_dir
from mrrm_jax.backbones.qwen3_vl.processor_files import write_qwen3_vl_processor_dir
from mrrm_jax import backbones
from mrrm_jax.backbones.molmo2 import Molmo2, Molmo2Config
from mrrm_jax.backbones.qwen3_vl import Qwen3VLConfig

# Paper, "Efficiency claim": N single passes / one multi pass, forward FLOPs at Molmo2-4B dims,
# row "640x480 image, prompt 40" (responses ~100 tokens).
PAPER_RATIOS = {2: 1.85, 4: 3.19, 8: 4.96, 16: 6.71}

# Compile options for counting only (the executable is never run).
COUNT_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

SMALL_HEAD_DIM, SMALL_VIT_HIDDEN, SMALL_VIT_LAYERS, CROP_PIXELS = 64, 128, 5, 378

SUBJECTS = ("the dog", "a small child", "the red car", "an old man", "the cat", "two birds", "the woman",
            "a tall tree", "the river", "the bright kite", "a wooden boat", "the yellow bus", "three horses")
VERBS = ("is running across", "sits quietly near", "appears to float above", "stands beside", "moves toward",
         "is partly hidden behind", "looks at", "crosses", "rests under", "leans against", "waits next to")
OBJECTS = ("a green field", "the stone bridge", "a cloudy sky", "the busy street", "a sandy beach",
           "the snowy hill", "a crowded market", "the quiet lake", "an open window", "a wooden fence")
CLAUSES = ("while children watch from far away", "which suggests a warm afternoon",
           "and the colors are soft and muted", "although the lighting is uneven", "so the scene feels calm",
           "because the photo was taken at dusk", "and several shadows fall to the left",
           "but the details in the corner are blurry", "as a light wind moves the grass")
OPENERS = ("In this image,", "Overall,", "Looking closely,", "On the left,", "In the background,",
           "At first glance,", "In my view,", "To answer the question,", "Notably,", "Finally,")


def english_text(rng: np.random.RandomState, sentences: int) -> str:
    out = []
    for _ in range(sentences):
        s = (f"{rng.choice(OPENERS)} {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
             + (f", {rng.choice(CLAUSES)}" if rng.rand() < 0.6 else "") + ".")
        out.append(s)
    return " ".join(out)


PROMPT = ("Which of these descriptions of the image is the most accurate and complete? Consider the objects, "
          "their positions and colors, the lighting and any visible text, and explain briefly what the other "
          "answers get wrong, and which small details they miss or invent.")


def exact_tokens(tokenizer, text: str, n: int, end: str = ".") -> str:
    """The longest word prefix of `text`, closed with `end`, that tokenizes (standalone) to exactly `n`
    tokens; failing that, a token-level cut; failing that, None."""
    count = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])
    words = text.split(" ")
    candidates = [" ".join(words[:k]).rstrip(",.;?") + end for k in range(len(words), 0, -1)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    candidates += [tokenizer.decode(ids[:k]).rstrip(" ,.;?") + end for k in range(min(len(ids), n + 2), 0, -1)]
    return next((c for c in candidates if count(c) == n), None)


def make_inputs(tokenizer, prompt_tokens: int, response_tokens: int, num: int, seed: int = 0):
    """(image, prompt, responses): deterministic, every response a different text of the same length."""
    rng = np.random.RandomState(seed)
    image = Image.fromarray(rng.randint(0, 256, (480, 640, 3), dtype=np.uint8))
    prompt = exact_tokens(tokenizer, PROMPT + " " + english_text(rng, prompt_tokens // 10), prompt_tokens, end="?")
    responses = []
    while len(responses) < num:  # a text with no cut of exactly the length is skipped (rare)
        response = exact_tokens(tokenizer, english_text(rng, 2 + response_tokens // 8), response_tokens)
        if response is not None:
            responses.append(response)
    return image, prompt, responses


def example(processor, prompt, responses, image) -> dict:
    """What `RewardModel.example` builds: a one-row batch with read positions."""
    formatted = formatting.format_example(processor, prompt, responses, [image])
    batch = processor.model_batch(formatted.processor_outputs)
    batch["read_positions"] = formatted.read_positions[None].astype(np.int32)
    if getattr(formatted, "response_starts", None) is not None:
        batch["response_starts"] = formatted.response_starts[None].astype(np.int32)
    return batch


def _abstract(batch: dict) -> dict:
    return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}


def _signature(batch: dict) -> tuple:
    return tuple(sorted((k, np.shape(v)) for k, v in batch.items()))


def _describe(batch: dict) -> str:
    media = "patches" if "patches" in batch else "crops"
    return f"{batch['tokens'].shape[0]}x{batch['tokens'].shape[1]} tokens, {batch[media].shape[1]} {media}"


# -- 1. FLOPs at 4B dims ------------------------------------------------------------------------

# --backbone -> (the 4B config, its processor directory at the checkpoint's default settings)
BACKBONES = {"molmo2": (lambda: Molmo2Config.molmo2_4b(with_lm_head=False), write_molmo2_processor_dir),
             "qwen3_vl": (lambda: Qwen3VLConfig.qwen3_vl_4b(with_lm_head=False), write_qwen3_vl_processor_dir)}


class FlopCounter:
    """Compiled (and lowered) XLA flop counts of the reward forward at 4B dims, per batch shape."""

    def __init__(self, base):
        unroll = max(base.vision.num_layers, base.text.num_layers)
        self.cfg = base.replace(scan_unroll=unroll)
        self.model, self.head = backbones.module(self.cfg), reward.ValueHead(reward.HeadConfig())
        self.params = None
        self.head_params = jax.eval_shape(
            lambda: self.head.init(jax.random.key(0), jnp.zeros((1, self.cfg.text.hidden_size)))["params"])
        self.fn = jax.jit(lambda p, h, b: reward.forward_scores(self.model, self.head, p, {"head": h, "lora": {}}, b))
        self.compiled, self.lowered, self.compile_seconds = {}, {}, []

    def _params(self, batch):
        if self.params is None:  # abstract: shapes only, no 4B weights in memory
            self.params = jax.eval_shape(lambda b: self.model.init(jax.random.key(0), b)["params"], _abstract(batch))
            count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
            print(f"{self.cfg.model_type} 4B without LM head: {count / 1e9:.3f}B parameters (abstract), "
                  f"scan_unroll={self.cfg.scan_unroll}")
        return self.params

    def _lower(self, batch):
        return self.fn.lower(self._params(batch), self.head_params, _abstract(batch))

    def lowered_flops(self, batch) -> float:
        key = _signature(batch)
        if key not in self.lowered:
            self.lowered[key] = float(self._lower(batch).cost_analysis()["flops"])
        return self.lowered[key]

    def compiled_flops(self, batch) -> float:
        key = _signature(batch)
        if key not in self.compiled:
            start = time.perf_counter()
            lowered = self._lower(batch)
            self.lowered.setdefault(key, float(lowered.cost_analysis()["flops"]))
            compiled = lowered.compile(COUNT_COMPILE_OPTIONS)
            if " while(" in compiled.as_text():
                raise RuntimeError("a while loop survived: cost_analysis would count its body once")
            self.compiled[key] = float(compiled.cost_analysis()["flops"])
            self.compile_seconds.append(time.perf_counter() - start)
            print(f"  compiled {_describe(batch)}: {self.compiled[key] / 1e9:,.1f} GFLOPs "
                  f"({self.compile_seconds[-1]:.0f} s)", flush=True)
        return self.compiled[key]


def run_flops(processor, config, sizes, prompt_tokens, response_tokens):
    print(f"\n== 1. Forward FLOPs at {config.model_type} 4B dims (XLA cost_analysis of the compiled reward forward) ==")
    counter = FlopCounter(config)
    image, prompt, responses = make_inputs(processor.tokenizer, prompt_tokens, response_tokens, max(sizes))
    rows, as_run = [], []
    for n in sizes:
        multi = example(processor, prompt, responses[:n], image)
        singles = [example(processor, prompt, [r], image) for r in responses[:n]]
        if n == sizes[0]:
            vision = int((processor.create_mm_token_type_ids(multi["tokens"]) > 0).sum())
            print(f"one {n}-response sequence: {_describe(multi)}, of which {vision} vision tokens")
            lengths = [len(processor.tokenizer(r, add_special_tokens=False)['input_ids']) for r in responses]
            print(f"prompt {len(processor.tokenizer(prompt, add_special_tokens=False)['input_ids'])} tokens; "
                  f"responses {min(lengths)}..{max(lengths)} tokens each (standalone)")
        flops_multi = counter.compiled_flops(multi)
        flops_single = sum(counter.compiled_flops(s) for s in singles)
        tokens_single = sum(s["tokens"].shape[1] for s in singles)
        rows.append((n, multi["tokens"].shape[1], tokens_single, flops_multi, flops_single))
        if config.model_type == "molmo2":  # what the library runs: collate([multi]) and collate(singles)
            padded_multi, padded_single = collate.collate([multi]), collate.collate(singles)
            as_run.append((n, padded_multi, padded_single, counter.lowered_flops(padded_multi),
                           counter.lowered_flops(padded_single)))

    print(f"\nexact shapes (no padding); single = sum over the N one-response sequences; "
          f"{len(counter.compiled)} compiles, {sum(counter.compile_seconds):.0f} s\n")
    print(f"{'N':>3}{'tokens multi':>14}{'tokens single':>15}{'GFLOPs multi':>15}{'GFLOPs single':>15}"
          f"{'single/multi':>14}{'paper':>8}{'ours/paper':>12}")
    for n, tokens_multi, tokens_single, flops_multi, flops_single in rows:
        ratio = flops_single / flops_multi
        paper = PAPER_RATIOS.get(n) if config.model_type == "molmo2" else None
        print(f"{n:>3}{tokens_multi:>14}{tokens_single:>15}{flops_multi / 1e9:>15,.1f}{flops_single / 1e9:>15,.1f}"
              f"{ratio:>13.2f}x" + (f"{paper:>7.2f}x{ratio / paper:>12.3f}" if paper else f"{'-':>8}{'-':>12}"))
    agreement = max(abs(counter.lowered[k] - v) / v for k, v in counter.compiled.items())
    print(f"(lowered-HLO vs compiled count, max relative difference over these shapes: {agreement:.1e})")

    if not as_run:
        return
    print("\nas the library runs them (collate padding: tokens to x128, crops and pooled tokens to 2^k; "
          "single = ONE batch of N rows); lowered-HLO counts\n")
    print(f"{'N':>3}{'multi shape':>28}{'single shape':>30}{'GFLOPs multi':>15}{'GFLOPs single':>15}"
          f"{'single/multi':>14}{'pad overhead m/s':>18}")
    for (n, padded_multi, padded_single, flops_multi, flops_single), row in zip(as_run, rows):
        print(f"{n:>3}{_describe(padded_multi):>28}{_describe(padded_single):>30}{flops_multi / 1e9:>15,.1f}"
              f"{flops_single / 1e9:>15,.1f}{flops_single / flops_multi:>13.2f}x"
              f"{f'{flops_multi / row[3]:.2f}x/{flops_single / row[4]:.2f}x':>18}")


# -- 2. CPU wall clock on a small model --------------------------------------------------------

def small_hf_config(lm_layers: int, hidden: int):
    from transformers import Molmo2Config as HFMolmo2Config

    heads = hidden // SMALL_HEAD_DIM
    text = dict(hidden_size=hidden, num_hidden_layers=lm_layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2), head_dim=SMALL_HEAD_DIM, intermediate_size=3 * hidden,
                vocab_size=151936, additional_vocab_size=128)
    return HFMolmo2Config(
        vision_config=dict(hidden_size=SMALL_VIT_HIDDEN, intermediate_size=4 * SMALL_VIT_HIDDEN,
                           num_hidden_layers=SMALL_VIT_LAYERS, num_attention_heads=2, num_key_value_heads=2,
                           head_dim=SMALL_HEAD_DIM, image_size=[CROP_PIXELS, CROP_PIXELS]),
        adapter_config=dict(vision_feature_layer=[-1, -3], hidden_size=SMALL_VIT_HIDDEN, num_attention_heads=2,
                            num_key_value_heads=2, head_dim=SMALL_HEAD_DIM, intermediate_size=3 * hidden,
                            text_hidden_size=hidden),
        text_config=text,
    )


def build_reward_dir(tmp: pathlib.Path, processor_dir: pathlib.Path, lm_layers: int, hidden: int) -> pathlib.Path:
    """A random small transformers Molmo2 -> converted base + random LoRA + value head + processor."""
    import torch
    from transformers import Molmo2ForConditionalGeneration

    torch.manual_seed(0)
    torch_model = Molmo2ForConditionalGeneration(small_hf_config(lm_layers, hidden)).eval()
    torch_model.save_pretrained(tmp / "hf", save_original_format=False)
    del torch_model
    out = tmp / "reward"
    convert.convert_dir(tmp / "hf", out / checkpoint.BASE_DIR)
    shutil.rmtree(tmp / "hf")

    cfg, base = checkpoint.load_base(out / checkpoint.BASE_DIR)
    spec = lora.LoraSpec(rank=8, alpha=16)
    factors = lora.init(base, spec, jax.random.key(0))
    factors = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape), factors)
    head_config = reward.HeadConfig()
    head = reward.ValueHead(head_config).init(jax.random.key(2), jnp.zeros((1, cfg.text.hidden_size)))["params"]
    head = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), head)
    checkpoint.save_trainable(out, {"lora": factors, "head": head}, head_config, spec)
    backbones.load_processor(processor_dir).save_pretrained(out / checkpoint.PROCESSOR_DIR)
    return out


def run_wallclock(processor_dir, sizes, repeats, prompt_tokens, response_tokens, lm_layers, hidden,
                  forward_only=True):
    from mrrm_jax.scoring.reward_model import RewardModel

    print(f"\n== 2. CPU wall clock, small random model (LM {lm_layers} x {hidden}, ViT {SMALL_VIT_LAYERS} x "
          f"{SMALL_VIT_HIDDEN}), default processor ==")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        reward_dir = build_reward_dir(pathlib.Path(tmp), processor_dir, lm_layers, hidden)
        model = RewardModel.load(reward_dir)
        print(f"built, converted and loaded in {time.perf_counter() - start:.0f} s; jax devices {jax.devices()}, "
              f"{os.cpu_count()} cores")
    image, prompt, all_responses = make_inputs(model.processor.tokenizer, prompt_tokens, response_tokens, max(sizes))
    # FLOPs of this small model at the shapes it runs (lowered HLO, every layer unrolled): what the
    # wall-clock ratio would be if time followed FLOPs.
    count_cfg = model.config.replace(scan_unroll=max(model.config.vision.num_layers, model.config.text.num_layers))
    count_model = Molmo2(count_cfg)
    count_fn = jax.jit(lambda p, h, b: reward.forward_scores(count_model, model.head, p, {"head": h, "lora": {}}, b))
    small_flops = lambda batch: float(count_fn.lower(model.params, model.head_params, batch).cost_analysis()["flops"])
    results = []
    for n in sizes:
        responses = all_responses[:n]
        ex_multi = model.example(prompt, responses, images=[image])
        ex_singles = [model.example(prompt, [r], images=[image]) for r in responses]
        runs = {
            "multi": lambda: model.score(prompt, responses, images=[image]),
            "single": lambda: model.score_single(prompt, responses, images=[image]),
        }
        if forward_only:  # same compiled programs as above (same padded shapes)
            runs["multi fwd"] = lambda: np.concatenate(model.score_examples([ex_multi]))
            runs["single fwd"] = lambda: np.concatenate(model.score_examples(ex_singles))
        warm, outputs = {}, {}
        for name in ("multi", "single"):  # warm-up: compiles each new shape
            t0 = time.perf_counter()
            outputs[name] = runs[name]()
            warm[name] = time.perf_counter() - t0
        seconds = {name: [] for name in runs}
        machine0, own0 = busy_cpu_seconds()
        wall0 = time.perf_counter()
        for _ in range(repeats):  # interleaved, so load drifts hit both sides alike
            for name, fn in runs.items():
                t0 = time.perf_counter()
                outputs[name] = fn()
                seconds[name].append(time.perf_counter() - t0)
        wall = time.perf_counter() - wall0
        machine1, own1 = busy_cpu_seconds()
        other = max(0.0, (machine1 - machine0) - (own1 - own0)) / (os.cpu_count() * wall)
        for name, out in outputs.items():
            if out.shape != (n,) or not np.isfinite(out).all():
                raise AssertionError(f"N={n} {name}: scores {out} are not {n} finite values")
        padded_multi, padded_single = collate.collate([ex_multi]), collate.collate(ex_singles)
        flop_ratio = small_flops(padded_single) / small_flops(padded_multi)
        results.append((n, seconds, other, flop_ratio, outputs))
        print(f"  N={n:>2}: multi {_describe(padded_multi)}, single {_describe(padded_single)}; warm-up (compile) "
              f"multi {warm['multi']:.1f} s, single {warm['single']:.1f} s; all {n}+{n} scores finite", flush=True)

    med = statistics.median
    print(f"\nmedian of {repeats} interleaved runs, seconds. e2e = score() / score_single(), incl. formatting and "
          "image preprocessing" + ("; fwd = score_examples() on prebuilt examples" if forward_only else "") +
          ".\nsingle = score_single: ONE padded batch of N one-response rows (the image processed and encoded "
          "N times).\n")
    header = f"{'N':>3}{'multi e2e':>11}{'single e2e':>12}{'ratio':>8}"
    if forward_only:
        header += f"{'multi fwd':>11}{'single fwd':>12}{'ratio':>8}{'ratio @min':>12}"
    print(header + f"{'FLOP ratio':>12}{'other load':>12}")
    for n, s, other, flop_ratio, _ in results:
        line = f"{n:>3}{med(s['multi']):>11.3f}{med(s['single']):>12.3f}{med(s['single']) / med(s['multi']):>7.2f}x"
        if forward_only:
            line += (f"{med(s['multi fwd']):>11.3f}{med(s['single fwd']):>12.3f}"
                     f"{med(s['single fwd']) / med(s['multi fwd']):>7.2f}x"
                     f"{min(s['single fwd']) / min(s['multi fwd']):>11.2f}x")
        print(line + f"{flop_ratio:>11.2f}x{other:>11.0%}")
    print("(ratio = single / multi; 'ratio @min' = fastest single fwd / fastest multi fwd; FLOP ratio = this small "
          "model's\nsingle/multi FLOPs at the padded shapes it runs; other load = share of the machine's CPU time "
          "taken by other\nprocesses during the timed runs: high values make the seconds noisy)")
    n, _, _, _, outputs = results[-1]
    print(f"\nscores at N={n} (random model; they differ by design: in multi, responses see the earlier ones and "
          f"are read\nat the token before the separator):\n"
          f"  multi  {np.array2string(outputs['multi'], precision=4, max_line_width=200)}\n"
          f"  single {np.array2string(outputs['single'], precision=4, max_line_width=200)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="molmo2", choices=sorted(BACKBONES),
                        help="FLOPs at this 4B model's dims (the wall clock is Molmo2's small model)")
    parser.add_argument("--sizes", default="1,2,4,8,16", help="numbers of responses N, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_flops", action="store_true")
    parser.add_argument("--skip_wallclock", action="store_true")
    parser.add_argument("--prompt_tokens", type=int, default=40)
    parser.add_argument("--response_tokens", type=int, default=100)
    parser.add_argument("--lm_layers", type=int, default=4, help="small model (wall clock)")
    parser.add_argument("--hidden", type=int, default=256, help="small model (wall clock)")
    parser.add_argument("--forward_only", action=argparse.BooleanOptionalAction, default=True,
                        help="also time score_examples() on prebuilt examples (wall clock)")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})

    start = time.perf_counter()
    print(f"jax {jax.__version__}, {os.cpu_count()} cores; N = {sizes}")
    with tempfile.TemporaryDirectory() as tmp:
        config, write_processor = BACKBONES[args.backbone]
        # The checkpoint's default processor settings.
        processor_dir = write_processor(pathlib.Path(tmp) / args.backbone)
        processor = backbones.load_processor(processor_dir)
        print(f"processor: {processor.image_config}")
        if not args.skip_flops:
            run_flops(processor, config(), sizes, args.prompt_tokens, args.response_tokens)
        if not args.skip_wallclock and args.backbone == "molmo2":
            processor_dir = write_molmo2_processor_dir(pathlib.Path(tmp) / "processor")
            run_wallclock(processor_dir, sizes, args.repeats, args.prompt_tokens, args.response_tokens,
                          args.lm_layers, args.hidden, args.forward_only)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
