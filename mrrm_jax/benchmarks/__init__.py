"""Benchmarks: release-format converters (formats), metrics as pure functions (metrics), reports (report)."""
