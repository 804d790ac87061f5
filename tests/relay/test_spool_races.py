"""A durable state update (``mailplane queue hold``/``release``) runs in a thread; the message
may be removed or erased on the event loop meanwhile. Neither may leave a state file naming
what was removed or erased. The thread is held at the start of its write by a wrapper around
the spool's own write (real files, real threads), so each interleaving is reached every run."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.spool import HELD, Spool, SpoolError

pytestmark = pytest.mark.timeout(30)

ADDRESS = "erase-me@example.net"


def tree_bytes(root: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def gate(spool: Spool) -> tuple[threading.Event, threading.Event]:
    """Hold the next state write in its thread: ``entered`` is set when it starts, and it
    goes on when ``go`` is set."""
    entered, go = threading.Event(), threading.Event()
    real: Callable[..., None] = spool._write_state

    def held(*args: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            assert go.wait(10)
        real(*args)

    spool._write_state = held  # type: ignore[method-assign,assignment]
    return entered, go


async def started(spool: Spool, tmp_path: Path) -> Spool:
    await spool.start()
    return spool


async def test_a_message_removed_during_a_durable_state_write_leaves_no_state_file(
        tmp_path: Path) -> None:
    spool = await started(Spool(str(tmp_path), fsync=True, metrics=RelayMetrics.create()),
                          tmp_path)
    try:
        msg = await spool.commit(mail_from="app@example.com", recipients=[ADDRESS],
                                 data=b"Subject: s\r\n\r\nb\r\n", message_id=None,
                                 credential=None, sender_domain="example.com", listener="t")
        entered, go = gate(spool)
        msg.extra[HELD] = True
        write = asyncio.ensure_future(spool.save_state(msg, durable=True))
        await asyncio.to_thread(entered.wait, 10)
        await spool.remove(msg.queue_id)  # delivered meanwhile
        go.set()
        await write
        assert not (tmp_path / f"{msg.queue_id}.state").exists(), "an orphan state file"
        assert ADDRESS.encode() not in tree_bytes(tmp_path)
    finally:
        await spool.close()


async def test_an_erasure_during_a_durable_state_write_is_not_undone_by_it(
        tmp_path: Path) -> None:
    spool = await started(Spool(str(tmp_path), fsync=True, metrics=RelayMetrics.create()),
                          tmp_path)
    try:
        msg = await spool.commit(mail_from="app@example.com",
                                 recipients=[ADDRESS, "keep@example.org"],
                                 data=b"Subject: s\r\n\r\nb\r\n", message_id=None,
                                 credential=None, sender_domain="example.com", listener="t")
        await spool.save_state(msg)  # a state file exists: the erasure rewrites it
        entered, go = gate(spool)
        msg.extra[HELD] = True
        write = asyncio.ensure_future(spool.save_state(msg, durable=True))
        await asyncio.to_thread(entered.wait, 10)
        erasure = await spool.erase_address(ADDRESS)
        assert erasure.recipients_removed == 1
        go.set()
        await write
        assert ADDRESS.encode() not in tree_bytes(tmp_path), (
            "the state write that started before the erasure put the address back")
        state = (tmp_path / f"{msg.queue_id}.state").read_bytes()
        assert b"keep@example.org" in state and b'"held":true' in state
    finally:
        await spool.close()


async def test_a_state_file_unreadable_at_load_is_an_error_not_the_committed_envelope(
        tmp_path: Path) -> None:
    """A deferred message's envelope is read again when it falls due. When its state file
    cannot be read at that moment, the load fails (the queue retries later): the commit-time
    envelope would have every recipient pending again and no hold."""
    spool = await started(Spool(str(tmp_path), fsync=True, metrics=RelayMetrics.create()),
                          tmp_path)
    try:
        msg = await spool.commit(mail_from="app@example.com",
                                 recipients=["done@example.org", "later@example.org"],
                                 data=b"Subject: s\r\n\r\nb\r\n", message_id=None,
                                 credential=None, sender_domain="example.com", listener="t")
        qid = msg.queue_id
        msg.recipients[0].status = "delivered"
        msg.extra[HELD] = True
        await spool.save_state(msg, durable=True)
        del msg
        gc.collect()
        assert qid not in spool._envelopes
        state = tmp_path / f"{qid}.state"
        state.rename(tmp_path / "aside")
        state.mkdir()  # open() of it fails (EISDIR), as it would on EMFILE or EIO
        with pytest.raises(SpoolError, match=qid):
            spool.load(qid)
        assert qid not in spool._envelopes
        assert not (tmp_path / "corrupt").exists()
        state.rmdir()
        (tmp_path / "aside").rename(state)
        loaded = spool.load(qid)
        assert loaded is not None and loaded.extra.get(HELD)
        assert [r.status for r in loaded.recipients] == ["delivered", "pending"]
    finally:
        await spool.close()


async def test_a_removal_cut_by_a_crash_during_its_zero_fill_is_deleted_not_set_aside(
        tmp_path: Path) -> None:
    """After a power cut, a removed message's name may be back (its rename into free/ was not
    durable) with its zero-fill half on the disk: the rest of the delivered message is not
    kept in corrupt/. A damaged file that is not zeros still is."""
    first = Spool(str(tmp_path), fsync=True, metrics=RelayMetrics.create())
    await first.start()
    try:
        kept = []
        for _ in range(2):
            m = await first.commit(mail_from="app@example.com", recipients=[ADDRESS],
                                   data=b"Subject: s\r\n\r\n" + b"delivered body " * 50,
                                   message_id=None, credential=None,
                                   sender_domain="example.com", listener="t")
            kept.append(m.queue_id)
    finally:
        await first.close()
    half, damaged = (tmp_path / f"{qid}.msg" for qid in kept)
    raw = half.read_bytes()
    half.write_bytes(bytes(len(raw) // 2) + raw[len(raw) // 2:])
    damaged.write_bytes(b"XPS1" + raw[4:])
    again = Spool(str(tmp_path), fsync=True, metrics=RelayMetrics.create())
    assert await again.start() == []
    await again.close()
    assert not half.exists()
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == [damaged.name]
