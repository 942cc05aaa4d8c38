"""Convert a Molmo2 or Qwen3-VL PyTorch/Hugging Face checkpoint (safetensors) into an mrrm_jax base checkpoint.

    python tools/convert_checkpoint.py --hf_dir=DIR --out=DIR [--dtype=bfloat16]

The backbone comes from config.json's `model_type`. For Molmo2, accepts the transformers-native
layout and the original release layout; reads tensor by tensor
(no PyTorch needed) and writes one layer at a time.
"""

from mrrm_jax.core import host_malloc

# glibc gives every writer thread (tensorstore's) its own arena, and freed tensor-sized blocks stay
# spread over them: measured, peak RSS then grows with the checkpoint instead of with its largest
# tensor (4.4x vs 3.2x the largest tensor on a 4 GB checkpoint). Before jax and tensorstore start.
host_malloc.limit_arenas(2)

from absl import app, flags, logging  # noqa: E402

from mrrm_jax.interop import convert  # noqa: E402

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory (config.json + *.safetensors).")
_OUT = flags.DEFINE_string("out", None, "Output directory for the converted checkpoint.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Cast weights (default: keep the checkpoint's).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every partial save at INFO
    out = convert.convert_dir(_HF_DIR.value, _OUT.value, dtype=_DTYPE.value)
    print(f"converted {_HF_DIR.value} -> {out}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["hf_dir", "out"])
    app.run(main)
