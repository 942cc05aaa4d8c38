"""Peak memory of tools/convert_checkpoint.py on a multi-shard Molmo2 checkpoint of a few GB.

    python -m bench.convert_memory [--layout=native|original] [--hidden=1024] [--layers=16] [--mlp=4096]

Run from the repository root. Writes a random float32 Molmo2 checkpoint (LM `--layers` x `--hidden`,
MLP `--mlp`, 16 heads / 8 KV heads of 64, vocab 151936 + 128, untied lm_head; a small ViT) straight
to safetensors shards of at most `--shard_bytes` each, with a `model.safetensors.index.json` and the
config.json of `transformers.Molmo2Config`, in a temp dir. Tensor names and shapes come from a
`Molmo2ForConditionalGeneration` built on the meta device (no memory); `--layout=original` rewrites
them to the original release layout that `save_pretrained` writes by default (fused `att_proj` =
[q; k; v] rows, `ff_proj` = [up; gate] rows, the embedding split in two equal halves
`wte.embedding` / `wte.new_embedding`, `transformer.*` / `vision_backbone.*` names).

Then runs `python tools/convert_checkpoint.py` in a subprocess and reads its peak RSS (ru_maxrss
from wait4, in a bare launcher process: see `bench.measure`), and the same for a bare
`python -c "import jax, orbax.checkpoint, mrrm_jax.interop.convert"` baseline (and one that also starts
the jax backend, as the converter does). Finally loads the result with `mrrm_jax.backbones.checkpoint.load_base`
and checks a few leaves against the source tensors. Everything is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import tempfile
import time

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import Molmo2Config as HFMolmo2Config
from transformers import Molmo2ForConditionalGeneration

from bench.measure import run_measured

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 64
GiB, MiB = 2**30, 2**20


def hf_config(hidden: int, layers: int, mlp: int) -> HFMolmo2Config:
    vit = 256
    return HFMolmo2Config(
        vision_config=dict(hidden_size=vit, intermediate_size=2 * vit, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=64, image_size=[378, 378]),
        adapter_config=dict(vision_feature_layer=[-1, -2], hidden_size=vit, num_attention_heads=4,
                            num_key_value_heads=4, head_dim=64, intermediate_size=mlp, text_hidden_size=hidden),
        text_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=mlp,
                         vocab_size=151936, additional_vocab_size=128, attention_bias=True),
    )


def native_shapes(config: HFMolmo2Config) -> dict[str, tuple[int, ...]]:
    """The names and shapes `save_pretrained(..., save_original_format=False)` writes, in model order."""
    with torch.device("meta"):
        model = Molmo2ForConditionalGeneration(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# Native -> original names for the one-to-one tensors (the inverse of backbones/molmo2/conversion.py RENAMES).
_TO_ORIGINAL = [
    (r"^model\.language_model\.layers\.(\d+)\.input_layernorm\.", r"model.transformer.blocks.\1.attn_norm."),
    (r"^model\.language_model\.layers\.(\d+)\.post_attention_layernorm\.", r"model.transformer.blocks.\1.ff_norm."),
    (r"^model\.language_model\.layers\.(\d+)\.self_attn\.o_proj\.", r"model.transformer.blocks.\1.self_attn.attn_out."),
    (r"^model\.language_model\.layers\.(\d+)\.mlp\.down_proj\.", r"model.transformer.blocks.\1.mlp.ff_out."),
    (r"^model\.language_model\.layers\.(\d+)\.", r"model.transformer.blocks.\1."),
    (r"^model\.language_model\.norm\.", "model.transformer.ln_f."),
    (r"^model\.multi_modal_projector\.image_pooling_2d\.([qkvo])_proj\.",
     r"model.vision_backbone.image_pooling_2d.w\1."),
    (r"^model\.multi_modal_projector\.image_projector\.gate_proj\.", "model.vision_backbone.image_projector.w1."),
    (r"^model\.multi_modal_projector\.image_projector\.down_proj\.", "model.vision_backbone.image_projector.w2."),
    (r"^model\.multi_modal_projector\.image_projector\.up_proj\.", "model.vision_backbone.image_projector.w3."),
    (r"^model\.vision_tower\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.",
     r"model.vision_backbone.image_vit.transformer.resblocks.\1.attention.w\2."),
    (r"^model\.vision_tower\.layers\.(\d+)\.mlp\.fc([12])\.",
     r"model.vision_backbone.image_vit.transformer.resblocks.\1.feed_forward.w\2."),
    (r"^model\.vision_tower\.layers\.(\d+)\.layer_norm1\.",
     r"model.vision_backbone.image_vit.transformer.resblocks.\1.attention_norm."),
    (r"^model\.vision_tower\.layers\.(\d+)\.layer_norm2\.",
     r"model.vision_backbone.image_vit.transformer.resblocks.\1.ffn_norm."),
    (r"^model\.vision_tower\.", "model.vision_backbone.image_vit."),
]


def original_shapes(native: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The same model in the original release layout (as `save_pretrained` writes it by default)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in native.items():
        fused = re.match(r"model\.language_model\.layers\.(\d+)\.(self_attn\.[qkv]_proj|mlp\.(?:gate|up)_proj)\.(\w+)",
                         name)
        if name == "model.language_model.embed_tokens.weight":
            half = (shape[0] // 2, *shape[1:])
            out["model.transformer.wte.embedding"] = half
            out["model.transformer.wte.new_embedding"] = (shape[0] - half[0], *shape[1:])
        elif fused:
            layer, part, kind = fused.groups()
            target = (f"model.transformer.blocks.{layer}.self_attn.att_proj.{kind}" if part.startswith("self_attn")
                      else f"model.transformer.blocks.{layer}.mlp.ff_proj.{kind}")
            previous = out.get(target)
            out[target] = shape if previous is None else (previous[0] + shape[0], *shape[1:])
        else:
            for pattern, replacement in _TO_ORIGINAL:
                new = re.sub(pattern, replacement, name)
                if new != name:
                    name = new
                    break
            out[name] = shape
    return out


def write_checkpoint(out_dir: pathlib.Path, config: HFMolmo2Config, shapes: dict[str, tuple[int, ...]],
                     shard_bytes: int, seed: int = 0) -> list[pathlib.Path]:
    """Random float32 tensors in safetensors shards of <= shard_bytes (one tensor may exceed it alone)."""
    out_dir.mkdir(parents=True)
    config.to_json_file(out_dir / "config.json")
    rng = np.random.default_rng(seed)
    groups: list[list[str]] = [[]]
    group_bytes = 0
    for name, shape in shapes.items():
        size = 4 * int(np.prod(shape))
        if groups[-1] and group_bytes + size > shard_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append(name)
        group_bytes += size
    weight_map, files, total_bytes = {}, [], 0
    for i, names in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            if re.search(r"norm.*\.weight$", name):
                tensors[name] = 1.0 + 0.1 * rng.standard_normal(shapes[name], dtype=np.float32)
            else:
                tensors[name] = 0.02 * rng.standard_normal(shapes[name], dtype=np.float32)
            weight_map[name] = filename
            total_bytes += tensors[name].nbytes
        save_file(tensors, out_dir / filename, metadata={"format": "pt"})
        del tensors
        files.append(out_dir / filename)
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def read_tensor(hf_dir: pathlib.Path, name: str) -> np.ndarray:
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    with safe_open(hf_dir / index["weight_map"][name], "np") as f:
        return f.get_tensor(name)


def check_leaves(hf_dir: pathlib.Path, out_dir: pathlib.Path, layout: str, mlp: int) -> list[str]:
    """Load with checkpoint.load_base and compare a few leaves to the source tensors."""
    from mrrm_jax.backbones import checkpoint

    cfg, params = checkpoint.load_base(out_dir)
    layer = cfg.text.num_layers // 2
    lm = params["language_model"]
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    if layout == "native":
        prefix = f"model.language_model.layers.{layer}."
        sources = {
            "embedding": lambda: read_tensor(hf_dir, "model.language_model.embed_tokens.weight"),
            "k_proj kernel": lambda: read_tensor(hf_dir, prefix + "self_attn.k_proj.weight").T,
            "v_proj bias": lambda: read_tensor(hf_dir, prefix + "self_attn.v_proj.bias"),
            "gate_proj kernel": lambda: read_tensor(hf_dir, prefix + "mlp.gate_proj.weight").T,
        }
    else:
        prefix = f"model.transformer.blocks.{layer}."
        sources = {
            "embedding": lambda: np.concatenate([read_tensor(hf_dir, "model.transformer.wte.embedding"),
                                                 read_tensor(hf_dir, "model.transformer.wte.new_embedding")]),
            "k_proj kernel": lambda: read_tensor(hf_dir, prefix + "self_attn.att_proj.weight")[
                q_rows: q_rows + kv_rows].T,
            "v_proj bias": lambda: read_tensor(hf_dir, prefix + "self_attn.att_proj.bias")[q_rows + kv_rows:],
            "gate_proj kernel": lambda: read_tensor(hf_dir, prefix + "mlp.ff_proj.weight")[mlp: 2 * mlp].T,
        }
    ours = {
        "embedding": lambda: lm["embed_tokens"]["embedding"],
        "k_proj kernel": lambda: lm["layers"]["self_attn"]["k_proj"]["kernel"][layer],
        "v_proj bias": lambda: lm["layers"]["self_attn"]["v_proj"]["bias"][layer],
        "gate_proj kernel": lambda: lm["layers"]["mlp"]["gate_proj"]["kernel"][layer],
    }
    import jax

    loaded_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    lines = [f"  loaded params: {loaded_bytes / GiB:.3f} GiB in {len(jax.tree.leaves(params))} stacked leaves"]
    for what, source in sources.items():
        expected, got = source(), np.asarray(ours[what]())
        equal = expected.shape == got.shape and np.array_equal(expected, got)
        lines.append(f"  {what + (f' (layer {layer})' if what != 'embedding' else ''):28} {str(got.shape):>16} "
                     f"{'equal' if equal else 'DIFFERENT'}")
        if not equal:
            raise AssertionError(f"{what}: converted leaf differs from the source tensor\n" + "\n".join(lines))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=["native", "original"], default="native")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--mlp", type=int, default=4096)
    parser.add_argument("--shard_bytes", type=int, default=800 * MiB)
    parser.add_argument("--tmp_root", default=None, help="where the temp dir goes (default: the system's)")
    args = parser.parse_args()

    config = hf_config(args.hidden, args.layers, args.mlp)
    shapes = native_shapes(config)
    if args.layout == "original":
        shapes = original_shapes(shapes)
    tensor_bytes = {name: 4 * int(np.prod(s)) for name, s in shapes.items()}
    largest_name = max(tensor_bytes, key=tensor_bytes.get)
    # The largest leaf our converter builds: the original layout's two embedding halves become one.
    largest_leaf_bytes = 4 * args.hidden * (151936 + 128)
    largest_leaf_bytes = max(largest_leaf_bytes, tensor_bytes[largest_name])

    with tempfile.TemporaryDirectory(prefix="convert_memory_", dir=args.tmp_root) as tmp:
        tmp = pathlib.Path(tmp)
        hf_dir, out_dir = tmp / "hf", tmp / "converted"
        start = time.perf_counter()
        files = write_checkpoint(hf_dir, config, shapes, args.shard_bytes)
        write_seconds = time.perf_counter() - start
        checkpoint_bytes = sum(f.stat().st_size for f in files)

        baseline_bytes = run_measured(
            [sys.executable, "-c", "import jax, orbax.checkpoint, mrrm_jax.interop.convert"], tmp / "baseline.log").peak_rss_bytes
        baseline_backend_bytes = run_measured(
            [sys.executable, "-c", "import jax, orbax.checkpoint.experimental.v1, mrrm_jax.interop.convert, "
                                   "mrrm_jax.backbones.checkpoint, absl.app; jax.numpy.zeros(1).block_until_ready()"],
            tmp / "baseline_backend.log").peak_rss_bytes
        converted = run_measured(
            [sys.executable, "tools/convert_checkpoint.py", f"--hf_dir={hf_dir}", f"--out={out_dir}"],
            tmp / "convert.log")
        peak_bytes, convert_seconds = converted.peak_rss_bytes, converted.wall_s
        converted_bytes = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())

        rows = [
            ("layout", args.layout),
            ("checkpoint on disk", f"{checkpoint_bytes / GiB:.3f} GiB in {len(files)} shards "
                                   f"({len(shapes)} tensors, written in {write_seconds:.0f} s)"),
            ("largest source tensor", f"{tensor_bytes[largest_name] / MiB:.0f} MiB ({largest_name})"),
            ("largest converted leaf", f"{largest_leaf_bytes / MiB:.0f} MiB (language_model/embed_tokens/embedding)"),
            ("converted on disk", f"{converted_bytes / GiB:.3f} GiB (conversion took {convert_seconds:.0f} s)"),
            ("baseline RSS (imports)", f"{baseline_bytes / MiB:.0f} MiB"),
            ("baseline RSS (+ backend)", f"{baseline_backend_bytes / MiB:.0f} MiB"),
            ("converter peak RSS", f"{peak_bytes / MiB:.0f} MiB"),
            ("peak - baseline", f"{(peak_bytes - baseline_bytes) / MiB:.0f} MiB"),
            ("(peak - baseline) / largest source", f"{(peak_bytes - baseline_bytes) / tensor_bytes[largest_name]:.2f}"),
            ("(peak - baseline) / largest leaf", f"{(peak_bytes - baseline_bytes) / largest_leaf_bytes:.2f}"),
            ("(peak - baseline) / checkpoint", f"{(peak_bytes - baseline_bytes) / checkpoint_bytes:.2f}"),
            ("(peak - baseline+backend) / largest",
             f"{(peak_bytes - baseline_backend_bytes) / largest_leaf_bytes:.2f}"),
        ]
        print()
        for key, value in rows:
            print(f"{key:36} {value}")
        print(f"\nload_base + source comparison (layout={args.layout}):")
        for line in check_leaves(hf_dir, out_dir, args.layout, args.mlp):
            print(line)
    print(f"\ntemp dir {tmp} removed: {not tmp.exists()}")


if __name__ == "__main__":
    main()
