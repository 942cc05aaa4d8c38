"""Benchmarks: release-format converters (formats), metrics as pure functions (metrics), the scoring run (runner), reports (report)."""
