"""Convert a Molmo2 PyTorch/Hugging Face checkpoint (safetensors) into an mrrm_jax base checkpoint.

    python tools/convert_checkpoint.py --hf_dir=DIR --out=DIR [--dtype=bfloat16]

Accepts the transformers-native layout and the original release layout; reads tensor by tensor
(no PyTorch needed) and writes one layer at a time.
"""

import pathlib

from absl import app, flags

from mrrm_jax import checkpoint, convert
from mrrm_jax.models.molmo2 import Molmo2Config

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory (config.json + *.safetensors).")
_OUT = flags.DEFINE_string("out", None, "Output directory for the converted checkpoint.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Cast weights (default: keep the checkpoint's).")


def main(argv):
    del argv
    hf_dir = pathlib.Path(_HF_DIR.value)
    cfg = Molmo2Config.from_hf_dir(hf_dir)
    shards = convert.SafetensorsShards(hf_dir)
    has_lm_head = any(convert.native_name(k) == "lm_head.weight" for k in shards.entries)
    cfg = cfg.replace(with_lm_head=has_lm_head and not cfg.text.tie_word_embeddings)
    out = checkpoint.save_base(_OUT.value, cfg, convert.converted_leaves(shards, cfg, dtype=_DTYPE.value))
    print(f"converted {len(shards.entries)} tensors from {hf_dir} -> {out}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["hf_dir", "out"])
    app.run(main)
