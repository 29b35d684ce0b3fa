"""The real model path, offline: an OpenAIChatCompletionClient team (loaded from JSON by the TeamRegistry) talks
to a small fake OpenAI-compatible server on 127.0.0.1 through the worker pool. The API key comes from the
environment and reaches the server, but never the database, the log entries or the log lines."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_core.tools import FunctionTool
from autogen_ext.models.openai import OpenAIChatCompletionClient

from service.hub import Hub
from service.queue import open_store
from service.queue.retry import RetryPolicy
from service.worker.pool import WorkerPool
from service.worker.teams import TeamRegistry
from service.worker.tools import calculator
from tests.conftest import FakeClock

API_KEY = "sk-test-THE-REAL-KEY-0123456789"
MODEL_INFO: dict[str, Any] = {
    "vision": False,
    "function_calling": True,
    "json_output": False,
    "family": "unknown",
    "structured_output": False,
}


class FakeOpenAI:
    """Answers /v1/chat/completions in the streaming wire format of the OpenAI API, with a tool call on request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str | None, dict[str, Any]]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append((request.headers.get("Authorization"), body))
        last = body["messages"][-1]
        if last["role"] == "user" and "[[deny]]" in last["content"]:
            # A careless server that echoes the whole key back: the error shown to users must not carry it.
            error = {"message": f"Incorrect API key provided: {API_KEY}", "type": "invalid_request_error"}
            return web.json_response({"error": error}, status=401)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if body.get("tools") and last["role"] == "user" and "[[tool" in last["content"]:
            call = {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "calculator", "arguments": ""},
            }
            await self._send(response, {"role": "assistant", "content": None, "tool_calls": [call]})
            args = {"index": 0, "function": {"arguments": '{"expression": "6*7"}'}}
            await self._send(response, {"tool_calls": [args]})
            await self._send(response, {}, "tool_calls")
        else:
            text = (
                f"The tool said {last['content']}." if last["role"] == "tool" else f"Echo: {last['content']}"
            )
            await self._send(response, {"role": "assistant", "content": ""})
            for word in text.split(" "):
                await self._send(response, {"content": word + " "})
            await self._send(response, {}, "stop")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    @staticmethod
    async def _send(response: web.StreamResponse, delta: dict[str, Any], finish: str | None = None) -> None:
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")


def database_files(folder: Path) -> list[bytes]:
    return [path.read_bytes() for path in folder.glob("service.db*")]


@pytest.fixture
async def fake_openai() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield fake, f"http://127.0.0.1:{server.port}/v1"
    finally:
        await server.close()


def openai_team_file(tmp_path: Path, base_url: str) -> Path:
    """A team JSON as dump_component() writes it. The key given here is dumped as the mask "**********"."""
    client = OpenAIChatCompletionClient(
        model="fake",
        base_url=base_url,
        api_key="sk-not-this-one-000000",
        model_info=MODEL_INFO,  # type: ignore[arg-type]
    )
    assistant = AssistantAgent(
        "assistant",
        model_client=client,
        tools=[FunctionTool(calculator, description="Evaluate arithmetic.", name="calculator")],
        model_client_stream=True,
        reflect_on_tool_use=True,
    )
    team = RoundRobinGroupChat([assistant], max_turns=1)
    path = tmp_path / "openai.json"
    path.write_text(team.dump_component().model_dump_json())
    assert "**********" in path.read_text() and "sk-not-this-one" not in path.read_text()
    return path


async def test_openai_team_through_the_pool(
    fake_openai: tuple[FakeOpenAI, str],
    tmp_path: Path,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="service")
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    fake, base_url = fake_openai
    teams = TeamRegistry.from_config({"gpt": str(openai_team_file(tmp_path, base_url))})
    db = tmp_path / "service.db"
    store = open_store(f"sqlite:///{db}", clock=clock)
    await store.open()
    try:
        hub = Hub()
        pool = WorkerPool(store, hub, teams, retry=RetryPolicy(max_attempts=1), clock=clock)
        for text in ("hello there", "[[tool:calculator]] six times seven", "[[deny]] me"):
            await store.enqueue("local", "s1", text, None, team="gpt")
        with hub.subscribe("s1") as sub:
            await pool.run_until_idle()
            frames = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
        log = (await store.read_log("s1", after=0, limit=1000)).messages
        state = await store.load_team_state("s1")
    finally:
        await store.close()

    replies = [e.content for e in log if e.type == "TextMessage" and e.source == "assistant"]
    assert replies == ["Echo: hello there ", "The tool said 42. "]
    types = [e.type for e in log]
    assert "ToolCallRequestEvent" in types and "ToolCallExecutionEvent" in types
    assert [e.metadata.get("retrying") for e in log if e.type == "run_failed"] == [False]
    failed = next(e for e in log if e.type == "run_failed")
    assert "AuthenticationError" in failed.metadata["error"] and "[redacted]" in failed.metadata["error"]
    assert any(isinstance(f, dict) and f["content"] == "Echo: " for f in frames)  # streamed live
    # The second turn's request carried the first turn: the state was saved and loaded.
    turn2 = next(body for _, body in fake.requests if "six times seven" in str(body["messages"]))
    assert any(m.get("content") == "hello there" for m in turn2["messages"])
    # The key reached the server, from the environment (the file's masked key was dropped) ...
    assert fake.requests and all(auth == f"Bearer {API_KEY}" for auth, _ in fake.requests)
    # ... and nowhere else.
    assert API_KEY not in orjson.dumps([e.to_json() for e in log]).decode()
    assert API_KEY not in orjson.dumps(state).decode()
    assert database_files(tmp_path) and not [b for b in database_files(tmp_path) if API_KEY.encode() in b]
    assert caplog.records and not [r for r in caplog.records if API_KEY in r.getMessage()]
    assert not [r for r in caplog.records if r.exc_text and API_KEY in r.exc_text]
