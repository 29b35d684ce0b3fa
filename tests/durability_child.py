"""Child process for tests/test_durability.py: acknowledges enqueues on stdout until it is SIGKILLed.

Usage: python -m tests.durability_child DB_PATH

It first enqueues one input to session ``held``, claims it with a 1 s lease and prints ``RUNNING`` (that input
stays running: the process will die holding it). Then four writers enqueue concurrently into sessions s0..s3
(so group commits carry several of them) and each prints ``ACK <session> <seq> <client_msg_id>`` only after its
enqueue returned, i.e. after the commit. The parent kills it mid-stream.
"""

from __future__ import annotations

import asyncio
import sys

from service.queue.sqlite import SqliteStore

WRITERS = 4


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def writer(store: SqliteStore, n: int) -> None:
    session_id = f"s{n}"
    i = 0
    while True:
        client_msg_id = f"{session_id}-c{i}"
        done = await store.enqueue("alice", session_id, f"message {i} of {session_id}", client_msg_id)
        say(f"ACK {session_id} {done.seq} {client_msg_id}")
        i += 1


async def main(path: str) -> None:
    store = SqliteStore(path)
    await store.open()
    held = await store.enqueue("alice", "held", "hold me", "held-c0")
    say(f"ACK held {held.seq} held-c0")
    claim = await store.claim("child", lease_s=1.0)
    assert claim is not None and claim.session_id == "held"
    say(f"RUNNING {claim.session_id} {claim.input_seq}")
    await asyncio.gather(*(writer(store, n) for n in range(WRITERS)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
