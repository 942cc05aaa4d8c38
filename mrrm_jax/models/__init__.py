"""Network layers every backbone shares: attention (XLA, blockwise, Pallas), the decoder stack, rope, dense layers, and the transformers config and checkpoint names they share."""
