"""Training a reward model: the run spec, its data, the sharded step, the loop, run checkpoints and AOT compiles."""
