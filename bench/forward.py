"""Forward throughput on CPU: our jitted Flax Molmo2 vs transformers' PyTorch Molmo2, same weights.

    python -m bench.forward [--lm_layers=4] [--hidden=256] [--text_tokens=512] [--repeats=5] [--max_crops=8]
                            [--threads=1] [--no-with_logits] [--attention=blockwise]

Run from the repository root. Builds a small random transformers `Molmo2ForConditionalGeneration`
(LM: `--lm_layers` layers of width `--hidden`, head_dim 64, hidden/64 heads, half as many KV heads,
MLP 3 x hidden, vocab 151936 + 128; ViT: 378 x 378 crops of 27 x 27 patches, width 128, 5 layers),
saves it with `save_pretrained`, converts it with our converter, and feeds both the same inputs:
one random 640 x 480 image plus about `--text_tokens` text tokens, through `Molmo2Processor`
(default image settings unless `--max_crops` says otherwise).

Timed, in one process, interleaved, median of `--repeats` runs each:
  ours      jit(Molmo2.apply) -> final-norm hidden states (compile time reported separately)
  pytorch   model.model(...) (the base model, no LM head) under torch.inference_mode()
and, with `--with_logits` (default on), both again including the LM head. Both sides use all cores
(torch.set_num_threads), or, with `--threads=1`, the process is pinned to one core. The machine may
be shared: the script prints how much CPU other processes took during the timed runs, and min
times beside medians. `--attention` picks our LM attention backend (default: the config's, `xla`).

Measured (2-core machine, idle, JAX_PLATFORMS=cpu), ours / PyTorch tokens/s, final hidden states:
  python -m bench.forward --attention=blockwise                                    1278 tokens: 1.19x (median), 1.21x (min)
  python -m bench.forward --attention=blockwise --text_tokens=3330 --no-with_logits  4096 tokens: 1.66x (median), 1.64x (min)
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers import Molmo2Config as HFMolmo2Config
from transformers import Molmo2ForConditionalGeneration

from mrrm_jax.backbones import checkpoint
from mrrm_jax.interop import convert
from mrrm_jax.backbones.molmo2.processor_files import write_molmo2_processor_dir
from mrrm_jax.backbones.molmo2 import Molmo2

try:  # processor outputs -> our batch layout (moved out of tests/oracle.py)
    from mrrm_jax.backbones.molmo2.hf_batch import batch_from_processor
except ImportError:
    from tests.oracle import to_batch as batch_from_processor

HEAD_DIM = 64
VIT_HIDDEN = 128
VIT_LAYERS = 5
CROP_PIXELS = 378
WORDS = ("the", "image", "shows", "a", "small", "dog", "running", "across", "green", "field", "near", "river",
         "while", "children", "watch", "from", "bridge", "under", "cloudy", "sky", "which", "answer", "is",
         "better", "because", "it", "describes", "colors", "and", "shapes", "more", "precisely")


def hf_config(lm_layers: int, hidden: int) -> HFMolmo2Config:
    heads = hidden // HEAD_DIM
    text = dict(hidden_size=hidden, num_hidden_layers=lm_layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2), head_dim=HEAD_DIM, intermediate_size=3 * hidden,
                vocab_size=151936, additional_vocab_size=128)
    return HFMolmo2Config(
        vision_config=dict(hidden_size=VIT_HIDDEN, intermediate_size=4 * VIT_HIDDEN, num_hidden_layers=VIT_LAYERS,
                           num_attention_heads=2, num_key_value_heads=2, head_dim=HEAD_DIM,
                           image_size=[CROP_PIXELS, CROP_PIXELS]),
        adapter_config=dict(vision_feature_layer=[-1, -3], hidden_size=VIT_HIDDEN, num_attention_heads=2,
                            num_key_value_heads=2, head_dim=HEAD_DIM, intermediate_size=3 * hidden,
                            text_hidden_size=hidden),
        text_config=text,
    )


def build_inputs(processor, text_tokens: int, seed: int = 0) -> dict:
    """One 640 x 480 random image and a user text such that the non-image tokens number ~`text_tokens`."""
    rng = np.random.RandomState(seed)
    image = Image.fromarray(rng.randint(0, 256, (480, 640, 3), dtype=np.uint8))
    word_ids = processor.tokenizer(" ".join(rng.choice(WORDS, 2 * text_tokens)), add_special_tokens=False)["input_ids"]

    def run(n_user_tokens):
        text = processor.tokenizer.decode(word_ids[:n_user_tokens])
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
                    {"role": "assistant", "content": "The first one."}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        return processor(text=prompt, images=[image], return_tensors="pt")

    def non_image_tokens(inputs):
        return int((inputs["mm_token_type_ids"] == 0).sum())

    overhead = non_image_tokens(run(0))
    return run(max(0, text_tokens - overhead))


def busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, by this process) so far: their difference over the
    timed window is what OTHER processes took from us (the machine may be shared)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = resource.getrusage(resource.RUSAGE_SELF)
    return machine, own.ru_utime + own.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm_layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--text_tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max_crops", type=int, default=None, help="image processor max_crops (default: its own, 8)")
    parser.add_argument("--attention", default=None, help="our LM attention backend (default: the config's, xla)")
    parser.add_argument("--with_logits", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=None,
                        help="cores for both sides (default: all); fewer pins the whole process to that many cores")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    threads = args.threads or cores
    if threads < cores:
        # XLA:CPU ignores --xla_cpu_multi_thread_eigen / intra_op_parallelism_threads here (measured: it
        # still keeps 2 cores busy), so pin the process; must happen before the jax backend starts.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
        cores = threads
    torch.set_num_threads(threads)
    print(f"cores={cores} torch threads={torch.get_num_threads()} jax devices={jax.devices()} "
          f"jax {jax.__version__} torch {torch.__version__}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        image_kwargs = {} if args.max_crops is None else {"max_crops": args.max_crops}
        processor = AutoProcessor.from_pretrained(write_molmo2_processor_dir(tmp / "processor",
                                                                             image_processor_kwargs=image_kwargs))
        inputs = build_inputs(processor, args.text_tokens)

        torch.manual_seed(0)
        torch_model = Molmo2ForConditionalGeneration(hf_config(args.lm_layers, args.hidden)).eval()
        with torch.no_grad():  # norm weights start at 1; randomise them so a mis-mapped norm shows
            for name, p in torch_model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        torch_model.save_pretrained(tmp / "hf", save_original_format=False)
        converted = convert.convert_dir(tmp / "hf", tmp / "ours")
        cfg, params = checkpoint.load_base(converted)
    if args.attention:
        cfg = cfg.replace(attention=args.attention)
    print(f"attention implementation (pytorch): {torch_model.config._attn_implementation}; ours: {cfg.attention}")

    batch_np = batch_from_processor(inputs, cfg.image_patch_id)
    batch = jax.device_put({k: np.asarray(v) for k, v in batch_np.items()})
    tokens_per_forward = int(batch_np["tokens"].size)
    image_tokens = int(inputs["mm_token_type_ids"].sum())
    print(f"tokens per forward: {tokens_per_forward} ({image_tokens} image-block, "
          f"{tokens_per_forward - image_tokens} text; {inputs['pixel_values'].shape[0]} crops of "
          f"{inputs['pixel_values'].shape[1]} patches; {int((batch_np['tokens'] == cfg.image_patch_id).sum())} "
          f"<im_patch>)")

    model = Molmo2(cfg)
    hidden_fn = lambda p, b: model.apply({"params": p}, b)
    logits_fn = lambda p, b: model.apply({"params": p}, b, method=lambda m, b: m.logits(m(b)))
    torch_kwargs = dict(inputs)
    torch_kwargs["use_cache"] = False

    compile_seconds, ours_compiled = {}, {}
    for name, fn in (("hidden", hidden_fn), ("logits", logits_fn))[: 2 if args.with_logits else 1]:
        start = time.perf_counter()
        ours_compiled[name] = jax.jit(fn).lower(params, batch).compile()
        compile_seconds[name] = time.perf_counter() - start

    def ours(name):
        return lambda: ours_compiled[name](params, batch).block_until_ready()

    def pytorch_base():
        with torch.inference_mode():
            return torch_model.model(**torch_kwargs).last_hidden_state

    def pytorch_full():
        with torch.inference_mode():
            return torch_model(**torch_kwargs).logits

    runs = {"ours": ours("hidden"), "pytorch": pytorch_base}
    if args.with_logits:
        runs.update({"ours+logits": ours("logits"), "pytorch+logits": pytorch_full})

    # Warm-up, 3 rounds (the first runs of both sides are slow), and the outputs for the agreement check.
    outputs = {name: fn() for name, fn in runs.items()}
    for _ in range(2):
        for fn in runs.values():
            fn()
    seconds = {name: [] for name in runs}
    cpu_seconds = {name: 0.0 for name in runs}  # this process's CPU time: how many cores each side kept busy
    machine_start, own_start = busy_cpu_seconds()
    wall_start = time.perf_counter()
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both sides alike
        for name, fn in runs.items():
            start, cpu_start = time.perf_counter(), sum(os.times()[:2])
            fn()
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name] += sum(os.times()[:2]) - cpu_start
    wall_seconds = time.perf_counter() - wall_start
    machine_end, own_end = busy_cpu_seconds()
    other_cpu_seconds = max(0.0, (machine_end - machine_start) - (own_end - own_start))

    real = batch_np["segment_ids"].astype(bool)
    hidden_diff = float(np.abs(np.asarray(outputs["ours"]) - outputs["pytorch"].float().numpy())[real].max())
    hidden_scale = float(np.abs(outputs["pytorch"].float().numpy())[real].max())

    print("\ncompile seconds (ours, excluded from timings): "
          + ", ".join(f"{k} {v:.2f}" for k, v in compile_seconds.items()))
    print(f"\nLM {args.lm_layers} layers x {args.hidden} wide; {threads} thread(s) per side; median of {args.repeats} "
          f"interleaved runs, batch 1\n")
    print(f"{'':16}{'tokens':>8}{'median s':>11}{'tokens/s':>11}{'min s':>9}{'max s':>9}{'tokens/s @min':>15}"
          f"{'cores busy':>12}")
    tokens_per_s = {}
    for name, samples in seconds.items():
        med = statistics.median(samples)
        tokens_per_s[name] = tokens_per_forward / med
        print(f"{name:16}{tokens_per_forward:>8}{med:>11.4f}{tokens_per_s[name]:>11.0f}{min(samples):>9.4f}"
              f"{max(samples):>9.4f}{tokens_per_forward / min(samples):>15.0f}"
              f"{cpu_seconds[name] / sum(samples):>12.2f}")
    machine_cpu_seconds = os.cpu_count() * wall_seconds
    print(f"\nother processes used {other_cpu_seconds:.1f} CPU-seconds of the machine's {machine_cpu_seconds:.1f} "
          f"during the timed runs" + (" (shared machine: timings are noisy; the min column is the less disturbed "
                                      "estimate)" if other_cpu_seconds > 0.05 * machine_cpu_seconds else ""))
    pairs = [("hidden states", "ours", "pytorch")] + ([("with logits", "ours+logits", "pytorch+logits")]
                                                     if args.with_logits else [])
    for label, a, b in pairs:
        print(f"ratio ours/pytorch tokens/s ({label}): median {tokens_per_s[a] / tokens_per_s[b]:.2f}x, "
              f"min {min(seconds[b]) / min(seconds[a]):.2f}x")
    if args.with_logits:
        logits_diff = float(np.abs(np.asarray(outputs["ours+logits"]) - outputs["pytorch+logits"].float().numpy())
                            [real].max())
    print(f"\noutputs agree: max abs diff of final hidden states over non-pad tokens {hidden_diff:.2e} "
          f"(max |hidden| {hidden_scale:.2f})" + (f"; logits {logits_diff:.2e}" if args.with_logits else ""))


if __name__ == "__main__":
    main()
