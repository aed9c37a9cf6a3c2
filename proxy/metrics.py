"""Prometheus metrics on a per-app registry (no module-level collectors, so apps and tests don't clash).

Labels carry only route templates, model/task names the server knows, statuses and dataset ids:
never request content, dataset names' rows or label contents. The output is admin-only (``GET
/metrics`` needs the admin key or the scrape token): per-dataset budgets and spend, and request
latencies that include waited warm-ups, whose duration depends on private data.

Several worker processes (``dpicl serve --workers N``) share one view through prometheus-client's
multiprocess mode: ``serve`` points :data:`MULTIPROC_ENV` at a fresh directory before the workers
start, each worker's values go to files there, and :meth:`Metrics.render` adds them up (gauges show
the most recent value written by any worker).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["MULTIPROC_ENV", "Metrics", "CONTENT_TYPE_LATEST"]

#: prometheus-client reads it when it is imported: set it before a worker process starts.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """All collectors of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "dpicl_requests_total", "HTTP requests by route template, model and status.",
            ["route", "model", "status"], registry=self.registry)
        self.latency = Histogram(
            "dpicl_request_seconds", "HTTP request latency in seconds (to the last body byte).",
            ["route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.upstream_errors = Counter(
            "dpicl_upstream_errors_total", "Upstream failures by model and HTTP status sent to the client.",
            ["model", "status"], registry=self.registry)
        self.demo_cache = Counter(
            "dpicl_demo_cache_total", "Demonstration cache lookups on task requests (hit / miss).",
            ["task", "result"], registry=self.registry)
        self.demo_generations = Counter(
            "dpicl_demo_generations_total", "Demonstration sets generated (warm-ups), by task and outcome.",
            ["task", "outcome"], registry=self.registry)
        self.epsilon_spent = Gauge(
            "dpicl_epsilon_spent", "Spent privacy budget (epsilon) per dataset id.",
            ["dataset_id"], registry=self.registry, multiprocess_mode="mostrecent")
        self.epsilon_budget = Gauge(
            "dpicl_epsilon_budget", "Privacy budget (epsilon) per dataset id.",
            ["dataset_id"], registry=self.registry, multiprocess_mode="mostrecent")

    def record_spend(self, dataset_id: str, spent: float, budget: float | None = None) -> None:
        """Update the per-dataset gauges after a spend (or a budget change) was recorded."""
        self.epsilon_spent.labels(dataset_id).set(spent)
        if budget is not None:
            self.epsilon_budget.labels(dataset_id).set(budget)

    def forget_dataset(self, dataset_id: str) -> None:
        for gauge in (self.epsilon_spent, self.epsilon_budget):
            try:
                gauge.remove(dataset_id)
            except KeyError:
                pass

    def render(self) -> bytes:
        """Text exposition format (of every worker process in multiprocess mode)."""
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
