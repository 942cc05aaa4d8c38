"""The server's Prometheus metrics (GET /metrics), in a registry of its own."""

from __future__ import annotations

import prometheus_client as prom


class ServerMetrics:
    def __init__(self):
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("mrrm_requests", "Requests by endpoint", ["endpoint"], registry=self.registry)
        self.errors = prom.Counter("mrrm_errors", "Error responses by HTTP status", ["code"], registry=self.registry)
        self.latency = prom.Histogram("mrrm_request_latency_seconds", "Request latency", ["endpoint"],
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                      registry=self.registry)
        self.batch_groups = prom.Histogram("mrrm_batch_groups", "Groups per model batch",
                                           buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.batch_rows = prom.Histogram("mrrm_batch_rows", "Packed rows per model batch",
                                         buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)
        # The share of a batch's token slots that hold a group's tokens: what batching buys on an
        # accelerator, where a batch costs its shape whatever fills it.
        self.batch_fill = prom.Histogram("mrrm_batch_fill", "Tokens of the groups / token slots of the batch",
                                         buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                                         registry=self.registry)
        self.batch_seconds = prom.Histogram("mrrm_batch_seconds", "Model time per batch",
                                            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                            registry=self.registry)
        self.blank_responses = prom.Counter("mrrm_blank_responses", "Blank (empty, whitespace) responses, scored "
                                            "at their group's floor", registry=self.registry)
        self.queue_depth = prom.Gauge("mrrm_queue_depth", "Groups waiting for the model", registry=self.registry)
        self.programs = prom.Gauge("mrrm_compiled_programs", "Compiled model programs (batch shapes)",
                                   registry=self.registry)

    def on_batch(self, groups: int, rows: int, fill: float, seconds: float) -> None:
        self.batch_groups.observe(groups)
        self.batch_rows.observe(rows)
        self.batch_fill.observe(fill)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)
