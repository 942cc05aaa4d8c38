"""Export an mrrm_jax reward-model directory to the released PyTorch layout (PEFT adapter + value head).

    python tools/export_reward_model.py --checkpoint=DIR --out=PEFT_DIR [--layout=native|original]

--layout=native names modules as transformers' Molmo2 (`PeftModel.from_pretrained` on
`Molmo2ForConditionalGeneration` loads it); --layout=original uses the original Molmo2 code's fused
`att_proj` / `ff_proj`, as the release does, which needs q/k/v (and up/gate) to share one LoRA A.
"""

from absl import app, flags

from mrrm_jax.interop import reward_io

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "mrrm_jax reward-model directory.")
_OUT = flags.DEFINE_string("out", None, "Output PEFT adapter directory (new or empty).")
_LAYOUT = flags.DEFINE_enum("layout", "native", reward_io.EXPORT_LAYOUTS, "Module naming of the adapter.")


def main(argv):
    del argv
    out = reward_io.export_peft(_CHECKPOINT.value, _OUT.value, layout=_LAYOUT.value)
    print(f"exported {_CHECKPOINT.value} -> {out} ({_LAYOUT.value} module names)")


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint", "out"])
    app.run(main)
