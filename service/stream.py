"""``follow``: replay a session's log after a cursor, then go live, with no gap and no duplicate.

The subscription opens BEFORE the first read, so nothing committed during the replay is missed. Live entries with
seq <= what was sent are dropped; a gap (seq > last + 1), or a subscription that lagged (its bounded buffer overflowed,
or another process committed), sends the reader back to the store. Ephemeral frames (``seq: null``) pass straight
through and are never replayed.

Streamed text resumes mid-message (README "Streaming"): whenever the reader goes live, it first sends the text
so far of the message being streamed (this process's draft, or the store's draft written by another instance)
beyond what it already sent, then live chunks trimmed by their ``offset``: no text twice, none missing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

from service.hub import Hub, Item, Subscription
from service.models import CHUNK, Draft, Entry, Frames, chunk_frame, utcnow
from service.queue.store import Store

REPLAY_PAGE = 1000
RECENT_MESSAGES = 32  # ids of durable messages sent lately: their drafts are not resumed


class SessionGone(Exception):
    """The session's log is shorter than a cursor already sent: it was deleted (and maybe created again)."""


async def replay(store: Store, session_id: str, after: int) -> AsyncIterator[Entry]:
    """Every durable entry with seq > after, page by page."""
    while True:
        page = await store.read_log(session_id, after=after, limit=REPLAY_PAGE)
        if page.last_seq < after:
            raise SessionGone(session_id)
        for entry in page.messages:
            yield entry
            after = entry.seq
        if not page.has_more:
            return


async def replay_frames(store: Store, session_id: str, after: int) -> AsyncIterator[Frames]:
    """Every durable entry with seq > after as pre-serialised pages; the next page is read while this one is
    sent (the store's reader works while the event loop writes to the socket)."""
    upcoming = asyncio.ensure_future(store.read_frames(session_id, after=after, limit=REPLAY_PAGE))
    try:
        while True:
            page = await upcoming
            if page.last_seq < after:
                raise SessionGone(session_id)
            if page.seqs:
                after = page.seqs[-1]
            if page.has_more:
                upcoming = asyncio.ensure_future(
                    store.read_frames(session_id, after=after, limit=REPLAY_PAGE)
                )
            if page.seqs:
                yield page
            if not page.has_more:
                return
    finally:
        if not upcoming.done():
            upcoming.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await upcoming


async def _next_live(sub: Subscription) -> Item | None:
    """The next buffered item, or None when the subscription lagged or was closed."""
    while True:
        if sub.lagged or sub.closed:
            return None
        try:
            return sub.queue.get_nowait()
        except asyncio.QueueEmpty:
            sub.signal.clear()
            await sub.signal.wait()


async def follow(store: Store, hub: Hub, session_id: str, after: int) -> AsyncIterator[Item]:
    """``follow_pages`` with replayed entries one by one."""
    async for item in follow_pages(store, hub, session_id, after, pages=False):
        assert not isinstance(item, Frames)
        yield item


async def follow_pages(
    store: Store, hub: Hub, session_id: str, after: int, *, pages: bool = True
) -> AsyncIterator[Item | Frames]:
    """Durable entries with seq > after in order (then live), interleaved with live ephemeral frames.
    ``pages``: replayed entries come as pre-serialised ``Frames`` pages (what the sockets send), not one by one.

    Ends when the session is deleted (here, or seen as a log shorter than the cursor after another process
    deleted it): a cursor into a deleted log means nothing, even if a session of that id is created again."""
    last = after
    text = _StreamedText()
    with hub.subscribe(session_id) as sub:
        while not sub.closed:
            # Reset before reading: whatever is published from now on is buffered, and whatever was published
            # before was committed first, so the store read below sees it.
            sub.reset()
            try:
                if pages:
                    async for page in replay_frames(store, session_id, last):
                        for message_id in page.message_ids:
                            if message_id is not None:
                                text.committed_id(message_id)
                        yield page
                        last = page.seqs[-1]
                else:
                    async for entry in replay(store, session_id, last):
                        text.committed(entry)
                        yield entry
                        last = entry.seq
            except SessionGone:
                return
            resumed = text.resume(session_id, await _draft(store, hub, session_id))
            if resumed is not None:
                yield resumed
            while (item := await _next_live(sub)) is not None:
                if not isinstance(item, Entry):
                    if text.missing_before(item):
                        sub.lagged = True  # text is missing: catch up from the draft
                    elif (frame := text.trim(item)) is not None:
                        yield frame
                elif item.seq == last + 1:
                    text.committed(item)
                    yield item
                    last = item.seq
                elif item.seq > last + 1:
                    sub.lagged = True  # a gap: read the missing entries from the store


async def _draft(store: Store, hub: Hub, session_id: str) -> Draft | None:
    """The message streamed right now in the session: by this process, else (several instances on one
    database) by another one, as far as its last saved draft."""
    draft = hub.draft(session_id)
    if draft is None and store.dialect == "postgresql":
        draft = await store.read_draft(session_id)
    return draft


class _StreamedText:
    """What one reader was sent of each streamed message, so resumed text and live chunks never overlap."""

    def __init__(self) -> None:
        self._sent: dict[str, int] = {}  # message id -> characters sent
        self._done: deque[str] = deque(maxlen=RECENT_MESSAGES)

    def committed(self, entry: Entry) -> None:
        message_id = entry.metadata.get("id")
        if isinstance(message_id, str):
            self.committed_id(message_id)

    def committed_id(self, message_id: str) -> None:
        self._sent.pop(message_id, None)
        self._done.append(message_id)

    def resume(self, session_id: str, draft: Draft | None) -> dict[str, Any] | None:
        """A frame with the draft's text beyond what was sent, or None."""
        if draft is None or draft.message_id in self._done:
            return None
        have = self._sent.get(draft.message_id, 0)
        if len(draft.text) <= have:
            return None
        self._sent = {draft.message_id: len(draft.text)}  # one message streams at a time
        return chunk_frame(session_id, draft, draft.text[have:], have, created_at=utcnow(), resumed=True)

    def missing_before(self, frame: dict[str, Any]) -> bool:
        """True when a chunk starts beyond what this reader was sent of its message (it missed text)."""
        offset, message_id = frame.get("offset"), frame.get("full_message_id")
        if frame.get("type") != CHUNK or not isinstance(offset, int) or message_id in self._done:
            return False
        return offset > self._sent.get(str(message_id), 0)

    def trim(self, frame: dict[str, Any]) -> dict[str, Any] | None:
        """A live frame to send, trimmed of text already sent; None when nothing of it is new."""
        message_id, offset, content = frame.get("full_message_id"), frame.get("offset"), frame.get("content")
        if frame.get("type") != CHUNK or not isinstance(offset, int) or not isinstance(content, str):
            return frame
        if message_id in self._done:
            return None
        have = self._sent.get(str(message_id), 0)
        end = offset + len(content)
        if end <= have:
            return None
        self._sent = {str(message_id): end}
        return frame if offset == have else {**frame, "content": content[have - offset :], "offset": have}
