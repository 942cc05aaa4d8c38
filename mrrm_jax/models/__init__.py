"""Network layers every backbone shares: attention (XLA, blockwise, Pallas), the decoder stack, rope, dense layers, HF config helpers."""
