"""Prometheus metrics of one server (its own registry: several apps may live in one process, e.g. tests)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, queue_depth, model: str, strategy: str):
        self.registry = r = CollectorRegistry()
        Gauge("dgopt_info", "the artifact served", ["model", "strategy"], registry=r).labels(model, strategy).set(1)
        self.requests = Counter("dgopt_requests", "completion requests by outcome (stop, length, cancelled, "
                                "bad_request, error)", ["outcome"], registry=r)
        self.prompt_tokens = Counter("dgopt_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generated = Counter("dgopt_generated_tokens", "completion tokens sent to clients", registry=r)
        self.tokens_per_s = Gauge("dgopt_tokens_per_second", "tokens generated per second by the last generate "
                                  "call (all its rows)", registry=r)
        self.ttft = Histogram("dgopt_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=_LATENCY, registry=r)
        self.latency = Histogram("dgopt_request_latency_seconds", "request arrival to its last token",
                                 buckets=_LATENCY, registry=r)
        Gauge("dgopt_queue_depth", "requests waiting for the next batch", registry=r).set_function(queue_depth)
        self.batch = Histogram("dgopt_batch_size", "requests per generate call (those that joined it while it ran "
                               "included)", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.joined = Counter("dgopt_rows_joined", "requests that joined a running generate call (continuous "
                              "batching)", registry=r)
        self.tokens_per_step = Histogram("dgopt_tokens_per_step", "tokens committed per row and step-graph call "
                                         "(multi-token strategies > 1)", buckets=(1, 1.5, 2, 2.5, 3, 4, 5, 6, 8),
                                         registry=r)
        self.freed = Counter("dgopt_rows_freed", "rows whose request ended (client gone, stop string) before "
                             "their generate call did", registry=r)
        self.acceptance = Gauge("dgopt_acceptance_rate", "draft proposals accepted / proposed in the last "
                                "generate call (speculative, uag)", registry=r)

    def on_batch(self, stats: dict) -> None:
        """Called by the worker after each generate call (stats of a call cut short hold only batch/tokens)."""
        self.batch.observe(stats.get("requests", stats["batch"]))
        self.joined.inc(stats.get("joined", 0))
        if stats["seconds"] > 0:
            self.tokens_per_s.set(stats["tokens"] / stats["seconds"])
        if stats.get("tokens_per_step"):
            self.tokens_per_step.observe(stats["tokens_per_step"])
        self.freed.inc(stats.get("freed", 0))
        if "acceptance_rate" in stats:
            self.acceptance.set(stats["acceptance_rate"])
