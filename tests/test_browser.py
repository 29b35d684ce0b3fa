"""The chat page at / in real Chromium against a real server process (SQLite file): streaming, reload mid-run,
SIGKILL + restart, human input, cancel, and a message typed while the server is down.

Each test saves a screenshot under test-artifacts/. Every wait is on a DOM condition (Playwright's expect).
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from tests.browser_util import CHROMIUM, DESKTOP, PHONE, WAIT_MS, ChatPage, launch
from tests.server import ServerProcess, start_server

# The composer's placeholder while the team waits for the user's answer (service/static/app.js).
ASKING = "The team asked you something: your next message answers it."

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium (make browser)"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = launch(p)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    # A short lease: after a SIGKILL the restarted server re-queues the dead run's input once the lease expires.
    srv = start_server(tmp_path, "--lease-s", "2", "--heartbeat-s", "0.5")
    try:
        yield srv
    finally:
        srv.kill()


def http(server: ServerProcess, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else orjson.dumps(body)
    req = urllib.request.Request(
        server.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req) as resp:
        return orjson.loads(resp.read() or b"null")


def wait_idle(server: ServerProcess, session_id: str, last_seq: int = 0) -> None:
    """Polls GET /sessions/{id} until its runs are over (no page is open to watch them)."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        session = http(server, "GET", f"/sessions/{session_id}")
        if session["status"] == "idle" and session["last_seq"] >= last_seq:
            return
        time.sleep(0.1)
    raise AssertionError(f"session {session_id} never went idle")


def _chat(browser: Browser, request: pytest.FixtureRequest, viewport: dict[str, int]) -> Iterator[ChatPage]:
    # A fresh context per test: its own localStorage (client id, outbox) like a new browser profile.
    context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
    chat = ChatPage(context.new_page())
    try:
        yield chat
        assert chat.console_errors == []
    finally:
        chat.screenshot(request.node.name)
        context.close()


@pytest.fixture
def chat(browser: Browser, request: pytest.FixtureRequest) -> Iterator[ChatPage]:
    yield from _chat(browser, request, DESKTOP)


@pytest.fixture
def phone(browser: Browser, request: pytest.FixtureRequest) -> Iterator[ChatPage]:
    yield from _chat(browser, request, PHONE)


def test_send_shows_the_streamed_reply_once(server: ServerProcess, chat: ChatPage) -> None:
    chat.open_new_chat(server.url)
    chat.send("hello there")

    chat.wait_once(chat.reply("hello there"))
    expect(chat.reply("hello there")).to_contain_text("[context: 1]")
    chat.wait_once(chat.user_message("hello there"))
    expect(chat.pending()).to_have_count(0)
    # The reply was shown growing before the durable message replaced it, and nothing streaming is left.
    streamed = chat.streamed_texts()
    assert streamed and "hello" in streamed[0], streamed
    expect(chat.page.locator("[data-streaming]")).to_have_count(0)
    expect(chat.durable(type_="run_completed")).to_have_count(1)
    chat.wait_status("idle")
    expect(chat.by_id("cancel-button")).to_be_disabled()
    chat.assert_log_consistent()
    assert chat.outbox() == []


def test_reload_mid_run_shows_the_reply_once(server: ServerProcess, chat: ChatPage) -> None:
    session_id = chat.open_new_chat(server.url)
    chat.send("[[sleep:3]] first question")
    chat.wait_status("running")

    chat.page.reload()
    chat.wait_connected()
    assert chat.session_id() == session_id  # the hash reopened the same chat

    chat.wait_once(chat.reply("first question"))
    chat.wait_once(chat.user_message("first question"))
    expect(chat.durable(type_="run_completed")).to_have_count(1)
    chat.assert_log_consistent()
    # The session list knows the chat, and marks it as the open one.
    expect(
        chat.page.locator(f'[data-testid="session-item"][data-session-id="{session_id}"]')
    ).to_have_attribute("aria-current", "page")


def test_closed_tab_sees_what_the_agents_said_meanwhile(server: ServerProcess, chat: ChatPage) -> None:
    session_id = chat.open_new_chat(server.url)
    chat.send("[[sleep:1]] while you were away")
    chat.wait_once(chat.user_message("while you were away"))
    url = chat.page.url

    chat.close_tab()
    wait_idle(server, session_id)  # the run finished with nobody watching
    chat.new_tab(url)
    chat.wait_once(chat.reply("while you were away"))
    chat.wait_once(chat.user_message("while you were away"))
    chat.assert_log_consistent()


def test_server_killed_and_restarted(server: ServerProcess, chat: ChatPage) -> None:
    chat.open_new_chat(server.url)
    chat.send("[[sleep:2]] hello")
    chat.wait_acked()
    expect(chat.durable(type_="run_started")).to_have_count(1)  # the run is mid-flight
    server.kill()
    chat.wait_disconnected()

    server.restart()
    chat.wait_connected()  # by itself: nobody touched the page
    chat.wait_once(chat.reply("hello"))
    expect(chat.reply("hello")).to_contain_text("[context: 1]")
    chat.wait_once(chat.user_message("hello"))
    expect(chat.durable(type_="run_interrupted")).to_have_count(1)
    expect(chat.durable(type_="run_started").filter(has_text="attempt 2")).to_have_count(1)
    chat.assert_log_consistent()


def test_ask_flow_answer_goes_to_the_team(server: ServerProcess, phone: ChatPage) -> None:
    phone.open_new_chat(server.url)
    phone.send("[[ask]] plan my trip")
    phone.wait_status("awaiting_input")
    expect(phone.by_id("composer")).to_contain_text("answer")
    expect(phone.input).to_have_attribute(
        "placeholder", "The team asked you something: your next message answers it."
    )
    expect(phone.durable(type_="UserInputRequestedEvent")).to_have_count(1)

    phone.send("Lisbon in May")
    phone.wait_once(phone.reply("Lisbon in May"))
    phone.wait_status("idle")
    expect(phone.input).not_to_have_attribute(
        "placeholder", "The team asked you something: your next message answers it."
    )
    phone.assert_log_consistent()
    # At phone width the session list is a drawer behind the "Chats" button.
    expect(phone.by_id("session-list")).to_be_hidden()
    phone.by_id("toggle-sessions").click()
    expect(phone.by_id("session-list")).to_be_visible()
    phone.screenshot("ask_flow_phone_drawer")
    phone.page.keyboard.press("Escape")
    expect(phone.by_id("session-list")).to_be_hidden()


def test_cancel_button_cancels_the_run(server: ServerProcess, chat: ChatPage) -> None:
    chat.open_new_chat(server.url)
    cancel = chat.by_id("cancel-button")
    expect(cancel).to_be_disabled()
    chat.send("[[sleep:30]] a long one")
    chat.wait_status("running")
    expect(cancel).to_be_enabled()

    cancel.click()
    chat.wait_once(chat.durable(type_="run_cancelled"))
    chat.wait_status("idle")
    expect(cancel).to_be_disabled()
    expect(chat.reply("a long one")).to_have_count(0)
    chat.assert_log_consistent()


def test_message_typed_while_server_down_is_delivered_once(server: ServerProcess, chat: ChatPage) -> None:
    chat.open_new_chat(server.url)
    server.kill()
    chat.wait_disconnected()

    chat.send("sent while offline")
    expect(chat.pending()).to_have_count(1)
    expect(chat.pending()).to_contain_text("sent while offline")
    assert [m["content"] for m in chat.outbox()] == ["sent while offline"]

    server.restart()
    chat.wait_connected()
    chat.wait_once(chat.reply("sent while offline"))
    chat.wait_once(chat.user_message("sent while offline"))
    expect(chat.pending()).to_have_count(0)
    chat.assert_log_consistent()
    chat.wait_acked()


def test_tool_calls_are_compact_and_shift_enter_adds_a_line(server: ServerProcess, chat: ChatPage) -> None:
    chat.open_new_chat(server.url)
    chat.input.type("[[tool:calculator:6*7]] first line")
    chat.input.press("Shift+Enter")
    chat.input.type("second line")
    expect(chat.pending()).to_have_count(0)  # Shift+Enter did not send
    chat.input.press("Enter")

    chat.wait_once(chat.durable(type_="ToolCallExecutionEvent", text="calculator(6*7) -> 42"))
    chat.wait_once(chat.durable(type_="ToolCallRequestEvent", text="calculator(6*7)"))
    chat.wait_once(chat.reply("42"))
    user = chat.user_message("second line")
    chat.wait_once(user)
    assert user.locator(".text").inner_text() == "[[tool:calculator:6*7]] first line\nsecond line"
    chat.assert_log_consistent()


def test_older_pages_load_on_scroll_up(server: ServerProcess, chat: ChatPage) -> None:
    session_id = http(server, "POST", "/sessions", {})["session_id"]
    for i in range(13):  # 4 entries each (input, run_started, reply, run_completed): 52 > one page of 50
        http(
            server,
            "POST",
            f"/sessions/{session_id}/messages",
            {"content": f"note {i}", "client_msg_id": f"n{i}"},
        )
    wait_idle(server, session_id, last_seq=52)

    chat.page.goto(f"{server.url}/#{session_id}")
    chat.wait_connected()
    expect(chat.durable()).to_have_count(50)
    assert chat.seqs()[0] == 3 and chat.seqs()[-1] == 52
    chat.by_id("message-list").evaluate("el => { el.scrollTop = 0; }")
    expect(chat.durable()).to_have_count(52)
    chat.assert_log_consistent()
    assert chat.seqs()[0] == 1
    expect(chat.page.get_by_role("button", name="Load older messages")).to_be_hidden()


def test_jwt_mode_asks_for_a_token(tmp_path: Path, chat: ChatPage) -> None:
    secret = "browser-test-secret-that-is-long-enough"
    server = start_server(
        tmp_path,
        "--auth",
        "jwt",
        "--lease-s",
        "2",
        "--heartbeat-s",
        "0.5",
        env={"SERVICE_JWT_SECRET": secret},
    )
    try:
        chat.page.goto(server.url + "/")
        form = chat.by_id("token-form")
        expect(form).to_be_visible()
        token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, secret, algorithm="HS256")
        chat.page.get_by_label("Access token").fill(token)
        chat.page.get_by_role("button", name="Use token").click()
        expect(form).to_be_hidden()

        chat.by_id("new-chat").click()
        chat.wait_connected()  # the WebSocket took ?token=
        chat.send("hello with a token")
        chat.wait_once(chat.reply("hello with a token"))
        assert chat.page.evaluate("sessionStorage.getItem('chat.token')") == token
    finally:
        server.kill()


def test_chat_deleted_elsewhere_is_left_not_recreated(server: ServerProcess, chat: ChatPage) -> None:
    session_id = chat.open_new_chat(server.url)
    chat.send("remember me")
    chat.wait_once(chat.reply("remember me"))
    http(server, "DELETE", f"/sessions/{session_id}")  # from another tab, device or script
    expect(chat.by_id("error")).to_have_text("This chat was deleted.")
    expect(chat.page.locator(f'[data-testid="session-item"][data-session-id="{session_id}"]')).to_have_count(
        0
    )
    listed = http(server, "GET", "/sessions")  # the page did not reconnect into a new, empty chat of that id
    assert session_id not in [s["session_id"] for s in listed["sessions"]]
    expect(chat.durable()).to_have_count(0)  # its messages left the screen too
    chat.screenshot("deleted_elsewhere")
