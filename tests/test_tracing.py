"""Tracing (README "Tracing") with the SDK's in-memory exporter: a span per request and per run, the run a child
of the request that enqueued its message, AutoGen's spans beneath the run; off (no provider) unless asked."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service import tracing
from service.app import create_app
from service.config import ConfigError
from tests.web import make_config, run_until_idle

Client = TestClient[Any, web.Application]
EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def provider() -> Iterator[TracerProvider]:
    """The process's one global provider (OpenTelemetry allows setting it once), exporting to memory."""
    installed = trace.get_tracer_provider()
    made = installed if isinstance(installed, TracerProvider) else tracing.setup({}, exporter=EXPORTER)
    assert made is not None
    yield made


@pytest.fixture
async def client(
    provider: TracerProvider, database_url: str, aiohttp_client: Callable[..., Awaitable[Client]]
) -> AsyncIterator[Client]:
    EXPORTER.clear()
    yield await aiohttp_client(create_app(make_config(database_url), start_workers=False))


def spans(provider: TracerProvider) -> list[ReadableSpan]:
    provider.force_flush()
    return list(EXPORTER.get_finished_spans())


async def test_a_run_is_a_span_under_the_request_that_enqueued_it(
    client: Client, provider: TracerProvider
) -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # a client's own trace
    response = await client.post(
        "/sessions/s1/messages",
        json={"content": "what is [[tool:calculator:6*7]]?"},
        headers={"traceparent": parent},
    )
    assert response.status == 202
    await run_until_idle(client)
    found = spans(provider)
    request = next(s for s in found if s.name == "POST /sessions/{session_id}/messages")
    run = next(s for s in found if s.name == "run")
    assert request.context is not None and run.context is not None and run.parent is not None
    assert (
        f"{request.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    )  # the client's trace goes on
    assert run.context.trace_id == request.context.trace_id and run.parent.span_id == request.context.span_id
    attributes = dict(run.attributes or {})
    expected = {"session_id": "s1", "input_seq": 1, "attempt": 1, "team": "default", "outcome": "completed"}
    assert {key: attributes.get(key) for key in expected} == expected
    beneath = [s for s in found if s.parent is not None and s.parent.span_id == run.context.span_id]
    assert beneath, "AutoGen's own spans (agents, tools) sit under the run"


def test_tracing_is_off_unless_the_environment_asks() -> None:
    assert tracing.exporter_from_env({}) is None
    assert tracing.exporter_from_env({"OTEL_TRACES_EXPORTER": "otlp"}) is None  # no endpoint: no network
    assert (
        tracing.exporter_from_env(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "true"}
        )
        is None
    )
    assert tracing.exporter_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}) is not None
    assert tracing.exporter_from_env({"OTEL_TRACES_EXPORTER": "console"}) is not None
    with pytest.raises(ConfigError):
        tracing.exporter_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
