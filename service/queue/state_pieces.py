"""Team state stored as a small head plus append-only pieces, so a turn writes what changed, not the whole state.

AutoGen's ``save_state()`` of a team holds lists that grow with the conversation (each agent's
``llm_context.messages``, the manager's ``message_thread``, agents' ``message_buffer``); everything else is
small. A saved state is split into:

* the **head**: the state with each growing list emptied, plus a manifest ``{path: [count, digest]}`` (``path`` is
  the JSON array of keys leading to the list; ``digest`` a SHA-256 of the list's JSON array text, which is its
  items' texts joined by commas in brackets). It is rewritten on every save, and stays small;
* the **pieces**: one row per list item, keyed by (session, path, index), holding the item's JSON text.

A save compares the new lists with the manifest the run's claim read (``Claim.state_manifest``: under the lease
nothing else writes the state): a list whose first ``count`` items have the stored digest only appends the items
after them; any other list (an item changed, the list shrank, a path is new) is rewritten from index 0. Only the
items written are serialised one by one; the comparison serialises and hashes each list in one C call each, so
the Python work of a save follows what the run added, not the conversation (README "Benchmarks"). A digest of
another form (saved by an earlier version, which chained a hash item by item) never matches: that list is
rewritten once. Reading reassembles the head and the pieces (only ``index < count`` counts), in the claim's own
transaction.

A head without a manifest is a state saved whole by a version before migration 0006: it loads as it is, and the
next save stores it in pieces. The memory backend keeps the dict and needs none of this.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import orjson

# Keys whose list values grow with the conversation (AutoGen 0.7: AssistantAgent's llm_context.messages, every
# group chat manager's message_thread, and the message_buffer of an agent that seldom speaks, such as the default
# team's user proxy, which holds every message since it last spoke). Correctness does not depend on this
# choice, only the bytes saved do.
GROWING_KEYS = frozenset({"messages", "message_thread", "message_buffer"})
MANIFEST = "__pieces__"  # a key AutoGen never writes at the top of a state
HEAD = "head"
DIGEST_CHARS = 32  # of a SHA-256 hex digest

Manifest = dict[str, tuple[int, str]]  # path -> (count, digest hex)


@dataclass(frozen=True, slots=True)
class PieceWrite:
    """Keep the first ``keep`` stored items of ``path`` (drop the rest) and append ``items`` (JSON texts)."""

    path: str
    keep: int
    items: list[str]

    def items_json(self) -> str:
        """The items as one JSON array text."""
        return "[" + ",".join(self.items) + "]"


@dataclass(frozen=True, slots=True)
class StateSave:
    """What one save writes: the head's JSON text, the piece writes and the manifest the head records."""

    head: str
    writes: list[PieceWrite]
    manifest: Manifest
    clear: bool  # drop every stored piece of the session first (nothing known about them)


def _split(node: Any, path: list[str], lists: dict[str, list[Any]]) -> Any:
    """A copy of ``node`` with every growing list emptied; the lists (by path) go to ``lists``."""
    if isinstance(node, Mapping):
        out: dict[Any, Any] = {}
        for key, value in node.items():
            if key in GROWING_KEYS and isinstance(value, list):
                lists[orjson.dumps([*path, key]).decode()] = value
                out[key] = []
            else:
                out[key] = _split(value, [*path, str(key)], lists)
        return out
    return node  # lists that do not grow (and scalars) stay in the head as they are


def _digest(hashed: Any) -> str:
    return str(hashed.hexdigest()[:DIGEST_CHARS])


@dataclass(slots=True)
class ListMemo:
    """One list as a save last planned it: its items (the objects), the SHA-256 of its array text so far (``[``
    and the items' texts joined by commas, not yet closed) and its manifest entry."""

    items: list[Any]
    open_hash: Any  # a hashlib sha256 object
    count: int
    digest: str


class PiecesMemo:
    """What the saves of one team's state planned last, by list path (README "Team state"), so the next plan of
    a list whose first items are the very same objects (the ``StateSaver`` hands back the same dumps) serialises
    and hashes only the items after them. Kept by the caller (a live team) and given to ``Store.finish``; a memo
    that does not match the stored manifest, or items that are not the same objects, make a full plan. Items
    must never be changed in place (a saved state is data to read): with a memo, an item changed in place after
    its plan would not be written again (without one, its list's digest would no longer match and the list would
    be rewritten), so this rule is what keeps the stored state true."""

    def __init__(self) -> None:
        self.lists: dict[str, ListMemo] = {}


def _plan_list(
    items: list[Any], count: int, digest: str, memo: ListMemo | None
) -> tuple[int, list[bytes], ListMemo]:
    """``(keep, the JSON texts of items[keep:], the list as planned now)``: ``keep`` is ``count`` when the list's
    first ``count`` items are the stored ones (their array text has ``digest``), else 0. With a ``memo`` of the
    stored list whose items open ``items``, only the items after them are serialised and hashed; otherwise one
    orjson call writes the whole array (in C) and only the items to write are written one by one."""
    if memo is not None and (memo.count, memo.digest) == (count, digest) and _opens(memo.items, items):
        tail = [orjson.dumps(v) for v in items[count:]]
        open_hash = memo.open_hash.copy()
        open_hash.update((b"," if count and tail else b"") + b",".join(tail))
        return count, tail, _listed(items, open_hash)
    text = orjson.dumps(items)  # "[" + the items' own texts joined by "," + "]", which the pieces hold
    if not 0 <= count <= len(items):
        return 0, [orjson.dumps(v) for v in items], _listed(items, hashlib.sha256(memoryview(text)[:-1]))
    tail = [orjson.dumps(v) for v in items[count:]]
    # Where the first ``count`` items end in ``text`` (before the comma of the first of the others). One pass of
    # SHA-256: the stored prefix's digest on the way, then on to the whole (not yet closed) array.
    end = 1 if count == 0 else len(text) - 1 - sum(len(t) + 1 for t in tail)
    open_hash = hashlib.sha256(memoryview(text)[:end])
    prefix = open_hash.copy()
    prefix.update(b"]")
    open_hash.update(memoryview(text)[end:-1])
    if _digest(prefix) == digest:
        return count, tail, _listed(items, open_hash)
    return 0, [orjson.dumps(v) for v in items], _listed(items, open_hash)


def _listed(items: list[Any], open_hash: Any) -> ListMemo:
    closed = open_hash.copy()
    closed.update(b"]")
    return ListMemo(list(items), open_hash, len(items), _digest(closed))


def _opens(kept: list[Any], items: list[Any]) -> bool:
    """Whether ``kept`` are the first items of ``items``, the very same objects (one C pass)."""
    return len(kept) <= len(items) and all(map(operator.is_, kept, items))


def plan_save(state: Mapping[str, Any], stored: Manifest | None, memo: PiecesMemo | None = None) -> StateSave:
    """Split ``state`` and decide what to write, given the manifest of what is stored (None: unknown) and, when
    the caller keeps one, the ``memo`` of its last plan (updated to this one)."""
    lists: dict[str, list[Any]] = {}
    head = _split(state, [], lists)
    manifest: Manifest = {}
    writes = []
    planned: dict[str, ListMemo] = {}
    for path, items in lists.items():
        count, digest = (stored or {}).get(path, (-1, ""))
        keep, texts, listed = _plan_list(items, count, digest, None if memo is None else memo.lists.get(path))
        planned[path] = listed
        manifest[path] = (listed.count, listed.digest)
        if keep < len(items) or (stored is not None and keep != count):
            writes.append(PieceWrite(path, keep, [t.decode() for t in texts]))
    if stored is not None:  # lists that disappeared (a removed agent): drop their pieces
        writes.extend(PieceWrite(path, 0, []) for path in stored if path not in lists)
    text = orjson.dumps({MANIFEST: {p: list(v) for p, v in manifest.items()}, HEAD: head}).decode()
    if memo is not None:
        memo.lists = planned
    return StateSave(text, writes, manifest, clear=stored is None)


def manifest_of(head: dict[str, Any]) -> Manifest:
    """The manifest of a stored head that has one."""
    return {p: (int(v[0]), str(v[1])) for p, v in head[MANIFEST].items()}


def assemble(
    head: Any, pieces: Mapping[str, list[Any]] | None
) -> tuple[dict[str, Any] | None, Manifest | None]:
    """The state from a stored head (parsed JSON) and its pieces by path, with the stored manifest.

    A head without a manifest is a whole state (saved before pieces existed): returned as is, manifest None."""
    if head is None:
        return None, None
    if not isinstance(head, dict) or MANIFEST not in head:
        return head, None
    manifest = manifest_of(head)
    state: dict[str, Any] = head[HEAD]
    pieces = pieces or {}
    for path, (count, _) in manifest.items():
        keys = orjson.loads(path)
        node: Any = state
        for key in keys[:-1]:
            node = node[key]
        items = pieces.get(path, [])
        if len(items) < count:
            raise ValueError(f"team state: {count} pieces expected at {path}, {len(items)} stored")
        node[keys[-1]] = list(items[:count])
    return state, manifest


# ``Store.claim``'s ``held``: per session, the state dict the caller holds for it (one it gave ``finish``).
HeldStates: TypeAlias = Mapping[str, dict[str, Any]]
WRITTEN_HEADS = 4096  # sessions whose last written head a store remembers


def head_digest(head: str | bytes) -> str:
    """SHA-256 (hex) of a head's JSON text, as written (PostgreSQL computes the same of its stored text)."""
    return hashlib.sha256(head.encode() if isinstance(head, str) else head).hexdigest()


class WrittenHeads:
    """What ``Store.claim``'s ``held`` is checked against (README "Team state"): per session, the digest of the
    state head this store last committed and the ``id`` of the state dict it was made from.

    When the head stored now has that digest, the stored state is that dict's content (the head holds every
    list's count and digest, and a save writes the head and its pieces in one transaction), so a claim may hand
    back the caller's dict instead of reading the pieces back. The id is the dict's own while the caller holds
    it, and the caller only holds a dict it gave ``finish`` (which remembers it here, replacing what was
    remembered for the session). Bounded: the oldest are forgotten (their next claim reads the state back)."""

    def __init__(self, limit: int = WRITTEN_HEADS) -> None:
        self._limit = limit
        self._written: dict[str, tuple[str, int]] = {}

    def remember(self, session_id: str, head: str, state: dict[str, Any]) -> None:
        """After the commit of a save of ``state`` whose head text was ``head``."""
        self._written.pop(session_id, None)
        self._written[session_id] = (head_digest(head), id(state))
        while len(self._written) > self._limit:
            self._written.pop(next(iter(self._written)))

    def all_known(self, held: HeldStates | None) -> dict[str, tuple[str, dict[str, Any]]]:
        """{session id: (head digest, the caller's dict)} of every session whose held dict is the very dict last
        saved for it."""
        out: dict[str, tuple[str, dict[str, Any]]] = {}
        for session_id, state in (held or {}).items():
            written = self._written.get(session_id)
            if written is not None and written[1] == id(state):
                out[session_id] = (written[0], state)
        return out
