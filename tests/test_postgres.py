"""PostgreSQL only: several PostgresStore instances (as several service processes would) on one database.

Each test gets a fresh database from tests.pg (skipped only when no server is reachable). Waits are on events
and notifications, bounded by asyncio timeouts far above what they need, so a missing wake-up fails the test.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from service.errors import BadRequest, IncompatibleDatabase, StoreUnavailable
from service.models import RUN_COMPLETED, Claim, Draft, NewEntry, lifecycle
from service.queue.migrate import load_migrations
from service.queue.postgres import PostgresStore
from service.queue.postgres.notify import Notifier
from tests.conftest import FakeClock
from tests.pg import ADMIN_DSN

pytestmark = pytest.mark.postgres

OWNER = "alice"
LEASE_S = 60.0
WAIT_S = 10.0  # an upper bound for a wake-up that should take milliseconds


@asynccontextmanager
async def instances(
    url: str, clock: FakeClock, n: int = 2, writers: int = 1
) -> AsyncIterator[list[PostgresStore]]:
    stores = [
        PostgresStore(url, clock=clock, db_clock_offset=clock.db_offset, writers=writers) for _ in range(n)
    ]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        yield stores
    finally:
        for s in stores:
            await s.close()


async def admin(sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def parked(task: asyncio.Task[None]) -> asyncio.Task[None]:
    """Let ``task`` run up to its first real wait (wait_for_work captures its wake-up event synchronously)."""
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    return task


def said(text: str) -> NewEntry:
    return NewEntry("TextMessage", "assistant", text)


async def test_work_enqueued_on_one_instance_wakes_and_is_claimed_by_another(
    pg_url: str, clock: FakeClock
) -> None:
    async with instances(pg_url, clock) as (a, b):
        assert await b.claim("b1", LEASE_S) is None
        waiter = await parked(asyncio.create_task(b.wait_for_work(60)))
        done = await a.enqueue(OWNER, "s1", "hello from A", "m1")
        await asyncio.wait_for(waiter, WAIT_S)  # woken by NOTIFY service_work, not by its 60 s timeout
        claim = await b.claim("b1", LEASE_S)
        assert claim is not None
        assert (claim.session_id, claim.input_seq, claim.content) == ("s1", done.seq, "hello from A")
        assert await a.claim("a1", LEASE_S) is None

        # A finish on B that unblocks the session's next input wakes A.
        await a.enqueue(OWNER, "s1", "second", "m2")
        waiter = await parked(asyncio.create_task(a.wait_for_work(60)))
        await b.finish(claim, lifecycle(RUN_COMPLETED, "done"), None)
        await asyncio.wait_for(waiter, WAIT_S)
        nxt = await a.claim("a1", LEASE_S)
        assert nxt is not None and nxt.content == "second"


async def test_cancel_requested_on_one_instance_wakes_the_other(pg_url: str, clock: FakeClock) -> None:
    async with instances(pg_url, clock) as (a, b):
        await a.enqueue(OWNER, "s1", "long job", None)
        claim = await a.claim("a1", LEASE_S)
        assert claim is not None
        waiter = await parked(asyncio.create_task(a.wait_for_work(60)))
        assert await b.request_cancel(OWNER, "s1")
        await asyncio.wait_for(waiter, WAIT_S)
        assert await a.cancel_requested(claim)


async def test_listener_hears_commits_of_other_instances_only(pg_url: str, clock: FakeClock) -> None:
    heard: dict[str, asyncio.Queue[tuple[str, int]]] = {"a": asyncio.Queue(), "b": asyncio.Queue()}

    def recorder(name: str):  # type: ignore[no-untyped-def]
        async def listener(session_id: str, last_seq: int) -> None:
            await heard[name].put((session_id, last_seq))

        return listener

    async with instances(pg_url, clock) as (a, b):
        await a.listen(recorder("a"))
        await b.listen(recorder("b"))
        await a.enqueue(OWNER, "from-a", "one", None)
        assert await asyncio.wait_for(heard["b"].get(), WAIT_S) == ("from-a", 1)
        claim = await a.claim("a1", LEASE_S)
        assert claim is not None
        await a.append(claim, [said("hi")])  # seq 3: the claim committed run_started as seq 2
        # Calls may be coalesced per session; the last one carries the newest seq.
        while (got := await asyncio.wait_for(heard["b"].get(), WAIT_S)) != ("from-a", 3):
            assert got[0] == "from-a" and got[1] < 3

        # A transaction that rolls back rings no doorbell, even one that had appended before it failed
        # (here the team state cannot be stored): B's next call is for A's next commit.
        with pytest.raises(BadRequest):
            await a.finish(claim, lifecycle(RUN_COMPLETED, "done"), {"bad": "\ud800"})
        assert (await a.read_log("from-a")).last_seq == 3
        await a.enqueue(OWNER, "from-a-2", "three", None)
        assert await asyncio.wait_for(heard["b"].get(), WAIT_S) == ("from-a-2", 1)
        await a.finish(claim, lifecycle(RUN_COMPLETED, "done"), None)
        assert await asyncio.wait_for(heard["b"].get(), WAIT_S) == ("from-a", 4)

        # B writes once: A hears B's commit, and (notifications arrive in commit order) none of its own.
        await b.enqueue(OWNER, "from-b", "two", None)
        assert await asyncio.wait_for(heard["a"].get(), WAIT_S) == ("from-b", 1)
        assert heard["a"].empty()

        # A deletes a session: B's readers of it are told (seq 0) so they re-read and end.
        assert await a.delete_session(OWNER, "from-a-2")
        assert await asyncio.wait_for(heard["b"].get(), WAIT_S) == ("from-a-2", 0)


async def test_lost_listen_connection_reconnects_and_catches_up(pg_url: str, clock: FakeClock) -> None:
    heard: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

    async def listener(session_id: str, last_seq: int) -> None:
        await heard.put((session_id, last_seq))

    async with instances(pg_url, clock) as (a, b):
        await b.listen(listener)
        await a.enqueue(OWNER, "s1", "before the loss", None)
        assert await asyncio.wait_for(heard.get(), WAIT_S) == ("s1", 1)

        pid = b.notifier.server_pid()
        assert pid is not None
        waiter = await parked(asyncio.create_task(b.wait_for_work(60)))
        await admin("SELECT pg_terminate_backend($1)", pid)
        await asyncio.wait_for(waiter, WAIT_S)  # workers re-check the store while B is deaf
        # After reconnecting, B calls the listener for recently written sessions: what it may have missed.
        assert await asyncio.wait_for(heard.get(), WAIT_S) == ("s1", 1)
        assert b.notifier.reconnects == 1
        assert b.notifier.server_pid() not in (None, pid)

        await a.enqueue(OWNER, "s1", "after the loss", None)
        assert await asyncio.wait_for(heard.get(), WAIT_S) == ("s1", 2)


async def test_listen_reconnect_survives_a_catch_up_that_fails(pg_url: str) -> None:
    """The catch-up after a lost LISTEN connection reads through the store's pool, which may fail as well (the
    database restarting): the notifier retries instead of ending its supervision (it used to die, and the
    instance stayed deaf to the next loss)."""
    calls = 0

    async def catch_up(_since: datetime) -> list[tuple[str, int]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreUnavailable("the pool is not reachable yet")
        return [("s1", 7)]

    heard: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

    async def listener(session_id: str, last_seq: int) -> None:
        await heard.put((session_id, last_seq))

    notifier = Notifier(pg_url, "me", lambda: 0.0, catch_up, max_backoff_s=0.05)
    await notifier.start()
    try:
        notifier.add_listener(listener)
        for round_ in (1, 2):  # a second loss is noticed too: the supervision is still alive
            pid = notifier.server_pid()
            await admin("SELECT pg_terminate_backend($1)", pid)
            assert await asyncio.wait_for(heard.get(), WAIT_S) == ("s1", 7)
            assert notifier.reconnects == round_
            assert notifier.server_pid() not in (None, pid)
    finally:
        await notifier.stop()


async def test_concurrent_claims_across_instances_take_one_input_per_session(
    pg_url: str, clock: FakeClock
) -> None:
    async with instances(pg_url, clock, n=3) as stores:
        for n in range(4):
            await stores[0].enqueue(OWNER, "one", f"input {n}", None)
        claims = await asyncio.gather(*(s.claim(f"w{i}", LEASE_S) for i in range(12) for s in stores))
        taken = [c for c in claims if c is not None]
        assert [(c.session_id, c.input_seq) for c in taken] == [("one", 1)]
        assert await stores[1].counts() == {"queued": 3, "running": 1}


async def test_instances_racing_never_run_two_inputs_of_one_session(pg_url: str, clock: FakeClock) -> None:
    sessions, per_session, claimers_per_instance = 8, 5, 4
    total = sessions * per_session
    running: dict[str, int] = {}
    violations: list[str] = []
    order: dict[str, list[int]] = {}
    done = 0

    async def run(store: PostgresStore, claim: Claim) -> None:
        nonlocal done
        if claim.session_id in running:
            violations.append(f"{claim.session_id}: {claim.input_seq} while {running[claim.session_id]} runs")
        running[claim.session_id] = claim.input_seq
        order.setdefault(claim.session_id, []).append(claim.input_seq)
        await store.append(claim, [said("working")])  # real I/O while the run is live
        del running[claim.session_id]
        await store.finish(claim, lifecycle(RUN_COMPLETED, "done"), None)
        done += 1

    async def claimer(store: PostgresStore, name: str) -> None:
        while done < total:
            claim = await store.claim(name, LEASE_S)
            if claim is None:
                await store.wait_for_work(0.05)
            else:
                await run(store, claim)

    async with instances(pg_url, clock) as (a, b):
        expected: dict[str, list[int]] = {}
        for n in range(per_session):
            for s in range(sessions):
                producer = a if (n + s) % 2 else b
                seq = (await producer.enqueue(OWNER, f"s{s}", f"input {n}", None)).seq
                expected.setdefault(f"s{s}", []).append(seq)
        async with asyncio.timeout(45):
            await asyncio.gather(
                *(
                    claimer(store, f"{name}{i}")
                    for store, name in ((a, "a"), (b, "b"))
                    for i in range(claimers_per_instance)
                )
            )
        assert violations == []
        assert order == expected
        assert await a.counts() == {"queued": 0, "running": 0}


async def test_instances_opening_at_once_apply_migrations_once(pg_url: str, clock: FakeClock) -> None:
    async with instances(pg_url, clock, n=4) as stores:
        assert all([await s.ping() for s in stores])
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [(r["version"], r["name"]) for r in rows] == [
        (m.version, m.name) for m in load_migrations("postgres")
    ]


async def test_database_from_a_newer_version_is_refused(pg_url: str, clock: FakeClock) -> None:
    async with instances(pg_url, clock, n=1) as (store,):
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute("INSERT INTO schema_migrations VALUES (9999, 'from_the_future', now())")
        finally:
            await conn.close()
        assert not await store.ping()
    newer = PostgresStore(pg_url, clock=clock)
    with pytest.raises(IncompatibleDatabase, match="9999"):
        await newer.open()
    await newer.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_server_is_store_unavailable_with_a_clear_message(clock: FakeClock) -> None:
    port = _closed_port()
    store = PostgresStore(f"postgresql://postgres:s3cret@127.0.0.1:{port}/nothing", clock=clock)
    with pytest.raises(StoreUnavailable) as caught:
        await store.open()
    message = str(caught.value)
    assert "cannot open the PostgreSQL database" in message
    assert f"127.0.0.1:{port}/nothing" in message
    assert "s3cret" not in message
    assert isinstance(caught.value.__cause__, OSError)
    assert not await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.get_session(OWNER, "s1")
    await store.close()


async def test_read_only_database_fails_writes_with_store_unavailable(pg_url: str, clock: FakeClock) -> None:
    name = pg_url.rsplit("/", 1)[1]
    async with instances(pg_url, clock, n=1) as (store,):
        await store.enqueue(OWNER, "s1", "kept", None)
        await admin(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        # New sessions pick the setting up; drop the store's connections so its pool reconnects.
        await admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        for _ in range(3):  # the first call may meet a connection that is just dying: also StoreUnavailable
            with pytest.raises(StoreUnavailable) as caught:
                await store.enqueue(OWNER, "s1", "lost", None)
        assert isinstance(caught.value.__cause__, asyncpg.ReadOnlySQLTransactionError)
        assert not await store.ping()  # readiness: the database answers reads but cannot take a write
        await admin(f'ALTER DATABASE "{name}" SET default_transaction_read_only = off')
        await admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        page = None
        for _ in range(3):
            try:
                page = await store.read_log("s1")
                break
            except StoreUnavailable:
                continue  # a pooled connection that died with the termination above
        assert page is not None
        assert [e.content for e in page.messages] == ["kept"]
        assert await store.ping()


async def test_nul_characters_and_key_order_survive(pg_url: str, clock: FakeClock) -> None:
    # JSONB and TEXT cannot hold NUL; the schema uses JSON for bodies so any message a client or model sends fits.
    async with instances(pg_url, clock, n=1) as (store,):
        await store.enqueue(OWNER, "s1", "before\x00after", None)
        claim = await store.claim("w1", LEASE_S)
        assert claim is not None and claim.content == "before\x00after"
        body = {"zeta": "\x00", "alpha": [1, 2.5, None, True], "mid": {"b": 1, "a": 2}}
        await store.append(
            claim, [NewEntry("ToolCallRequestEvent", "assistant", body, {"z": 1, "a": "\x00"})]
        )
        await store.finish(claim, lifecycle(RUN_COMPLETED, "done"), {"y": "\x00", "x": 1})
        user, _, entry, _ = (await store.read_log("s1")).messages
        assert user.content == "before\x00after"
        assert entry.content == body and list(entry.content) == ["zeta", "alpha", "mid"]
        assert list(entry.metadata) == ["z", "a"] and entry.metadata["a"] == "\x00"
        assert await store.load_team_state("s1") == {"y": "\x00", "x": 1}
        await store.enqueue(OWNER, "s1", "again", None)
        again = await store.claim("w1", LEASE_S)
        assert again is not None and again.team_state == {"y": "\x00", "x": 1}
        # A NUL in a plain text column (a title) is the caller's error, not an outage.
        with pytest.raises(BadRequest):
            await store.create_session(OWNER, "s2", "default", "bad\x00title")
        assert await store.get_session(OWNER, "s2") is None


async def test_two_instances_sweeping_at_once_delete_each_expired_session_once(
    pg_url: str, clock: FakeClock
) -> None:
    async with instances(pg_url, clock) as (a, b):
        expired = [f"s{n:02d}" for n in range(40)]
        for sid in expired:
            await a.create_session(OWNER, sid, "default", None)
        clock.advance(2 * 86400)
        await a.create_session(OWNER, "fresh", "default", None)

        async def sweep(store: PostgresStore) -> list[str]:
            deleted: list[str] = []
            while ids := await store.expire_sessions(86400.0, 3):
                deleted += ids
            return deleted

        by_a, by_b = await asyncio.gather(sweep(a), sweep(b))
        assert sorted(by_a + by_b) == expired  # every expired session once: none twice, none missed
        assert [s.session_id for s in await b.list_sessions(OWNER)] == ["fresh"]


async def test_two_instances_claiming_webhooks_at_once_share_no_event(pg_url: str, clock: FakeClock) -> None:
    """README "Webhooks": one delivery per event across instances: concurrent claims never hand the same outbox
    row to two instances while its lease runs, and together they get every event once."""
    async with instances(pg_url, clock, n=2) as (a, b):
        for n in range(12):
            sid = f"w{n}"
            await a.create_session(OWNER, sid, "default", None, webhook_url="http://hooks.example/in")
            await a.enqueue(OWNER, sid, "hi", None)
            claim = await a.claim("w1", LEASE_S)
            assert claim is not None
            await a.finish(claim, lifecycle(RUN_COMPLETED, "done"), None)
        got_a, got_b = await asyncio.gather(a.claim_webhooks(LEASE_S, 8), b.claim_webhooks(LEASE_S, 8))
        rest = await a.claim_webhooks(LEASE_S, 8) + await b.claim_webhooks(LEASE_S, 8)
        ids = [e.webhook_id for e in got_a + got_b + rest]
        assert len(ids) == len(set(ids)) == 12
        assert {e.session_id for e in got_a + got_b + rest} == {f"w{n}" for n in range(12)}


async def deadlocks_in(url: str) -> int:
    """Deadlocks PostgreSQL detected in ``url``'s database, once every backend of it has ended (a backend
    reports its statistics when it ends; pg_terminate_backend with a timeout waits for that)."""
    name = url.rsplit("/", 1)[1]
    ms = int(WAIT_S * 1000)
    await admin("SELECT pg_terminate_backend(pid, $2) FROM pg_stat_activity WHERE datname = $1", name, ms)
    [row] = await admin("SELECT deadlocks FROM pg_stat_database WHERE datname = $1", name)
    return int(row["deadlocks"])


async def test_instances_writing_at_once_never_deadlock(pg_url: str, clock: FakeClock) -> None:
    """Two instances with two writers each (four writers at once): their group commits lock sessions in one
    order, claims included: a claim locks the session it
    picks (SKIP LOCKED, never waiting) AFTER the batch's other calls locked theirs, so two batches never wait on
    each other in a cycle. (A deadlock is not lost work, the batch is replayed, but PostgreSQL takes
    deadlock_timeout, 1 s, to see it: two instances ran slower than one.)"""
    sessions, per_session, claimers_per_instance = 32, 8, 16
    total = sessions * per_session
    done = 0

    async def produce(store: PostgresStore, s: int) -> None:
        for n in range(per_session):
            await store.enqueue(OWNER, f"s{s}", f"input {n}", f"s{s}-{n}")

    async def claimer(store: PostgresStore, name: str) -> None:
        nonlocal done
        while done < total:
            claim = await store.claim(name, LEASE_S)
            if claim is None:
                await store.wait_for_work(0.05)
                continue
            await store.append(claim, [said("working")])
            await store.finish(claim, lifecycle(RUN_COMPLETED, "done"), {"turn": claim.input_seq})
            done += 1

    before = await deadlocks_in(pg_url)
    async with instances(pg_url, clock, writers=2) as (a, b):
        async with asyncio.timeout(60):
            await asyncio.gather(
                *(produce(a if s % 2 else b, s) for s in range(sessions)),
                *(
                    claimer(store, f"{n}{i}")
                    for store, n in ((a, "a"), (b, "b"))
                    for i in range(claimers_per_instance)
                ),
            )
        assert await a.counts() == {"queued": 0, "running": 0}
    assert await deadlocks_in(pg_url) == before


async def blocked_on_a_lock(conn: asyncpg.Connection[Any], pid: int) -> None:
    """Until backend ``pid`` waits for a lock (bounded: WAIT_S)."""
    query = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1"
    async with asyncio.timeout(WAIT_S):
        while not await conn.fetchval(query, pid):  # noqa: ASYNC110 (another backend's state: no event)
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("first", ["heartbeat", "set_cursor"])
async def test_every_verb_takes_its_session_lock_first(pg_url: str, clock: FakeClock, first: str) -> None:
    """A batch holding [heartbeat or set_cursor of s1, then append of s1] against another batch cancelling or
    deleting s1 (session lock first, then the run's input row or the cursor rows): if the first verb locked its
    row without the session lock, each would wait for the other (a deadlock PostgreSQL breaks after 1 s)."""
    async with instances(pg_url, clock, n=1) as (store,):
        await store.enqueue(OWNER, "s1", "hello", None)
        claim = await store.claim("w", LEASE_S)
        assert claim is not None
        await store.set_cursor("s1", "page", 1)
    fenced = {"session": "s1", "input": claim.input_id, "token": claim.lease_token, "run": claim.run_id}
    calls = {
        "heartbeat": {"op": "heartbeat", **fenced, "lease_s": LEASE_S},
        "set_cursor": {"op": "set_cursor", "session": "s1", "client": "page", "seq": 2},
    }
    other = {
        "heartbeat": {
            "op": "cancel",
            "session": "s1",
            "owner": OWNER,
            "input": claim.input_id,
            "status": "running",
        },
        "set_cursor": {"op": "delete_session", "session": "s1", "owner": OWNER},
    }
    append = {"op": "append", **fenced, "entries": [], "asks": False, "ids": []}
    a, b, watcher = [await asyncpg.connect(pg_url) for _ in range(3)]
    try:
        async with a.transaction():
            await a.fetchval("SELECT svc_batch($1::json, 0)", json.dumps([calls[first]]))
            second = asyncio.create_task(
                b.fetchval("SELECT svc_batch($1::json, 0)", json.dumps([other[first]]))
            )
            await blocked_on_a_lock(
                watcher, b.get_server_pid()
            )  # on the session (or, before, the row A holds)
            await a.fetchval("SELECT svc_batch($1::json, 0)", json.dumps([append]))
        await asyncio.wait_for(second, WAIT_S)
    finally:
        for conn in (a, b, watcher):
            await conn.close()


SESSION_TABLES = ("entries", "inputs", "cursors", "drafts", "state_pieces", "webhook_outbox")


async def rows_of(url: str, session_id: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return {
            table: await conn.fetchval(f"SELECT count(*) FROM {table} WHERE session_id = $1", session_id)
            for table in (*SESSION_TABLES, "sessions")
        }
    finally:
        await conn.close()


async def a_session_with_rows_everywhere(store: PostgresStore, session_id: str) -> Claim:
    """A row of ``session_id`` in every table that holds a session's rows: log, inputs, a cursor, a draft,
    state pieces and a webhook outbox row (the session has its own webhook URL). Returns its running claim."""
    await store.create_session(OWNER, session_id, "default", None, webhook_url="http://127.0.0.1:9/hook")
    await store.enqueue(OWNER, session_id, "first", f"{session_id}-m1")
    claim = await store.claim("w", LEASE_S)
    assert claim is not None and claim.session_id == session_id
    await store.finish(claim, lifecycle(RUN_COMPLETED, "done"), {"messages": [{"n": 1}, {"n": 2}]})
    await store.enqueue(OWNER, session_id, "second", f"{session_id}-m2")
    claim = await store.claim("w", LEASE_S)
    assert claim is not None
    await store.save_draft(claim, Draft(claim.run_id, "msg-1", "assistant", "half a sen"))
    await store.set_cursor(session_id, "client-1", 2)
    before = await rows_of(store_url(store), session_id)
    assert all(before[table] > 0 for table in SESSION_TABLES), before  # the test reaches every table
    return claim


def store_url(store: PostgresStore) -> str:
    return store.engine.dsn


@pytest.mark.parametrize("how", ["delete", "expire"])
async def test_a_deleted_session_leaves_no_row_behind(pg_url: str, clock: FakeClock, how: str) -> None:
    """A session's rows go with it (migration 0013's trigger, no foreign keys): deleted by the API or by the
    retention sweep, nothing of it stays in any table, and another session keeps all of its rows."""
    async with instances(pg_url, clock, n=1) as (store,):
        running = await a_session_with_rows_everywhere(store, "doomed")
        if how == "delete":
            assert await store.delete_session(OWNER, "doomed")
        else:  # the run ends (its draft with it), the session idles past the TTL, the sweep takes it
            await store.finish(running, lifecycle(RUN_COMPLETED, "done"), None)
            clock.advance(2 * 86400)
        await store.create_session(OWNER, "kept", "default", None)
        await store.enqueue(OWNER, "kept", "stays", "k1")
        kept = await rows_of(pg_url, "kept")
        if how == "expire":
            assert await store.expire_sessions(86400.0, 10) == ["doomed"]
        assert await rows_of(pg_url, "doomed") == {table: 0 for table in (*SESSION_TABLES, "sessions")}
        assert await rows_of(pg_url, "kept") == kept
