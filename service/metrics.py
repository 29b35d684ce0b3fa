"""Prometheus metrics (prometheus-client), one registry per application so tests can build many apps."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)


class Metrics:
    """Everything /metrics shows. The worker pool reports runs through the methods at the bottom."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.inputs_enqueued = Counter(
            "service_inputs_enqueued", "User messages accepted (durable)", registry=r
        )
        self.inputs_queued = Gauge("service_inputs_queued", "Inputs waiting in the queue", registry=r)
        self.runs_running = Gauge("service_runs_running", "Runs in progress in this process", registry=r)
        self.runs = Counter("service_runs", "Runs ended, by outcome", ["outcome", "team"], registry=r)
        self.run_duration = Histogram(
            "service_run_duration_seconds",
            "Run duration",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        self.entries_appended = Counter(
            "service_entries_appended",
            "Log entries committed and published by this process (user messages included)",
            registry=r,
        )
        self.ws_connections = Gauge("service_websocket_connections", "Open WebSocket connections", registry=r)
        self.replay_entries = Histogram(
            "service_replay_entries",
            "Entries replayed to a (re)connecting client",
            registry=r,
            buckets=(0, 1, 10, 100, 1000, 10_000, 100_000),
        )

        self.webhook_deliveries = Counter(
            "service_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered, failed (tried again later), gave_up",
            ["outcome"],
            registry=r,
        )

    def webhook_delivery(self, outcome: str) -> None:
        self.webhook_deliveries.labels(outcome).inc()

    # --- the worker pool's hooks (service.worker.pool.PoolMetrics) ---
    def run_started(self, team: str) -> None:
        self.runs_running.inc()

    def run_ended(self, team: str, outcome: str, duration_s: float) -> None:
        """outcome: completed, failed, retried, cancelled, interrupted, ..."""
        self.runs_running.dec()
        self.runs.labels(outcome, team).inc()
        self.run_duration.observe(duration_s)
