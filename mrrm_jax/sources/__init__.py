"""The training sources as released -> records in the paper's schema, decontaminated (`python -m mrrm_jax.prepare`)."""
