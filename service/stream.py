"""``follow``: replay a session's log after a cursor, then go live, with no gap and no duplicate.

The subscription opens BEFORE the first read, so nothing committed during the replay is missed. Live entries with
seq <= what was sent are dropped; a gap (seq > last + 1), or a subscription that lagged (its bounded buffer overflowed,
or another process committed), sends the reader back to the store. Ephemeral frames (``seq: null``) pass straight
through and are never replayed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from service.hub import Hub, Item, Subscription
from service.models import Entry
from service.queue.store import Store

REPLAY_PAGE = 500


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
    """Durable entries with seq > after in order (then live), interleaved with live ephemeral frames.

    Ends when the session is deleted (here, or seen as a log shorter than the cursor after another process
    deleted it): a cursor into a deleted log means nothing, even if a session of that id is created again."""
    last = after
    with hub.subscribe(session_id) as sub:
        while not sub.closed:
            # Reset before reading: whatever is published from now on is buffered, and whatever was published
            # before was committed first, so the store read below sees it.
            sub.reset()
            try:
                async for entry in replay(store, session_id, last):
                    yield entry
                    last = entry.seq
            except SessionGone:
                return
            while (item := await _next_live(sub)) is not None:
                if not isinstance(item, Entry):
                    yield item
                elif item.seq == last + 1:
                    yield item
                    last = item.seq
                elif item.seq > last + 1:
                    sub.lagged = True  # a gap: read the missing entries from the store
