"""Import a PyTorch multi-response reward model in the released layout into an mrrm_jax reward-model directory.

    python tools/import_reward_model.py --base=HF_MODEL_DIR --adapter=PEFT_DIR --out=DIR

--base: the Molmo2 checkpoint the adapter was trained on (transformers or original layout, safetensors).
--adapter: PEFT LoRA adapter dir with value_head.pt (or .safetensors) and reward_model_config.json.
No PyTorch is needed (a .pt value head is read by mrrm_jax.interop.torch_files).
"""

import sys

from absl import app, flags

from mrrm_jax.interop import reward_io

_BASE = flags.DEFINE_string("base", None, "Hugging Face Molmo2 checkpoint directory (config.json + *.safetensors).")
_ADAPTER = flags.DEFINE_string("adapter", None, "The released reward model's PEFT adapter directory.")
_OUT = flags.DEFINE_string("out", None, "Output reward-model directory (base/, trainable/, reward_config.json, processor/).")


def main(argv):
    del argv
    try:
        out = reward_io.import_peft(_BASE.value, _ADAPTER.value, _OUT.value)
    except (OSError, ValueError, KeyError) as error:
        sys.exit(f"error: {error}")
    print(f"imported {_ADAPTER.value} over {_BASE.value} -> {out}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["base", "adapter", "out"])
    app.run(main)
