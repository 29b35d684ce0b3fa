"""Optional OpenTelemetry tracing (README "Tracing"), off unless the standard ``OTEL_*`` environment turns it on:
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) exports over OTLP/HTTP,
``OTEL_TRACES_EXPORTER=console`` prints spans, ``OTEL_SDK_DISABLED=true`` or nothing set: no tracing, no network.

Spans: one per HTTP request (``POST /sessions/{session_id}/messages``, continuing a client's ``traceparent``), and
one per run (``run``: session_id, run_id, input_seq, attempt, team, outcome) whose parent is the request that
enqueued the message: its trace context travels with the queued input (``inputs.trace_context``), so a retried
run, after a restart or on another instance, joins the same trace. AutoGen's own spans (agents, tool calls) are
created through the global tracer provider, so they sit beneath the run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from service.config import ConfigError

TRACER_NAME = "service"
DEFAULT_SERVICE_NAME = "autogen-chat-service"


def exporter_from_env(environ: Mapping[str, str]) -> SpanExporter | None:
    """The span exporter the environment asks for, or None (tracing off). ConfigError for an unknown one."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    name = environ.get("OTEL_TRACES_EXPORTER", "otlp" if endpoint else "none").strip().lower()
    if name == "none" or (name == "otlp" and not endpoint):
        return None  # nothing to send to: no network, ever
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_* (endpoint, headers, timeout) itself
    raise ConfigError(f"OTEL_TRACES_EXPORTER={name!r} is not supported: use otlp, console or none")


def setup(
    environ: Mapping[str, str] = os.environ, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """Install a global tracer provider when the environment (or a given ``exporter``: tests) asks for one;
    its spans are exported in batches off the event loop. None when tracing stays off."""
    exporter = exporter or exporter_from_env(environ)
    if exporter is None:
        return None
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": DEFAULT_SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def enabled() -> bool:
    """Whether a tracer provider that records spans is installed (by ``setup``)."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def carrier() -> dict[str, str]:
    """The current trace context as W3C headers (``traceparent``...), to travel with a queued input."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


def context_of(headers: Mapping[str, str] | None) -> Context | None:
    """The trace context a carrier (or a request's headers) names, or None."""
    return propagate.extract(dict(headers)) if headers else None
