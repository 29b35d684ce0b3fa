"""A run's streamed text (README "Streaming"): live chunks to readers, the text so far kept in the hub (readers
that connect mid-message start from it) and, at most every ``draft_interval_s``, saved as the session's draft
(readers on other instances resume from it; after a crash it becomes a partial entry).

A provider may split one emoji across two chunks: a chunk ending in the first half of a UTF-16 pair keeps it
back for the next one, and all text is repaired (``service.text``) before anyone sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from autogen_agentchat.messages import ModelClientStreamingChunkEvent

from service.errors import LeaseLost, StoreUnavailable
from service.hub import Hub, LiveDraft
from service.models import Claim, Draft, chunk_frame, utcnow
from service.queue.store import Store
from service.text import repair, split_trailing_high_surrogate
from service.worker.logs import error_line
from service.worker.messages import to_entry

log = logging.getLogger(__name__)


class Streamer:
    """The streamed message of one run. ``add`` per chunk; ``committed`` once its message is in the log (or
    before anything else is appended); ``cut`` for the text so far when the run stops mid-message."""

    def __init__(self, claim: Claim, store: Store, hub: Hub, draft_interval_s: float) -> None:
        self.claim, self.store, self.hub = claim, store, hub
        self.draft_interval_s = draft_interval_s
        self.live: LiveDraft | None = None
        self._held = ""  # the first half of a UTF-16 pair, waiting for its second half
        self._saved_at = 0.0
        self._saving: asyncio.Task[None] | None = None
        self.lease_lost = False

    def add(self, chunk: ModelClientStreamingChunkEvent) -> None:
        session_id = self.claim.session_id
        message_id = chunk.full_message_id or chunk.id
        if self.live is None or self.live.message_id != message_id:
            self._drop_live()
            self.live = LiveDraft(self.claim.run_id, message_id, chunk.source)
            self.hub.start_draft(session_id, self.live)
        ready, self._held = split_trailing_high_surrogate(self._held + chunk.content)
        text = repair(ready)
        if not text:
            return
        self._publish(text, chunk)
        self._maybe_save()

    def _publish(self, text: str, chunk: ModelClientStreamingChunkEvent | None = None) -> None:
        live, session_id = self.live, self.claim.session_id
        assert live is not None
        offset = live.add(text)
        if self.hub.has_subscribers(session_id):  # nobody watching: skip building the frame
            dumped = {} if chunk is None else to_entry(chunk).metadata
            metadata = {k: v for k, v in dumped.items() if k != "full_message_id"}
            head = Draft(live.run_id, live.message_id, live.source, "")
            created = utcnow() if chunk is None else chunk.created_at
            frame = chunk_frame(session_id, head, text, offset, created_at=created, metadata=metadata)
            self.hub.publish_ephemeral(session_id, frame)

    async def committed(self) -> None:
        """Before any durable append: a draft save in flight must land first (the append of the message
        retires the draft, and a save landing after it would leave a stale draft behind)."""
        await self._settle_save()
        if self._held and self.live is not None:  # half a pair at the very end: it stands as U+FFFD
            held, self._held = self._held, ""
            self._publish(repair(held))
        self._drop_live()

    async def cut(self) -> Draft | None:
        """The text so far of a message cut off by a stop (None when no message was mid-stream); the live
        draft ends here."""
        await self._settle_save()
        live, held = self.live, self._held
        self._drop_live()
        if live is None:
            return None
        draft = live.snapshot()
        text = draft.text + repair(held)
        return Draft(draft.run_id, draft.message_id, draft.source, text) if text else None

    def _drop_live(self) -> None:
        if self.live is not None:
            self.hub.end_draft(self.claim.session_id, self.live)
        self.live, self._held = None, ""

    def _maybe_save(self) -> None:
        if self.draft_interval_s <= 0 or self.live is None or self._saving is not None:
            return
        now = asyncio.get_running_loop().time()
        if now - self._saved_at < self.draft_interval_s:
            return
        self._saved_at = now
        self._saving = asyncio.ensure_future(self._save(self.live.snapshot()))

    async def _save(self, draft: Draft) -> None:
        try:
            await self.store.save_draft(self.claim, draft)
        except LeaseLost:
            self.lease_lost = True
        except StoreUnavailable as exc:  # a draft is a convenience: the message itself is what counts
            log.warning("could not save a draft of %s: %s", self.claim.session_id, error_line(exc))
        finally:
            self._saving = None

    async def _settle_save(self) -> None:
        saving = self._saving
        if saving is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(saving)
