"""The chat page renders what real models write (README "The browser page"), in real Chromium against a real server
process: agents' Markdown (code blocks, lists, tables, links) sanitised so that no payload runs, a partial answer
left by a cancel, and a reload in the middle of a streamed answer that shows the text so far at once. One test
plays the server's side of the WebSocket itself, to pin the page's handling of a resumed stream and of a partial
entry to the protocol (README "Log entries") whatever the timing of a real run.

The demo model echoes the user's text ("You said: <text> [context: N]"), streamed word by word at 0.03 s a word, so
a user message written in Markdown yields an agent reply in Markdown, and a message of 300 words streams for ~9 s.
Every wait is on a DOM condition (Playwright's expect / wait_for_function with a timeout as a guard).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import orjson
import pytest
from playwright.sync_api import Browser, Locator, WebSocketRoute, expect, sync_playwright

from tests.browser_util import CHROMIUM, DESKTOP, WAIT_MS, ChatPage, launch
from tests.server import ServerProcess, start_server

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium (make browser)"),
]

LONG_LINE = "print('" + "x" * 300 + "')"
MARKDOWN = f"""Markdown check
```python
def answer():
    return 42
{LONG_LINE}
```
- first item
- second item with `inline code`

| name | value | note |
| --- | ---: | --- |
| alpha | 1 | {"wide " * 40}|
| beta | 2 | short |

See [the docs](https://example.com/docs).

the end"""

XSS = (
    'payload <img src=x onerror="window.__xss=1"> and <script>window.__xss=2</script> '
    'and [link](javascript:window.__xss=3) and <a href="javascript:window.__xss=4">raw</a> '
    'and ![pic](javascript:window.__xss=5) and <svg onload="window.__xss=6"></svg> end'
)

# ~300 words: ~9 s of streaming at the demo model's default speed. Numbered words show how far a stream got.
WORDS = 300


def long_text(tag: str) -> str:
    return f"{tag} " + " ".join(f"w{i:03d}" for i in range(1, WORDS + 1))


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
    srv = start_server(tmp_path, "--lease-s", "2", "--heartbeat-s", "0.5")
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
def chat(browser: Browser, request: pytest.FixtureRequest) -> Iterator[ChatPage]:
    context = browser.new_context(viewport=DESKTOP)  # type: ignore[arg-type]
    page = ChatPage(context.new_page())
    try:
        yield page
        assert page.console_errors == []
    finally:
        page.screenshot(request.node.name)
        context.close()


def streaming(chat: ChatPage) -> Locator:
    return chat.page.locator("[data-streaming] .text")


def test_markdown_renders_code_lists_tables_links(server: ServerProcess, chat: ChatPage) -> None:
    chat.open_new_chat(server.url)
    chat.send(MARKDOWN)
    reply = chat.reply("the end")
    chat.wait_once(reply)
    expect(reply).to_contain_text("[context: 1]")

    code = reply.locator("pre code")
    expect(code).to_have_count(1)
    expect(code).to_contain_text("return 42")
    expect(reply.locator("li")).to_have_text(["first item", "second item with inline code"])
    expect(reply.locator("li code")).to_have_text("inline code")
    expect(reply.locator("table")).to_have_count(1)
    expect(reply.locator("th")).to_have_text(["name", "value", "note"])
    expect(reply.locator("td").first).to_have_text("alpha")
    link = reply.get_by_role("link", name="the docs")
    expect(link).to_have_attribute("href", "https://example.com/docs")
    expect(link).to_have_attribute("target", "_blank")
    expect(link).to_have_attribute("rel", "noopener noreferrer")

    # Code is monospace, keeps its long line unwrapped and scrolls sideways; a wide table scrolls in its own box.
    pre = reply.locator("pre")
    style = pre.evaluate(
        "el => { const s = getComputedStyle(el); return [s.whiteSpace, s.overflowX, s.fontFamily]; }"
    )
    assert style[0] == "pre" and style[1] == "auto" and "monospace" in style[2], style
    assert pre.evaluate("el => el.scrollWidth > el.clientWidth + 100")
    assert reply.locator(".table-wrap").evaluate("el => getComputedStyle(el).overflowX") == "auto"
    bubble_width = reply.evaluate("el => el.getBoundingClientRect().width")
    assert bubble_width <= chat.by_id("message-list").evaluate("el => el.clientWidth"), bubble_width

    # The user's own message stays the plain text typed.
    user = chat.user_message("Markdown check")
    chat.wait_once(user)
    expect(user.locator("pre, li, table")).to_have_count(0)
    assert user.locator(".text").inner_text() == MARKDOWN


def test_xss_in_user_and_assistant_messages_is_inert(server: ServerProcess, chat: ChatPage) -> None:
    chat.open_new_chat(server.url)
    chat.send(XSS)
    reply = chat.reply("payload")
    chat.wait_once(reply)
    chat.wait_once(chat.user_message("payload"))
    expect(reply).to_contain_text("[context: 1]")
    # Both messages were rendered (and the reply was streamed through the same renderer first).
    assert any("payload" in t for t in chat.streamed_texts()), chat.streamed_texts()

    log = chat.by_id("message-list")
    expect(log.locator('a[href^="javascript:" i]')).to_have_count(0)
    expect(log.locator("img, script, svg, iframe")).to_have_count(0)
    for link in log.locator("a").all():
        link.click()  # an inert link does nothing, even when clicked
    # Raw HTML is shown as the text the model wrote.
    expect(reply).to_contain_text('<img src=x onerror="window.__xss=1">')
    expect(reply).to_contain_text("<script>window.__xss=2</script>")
    expect(chat.user_message("payload")).to_contain_text("<script>window.__xss=2</script>")
    assert chat.page.evaluate("typeof window.__xss") == "undefined"
    assert len(chat.page.context.pages) == 1


def test_cancel_mid_stream_leaves_a_partial_answer(server: ServerProcess, chat: ChatPage) -> None:
    chat.open_new_chat(server.url)
    chat.send(long_text("cancel me"))
    expect(streaming(chat)).to_contain_text("w010", timeout=WAIT_MS)

    chat.by_id("cancel-button").click()
    chat.wait_once(chat.durable(type_="run_cancelled"))
    partial = chat.page.locator('.msg.partial[data-seq][data-type="TextMessage"]')
    chat.wait_once(partial)
    expect(partial).to_have_attribute("data-partial-reason", "cancelled")
    expect(partial.locator(".partial-mark")).to_have_text("partial: cancelled")
    expect(partial).to_contain_text("You said: cancel me w001")
    expect(partial).not_to_contain_text(f"w{WORDS:03d}")  # cut off mid-answer
    expect(chat.page.locator("[data-streaming]")).to_have_count(0)
    chat.wait_status("idle")
    # The partial answer stands before the lifecycle entry of its run.
    partial_seq = int(partial.get_attribute("data-seq") or 0)
    cancelled_seq = int(chat.durable(type_="run_cancelled").get_attribute("data-seq") or 0)
    assert partial_seq < cancelled_seq
    chat.assert_log_consistent()


def test_reload_mid_answer_shows_the_text_so_far_at_once(server: ServerProcess, chat: ChatPage) -> None:
    text = long_text("reload me")
    session_id = chat.open_new_chat(server.url)
    chat.send(text)
    expect(streaming(chat)).to_contain_text("w020", timeout=WAIT_MS)

    chat.page.reload()
    # The text streamed before the reload is back within a second, and keeps growing.
    expect(streaming(chat)).to_contain_text("You said: reload me w001 w002", timeout=1_000)
    expect(streaming(chat)).to_contain_text("w020", timeout=1_000)
    expect(streaming(chat)).to_contain_text("w100", timeout=WAIT_MS)
    assert chat.session_id() == session_id

    reply = chat.reply("reload me")
    chat.wait_once(reply)
    expected = f"You said: {text} [context: 1]"
    assert reply.locator(".text").inner_text().strip() == expected
    expect(chat.page.locator("[data-streaming]")).to_have_count(0)
    # What the bubble showed as it grew is the final text once: nothing repeated, nothing missing.
    streamed = chat.streamed_texts()
    assert len(streamed) == 1 and streamed[0].strip() == expected, streamed
    expect(chat.by_id("message-list")).to_contain_text(f"w{WORDS:03d} [context: 1]")
    assert chat.by_id("message-list").inner_text().count(f"w{WORDS:03d} [context: 1]") == 1
    chat.assert_log_consistent()


def test_page_follows_the_resume_and_partial_protocol(server: ServerProcess, chat: ChatPage) -> None:
    """The WebSocket is played by the test (HTTP still goes to the real server): chunks, a reconnect whose first
    chunk is ``resumed`` with the whole text so far, then the durable partial entry of that message id."""
    sockets: list[WebSocketRoute] = []

    def play_server(ws: WebSocketRoute) -> None:
        session_id = parse_qs(urlparse(ws.url).query)["session_id"][0]
        sockets.append(ws)
        send(ws, {"type": "session", "session_id": session_id, "status": "running", "last_seq": 0})

    def send(ws: WebSocketRoute, frame: dict[str, Any]) -> None:
        ws.send(orjson.dumps(frame).decode())

    def chunk(content: str, **extra: Any) -> dict[str, Any]:
        return {
            "seq": None,
            "type": "ModelClientStreamingChunkEvent",
            "source": "assistant",
            "content": content,
            "full_message_id": "m1",
            "metadata": {},
            **extra,
        }

    chat.page.context.route_web_socket(re.compile(r"/ws/chat/queue"), play_server)
    session_id = chat.open_new_chat(server.url)
    send(sockets[-1], chunk("Hello ", offset=0))
    send(sockets[-1], chunk("**wor", offset=6))
    send(sockets[-1], chunk("wor", offset=8))  # overlapping text (offset says where it starts): never doubled
    expect(streaming(chat)).to_have_text("Hello **wor")

    sockets[-1].close(code=1001)  # a network blip: the page reconnects by itself
    chat.wait_disconnected()
    chat.wait_connected()
    assert len(sockets) == 2
    send(sockets[-1], chunk("Hello **world** so far", offset=0, resumed=True))
    expect(streaming(chat)).to_have_text("Hello world so far")  # replaced, not appended
    expect(streaming(chat).locator("strong")).to_have_text("world")
    send(sockets[-1], chunk(", and `more`", offset=22))
    expect(streaming(chat)).to_have_text("Hello world so far, and more")
    expect(chat.page.locator("[data-streaming]")).to_have_count(1)

    base = {"session_id": session_id, "created_at": "2026-11-24T10:00:00.123Z", "run_id": "r1"}
    send(
        sockets[-1],
        {
            **base,
            "seq": 1,
            "type": "TextMessage",
            "source": "assistant",
            "content": "Hello **world** so far, and `more`",
            "metadata": {"id": "m1", "partial": True, "partial_reason": "interrupted"},
        },
    )
    send(sockets[-1], {**base, "seq": 2, "type": "run_interrupted", "source": "system", "metadata": {}})
    partial = chat.page.locator(".msg.partial[data-seq='1']")
    expect(partial.locator(".partial-mark")).to_have_text("partial: interrupted")
    expect(partial.locator(".text")).to_have_text("Hello world so far, and more")
    expect(chat.durable(type_="run_interrupted")).to_have_count(1)
    expect(chat.page.locator("[data-streaming]")).to_have_count(0)
    # A late chunk of a message already durable on screen opens no new bubble.
    # (Frames are handled in order: once the entry sent after it is on screen, the chunk has been handled.)
    send(sockets[-1], chunk(" late", offset=34))
    send(
        sockets[-1],
        {**base, "seq": 3, "type": "TextMessage", "source": "assistant", "content": "next", "metadata": {}},
    )
    expect(chat.durable(type_="TextMessage", text="next")).to_have_count(1)
    expect(chat.page.locator("[data-streaming]")).to_have_count(0)
    assert [t.strip() for t in chat.streamed_texts()] == ["Hello world so far, and more"]
