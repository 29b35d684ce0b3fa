"""In-process fan-out of committed entries and ephemeral chunks to live readers.

The hub is only a doorbell: the log is the truth. Every subscription has a bounded buffer; a subscriber that falls
behind is marked ``lagged`` and gets nothing more, so its reader goes back to replaying from the store (see
``service.stream``). Memory never grows with a slow client.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from service.models import Draft, Entry

# A durable entry, or an ephemeral frame (a dict with "seq": None).
Item = Entry | dict[str, Any]


class LiveDraft:
    """The message a run of this process is streaming right now: its text so far, chunk by chunk. Readers that
    go live in the middle of it start from this text (``service.stream``); chunk frames carry ``offset``, the
    length of the text before them, so nothing is sent twice."""

    def __init__(self, run_id: str, message_id: str, source: str) -> None:
        self.run_id, self.message_id, self.source = run_id, message_id, source
        self._parts: list[str] = []
        self.length = 0  # characters (code points) streamed so far

    def add(self, text: str) -> int:
        """Append a chunk's text; its offset."""
        offset = self.length
        self._parts.append(text)
        self.length += len(text)
        return offset

    def snapshot(self) -> Draft:
        text = "".join(self._parts)
        self._parts = [text]
        return Draft(self.run_id, self.message_id, self.source, text)


class Subscription:
    def __init__(self, session_id: str, maxsize: int) -> None:
        self.session_id = session_id
        self.queue: asyncio.Queue[Item] = asyncio.Queue(maxsize)
        self.lagged = False
        self.closed = False  # the session was deleted: the reader stops
        self.signal = asyncio.Event()  # set on every delivery or lag, so a reader can wait on it

    def offer(self, item: Item) -> None:
        if self.lagged:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.lagged = True
            # Drain now: the reader will replay from the store, so buffered items are of no use.
            while not self.queue.empty():
                self.queue.get_nowait()
        self.signal.set()

    def reset(self) -> None:
        """The reader caught up from the store: take live items again."""
        self.lagged = False


class Hub:
    def __init__(self, buffer_size: int = 1000, on_publish: Callable[[int], object] | None = None) -> None:
        self.buffer_size = buffer_size
        self._on_publish = on_publish  # counts committed entries (metrics)
        self._subs: defaultdict[str, set[Subscription]] = defaultdict(set)
        self._drafts: dict[str, LiveDraft] = {}  # by session: the message being streamed in this process

    def publish(self, session_id: str, entries: Sequence[Entry]) -> None:
        """Committed entries, in seq order (call only after the commit)."""
        if entries and self._on_publish is not None:
            self._on_publish(len(entries))
        for sub in list(self._subs.get(session_id, ())):
            for entry in entries:
                sub.offer(entry)

    def publish_ephemeral(self, session_id: str, frame: dict[str, Any]) -> None:
        for sub in list(self._subs.get(session_id, ())):
            sub.offer(frame)

    def start_draft(self, session_id: str, draft: LiveDraft) -> None:
        self._drafts[session_id] = draft

    def end_draft(self, session_id: str, draft: LiveDraft) -> None:
        if self._drafts.get(session_id) is draft:
            del self._drafts[session_id]

    def draft(self, session_id: str) -> Draft | None:
        """The text streamed so far of the message this process is streaming in the session, or None."""
        live = self._drafts.get(session_id)
        return None if live is None else live.snapshot()

    def notify_commit(self, session_id: str, last_seq: int) -> None:
        """Another process committed up to ``last_seq``: readers must re-read the store (they see it as a lag)."""
        for sub in list(self._subs.get(session_id, ())):
            sub.lagged = True
            sub.signal.set()

    def close_session(self, session_id: str) -> None:
        """The session was deleted: its readers end."""
        for sub in list(self._subs.get(session_id, ())):
            sub.closed = True
            sub.signal.set()

    @contextmanager
    def subscribe(self, session_id: str) -> Iterator[Subscription]:
        sub = Subscription(session_id, self.buffer_size)
        self._subs[session_id].add(sub)
        try:
            yield sub
        finally:
            subs = self._subs.get(session_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[session_id]

    def has_subscribers(self, session_id: str) -> bool:
        return session_id in self._subs
