"""Helpers for driving the chat page in Debian's Chromium (/usr/bin/chromium) with Playwright's sync API."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, Locator, Page, Playwright, expect

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# Generous: a run includes process start-up, AutoGen imports and the demo model's streaming.
WAIT_MS = 20_000

# A page-side recorder: every streaming bubble ever shown, so a test can assert streaming happened without
# racing the moment it is replaced by the durable message.
RECORD_STREAMING = """
window.__streamed = [];
new MutationObserver((records) => {
  for (const r of records) for (const n of r.addedNodes) {
    if (n.nodeType === 1 && n.dataset && n.dataset.streaming) window.__streamed.push(n);
  }
}).observe(document, { childList: true, subtree: true });
"""


def launch(p: Playwright) -> Browser:
    return p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


class ChatPage:
    """The page's stable hooks (data-testid), and waits on DOM conditions: never fixed sleeps."""

    def __init__(self, page: Page) -> None:
        self.console_errors: list[str] = []
        self.page = self._watch(page)

    def _watch(self, page: Page) -> Page:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.console_errors.append(f"pageerror: {exc}"))
        page.add_init_script(RECORD_STREAMING)
        return page

    def close_tab(self) -> None:
        self.page.close()

    def new_tab(self, url: str) -> None:
        """A new tab in the same browser profile (same localStorage), as after closing the old one."""
        self.page = self._watch(self.page.context.new_page())
        self.page.goto(url)
        self.wait_connected()

    def _console(self, msg: Any) -> None:
        # The browser logs failed WebSocket connects and fetches while the server is down; those are expected.
        if msg.type == "error" and "WebSocket" not in msg.text and "Failed to load resource" not in msg.text:
            self.console_errors.append(msg.text)

    def by_id(self, testid: str) -> Locator:
        return self.page.get_by_test_id(testid)

    @property
    def input(self) -> Locator:
        return self.by_id("composer-input")

    @property
    def connection(self) -> Locator:
        return self.by_id("connection-state")

    @property
    def run_status(self) -> Locator:
        return self.by_id("run-status")

    def open_new_chat(self, base_url: str) -> str:
        """Loads the page, starts a new chat, waits until it is connected; the session id."""
        self.page.goto(base_url + "/")
        if self.by_id("toggle-sessions").is_visible():  # phone width: the session list is a drawer
            self.by_id("toggle-sessions").click()
        self.by_id("new-chat").click()
        self.page.wait_for_function("location.hash.length > 1", timeout=WAIT_MS)
        self.wait_connected()
        return self.session_id()

    def session_id(self) -> str:
        return str(self.page.evaluate("decodeURIComponent(location.hash.slice(1))"))

    def wait_connected(self) -> None:
        expect(self.connection).to_have_attribute("data-state", "connected", timeout=WAIT_MS)

    def wait_disconnected(self) -> None:
        expect(self.connection).not_to_have_attribute("data-state", "connected", timeout=WAIT_MS)

    def wait_status(self, status: str) -> None:
        expect(self.run_status).to_have_attribute("data-status", status, timeout=WAIT_MS)

    def send(self, text: str) -> None:
        self.input.fill(text)
        self.input.press("Enter")

    def durable(
        self, *, type_: str | None = None, source: str | None = None, text: str | None = None
    ) -> Locator:
        sel = "[data-seq]"
        if type_:
            sel += f'[data-type="{type_}"]'
        if source:
            sel += f'[data-source="{source}"]'
        loc = self.by_id("message-list").locator(sel)
        return loc.filter(has_text=text) if text else loc

    def user_message(self, text: str) -> Locator:
        return self.durable(type_="TextMessage", source="user", text=text)

    def reply(self, text: str) -> Locator:
        """Durable agent replies containing ``text`` (the demo model echoes the user's message)."""
        return self.durable(type_="TextMessage", source="assistant", text=text)

    def wait_once(self, loc: Locator) -> None:
        """Waits until exactly one element matches."""
        expect(loc).to_have_count(1, timeout=WAIT_MS)

    def pending(self) -> Locator:
        return self.by_id("message-list").locator("[data-pending]")

    def seqs(self) -> list[int]:
        raw = self.page.eval_on_selector_all("[data-seq]", "els => els.map(e => Number(e.dataset.seq))")
        return [int(x) for x in raw]

    def assert_log_consistent(self) -> None:
        """Every durable entry on screen exactly once, in order, with no gap."""
        seqs = self.seqs()
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs

    def outbox(self) -> list[dict[str, Any]]:
        raw = self.page.evaluate("JSON.parse(localStorage.getItem('chat.outbox') || '[]')")
        assert isinstance(raw, list)
        return raw

    def wait_acked(self) -> None:
        """Waits until the outbox is empty: the server acknowledged (made durable) every message sent."""
        self.page.wait_for_function("localStorage.getItem('chat.outbox') === '[]'", timeout=WAIT_MS)

    def streamed_texts(self) -> list[str]:
        raw = self.page.evaluate("window.__streamed.map(n => n.querySelector('.text').textContent)")
        return [str(x) for x in raw]

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png")
        self.page.screenshot(path=str(path))
        return path
