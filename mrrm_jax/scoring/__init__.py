"""Scoring groups of responses with a trained reward model: loading it, batch shapes, the batched forward."""
