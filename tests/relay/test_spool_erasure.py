"""Per-address erasure in the spool, and the DSN duty that the spool keeps across restarts.

Real spools on disk; the delivery side is the real DeliveryQueue delivering to an aiosmtpd sink
(the ``Relay`` wiring of test_delivery_flows)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.spool import QueuedMessage, Spool
from mailplane_relay.store.sync import query_log
from tests.relay.test_delivery_flows import Relay, make_config, smarthost

ERASED = "Erased.Person@Example.net"


def tree_bytes(directory: Path) -> bytes:
    out = []
    for p in sorted(directory.rglob("*")):
        out.append(str(p).encode())
        if p.is_file():
            out.append(p.read_bytes())
    return b"\n".join(out)


def data(tag: str) -> bytes:
    # The data names nobody: the test looks for the address in the files, envelopes only.
    return f"From: app@example.com\r\nSubject: {tag}\r\n\r\nbody {tag}\r\n".encode()


async def commit(s: Spool, sender: str, rcpts: list[str], tag: str) -> QueuedMessage:
    return await s.commit(mail_from=sender, recipients=rcpts, data=data(tag),
                          message_id=None, credential="app", sender_domain="example.com",
                          listener="submission")


async def test_erasure_edits_envelopes_deletes_messages_and_leaves_no_trace(
        tmp_path: Path) -> None:
    s = Spool(str(tmp_path), fsync=True, metrics=RelayMetrics.create())
    await s.start()
    erased = ERASED.lower()
    shared = await commit(s, "app@example.com", [erased, "keep@example.org"], "shared")
    shared.recipients[0].status = "delivered"  # already delivered to the erased address
    shared.extra["remotes"] = {erased: "mx.example.net:25", "keep@example.org": "mx:25"}
    shared.extra["dsn_reported"] = [ERASED, "keep@example.org"]
    await s.save_state(shared)
    only = await commit(s, "app@example.com", [ERASED.upper()], "only")
    sent_by = await commit(s, ERASED, ["friend@example.org"], "sent-by")
    other = await commit(s, "app@example.com", ["someone@example.org"], "other")
    assert erased.encode() in tree_bytes(tmp_path).lower()
    dir_fsyncs = s.dir_fsyncs

    result = await s.erase_address(ERASED)

    assert (result.recipients_removed, result.messages_deleted) == (2, 2)
    assert sorted(result.deleted_ids) == sorted([only.queue_id, sent_by.queue_id])
    # The envelope objects the delivery queue holds changed in place.
    assert [r.address for r in shared.recipients] == ["keep@example.org"]
    assert shared.extra["remotes"] == {"keep@example.org": "mx:25"}
    assert shared.extra["dsn_reported"] == ["keep@example.org"]
    assert only.recipients == [] and sent_by.recipients == [] and sent_by.mail_from == ""
    assert s.read(shared.queue_id) == data("shared")  # the data is untouched
    assert s.dir_fsyncs > dir_fsyncs  # the deletions and renames were made durable
    assert erased.encode() not in tree_bytes(tmp_path).lower()
    assert await s.erase_address(ERASED) == type(result)()  # nothing left: all zero
    await s.close()

    again = Spool(str(tmp_path), fsync=True, metrics=RelayMetrics.create())
    recovered = {m.queue_id: m for m in await again.start()}
    await again.close()
    assert sorted(recovered) == sorted([shared.queue_id, other.queue_id])
    assert [(r.address, r.status) for r in recovered[shared.queue_id].recipients] == [
        ("keep@example.org", "pending")]
    assert erased.encode() not in tree_bytes(tmp_path).lower()


async def test_erasure_removes_the_address_from_dsn_parameters(tmp_path: Path) -> None:
    """ORCPT may name the address as another recipient's original one (forwarding), ENVID
    may hold it as text: the recipient stays, the parameters naming the address go."""
    s = Spool(str(tmp_path), fsync=True, metrics=RelayMetrics.create())
    await s.start()
    erased = ERASED.lower()
    forwarded = await s.commit(
        mail_from="app@example.com", recipients=["new@example.org", "other@example.org"],
        data=data("fwd"), message_id=None, credential="app", sender_domain="example.com",
        listener="submission", extra={"envid": f"order for {ERASED}"},
        dsn=[(("FAILURE",), f"rfc822;{ERASED}"), (None, "rfc822;other@example.org")])
    await s.close()  # erased from the files, not from an envelope held in memory
    s = Spool(str(tmp_path), fsync=True, metrics=RelayMetrics.create())
    await s.start(lazy=True)
    async for _ in s.recover():
        pass
    assert erased.encode() in tree_bytes(tmp_path).lower()

    result = await s.erase_address(ERASED)

    assert (result.recipients_removed, result.messages_deleted) == (0, 0)
    assert erased.encode() not in tree_bytes(tmp_path).lower()
    msg = s.envelope(forwarded.queue_id)
    assert msg is not None
    assert [(r.address, r.notify, r.orcpt) for r in msg.recipients] == [
        ("new@example.org", ["FAILURE"], None),
        ("other@example.org", None, "rfc822;other@example.org")]
    assert "envid" not in msg.extra
    await s.close()


async def test_erasure_while_the_relay_delivers(tmp_path: Path, smtp_sink: Any) -> None:
    sink = await smtp_sink(mail_reply="451 4.3.0 Try again later")
    r = Relay(tmp_path, make_config(smarthost(sink)))
    await r.start()
    try:
        erased = ERASED.lower()
        shared = await r.send([erased, "keep@example.org"])
        alone = await r.send([erased])
        sent_by = await r.send(["friend@example.org"], sender=erased)
        await r.wait(lambda: shared.attempts >= 1 and alone.attempts >= 1
                     and sent_by.attempts >= 1)
        erased_at = time.time()

        result = await r.spool.erase_address(ERASED)
        for qid in result.deleted_ids:
            r.queue.forget(qid)
        assert (result.recipients_removed, result.messages_deleted) == (2, 2)
        assert r.queue.message(alone.queue_id) is None
        assert r.queue.message(sent_by.queue_id) is None

        sink.behaviour.mail_reply = None  # the upstream recovers
        await r.done(shared)
        [got] = sink.messages
        assert got.rcpt_tos == ["keep@example.org"]
        await asyncio.sleep(0.3)  # anything still scheduled for the erased messages would run
        assert len(sink.messages) == 1  # no copy of the others, no DSN to or about the address
        await r.log.flush()
        rows = query_log(r.db, limit=1000)
        assert not [row for row in rows if row["ts"] >= erased_at
                    and erased in (row["recipient"], row["sender"])]
        assert r.spooled() == [] and r.queue.queued == 0
        assert erased.encode() not in tree_bytes(tmp_path / "spool")
    finally:
        await r.stop()


@pytest.mark.parametrize("role", ["recipient", "sender"])
async def test_erasure_while_an_attempt_connects(tmp_path: Path, smtp_sink: Any,
                                                 role: str) -> None:
    """The interleaving behind a flaky run of the test above, forced: an attempt holds the
    envelope and is opening its connection when the erasure runs. Once the erasure has
    reported done, no transaction names the address (nor carries a message it sent)."""
    sink = await smtp_sink()
    r = Relay(tmp_path, make_config(smarthost(sink)))
    connecting, erased_done = asyncio.Event(), asyncio.Event()
    real_connect = r.queue._connect

    async def gated_connect(*args: Any, **kwargs: Any) -> Any:
        connecting.set()
        await erased_done.wait()  # the connection opens after the erasure reported done
        return await real_connect(*args, **kwargs)

    r.queue._connect = gated_connect  # type: ignore[method-assign]
    await r.start()
    try:
        erased = ERASED.lower()
        if role == "recipient":
            msg = await r.send([erased, "keep@example.org"])
        else:
            msg = await r.send(["friend@example.org"], sender=erased)
        await asyncio.wait_for(connecting.wait(), 10)
        assert [x.address for x in msg.recipients] != []  # the attempt holds the envelope
        result = await r.spool.erase_address(ERASED)
        for qid in result.deleted_ids:
            r.queue.forget(qid)
        erased_done.set()
        if role == "recipient":
            await r.done(msg)
            [got] = sink.messages
            assert got.rcpt_tos == ["keep@example.org"]
        else:
            await r.wait(lambda: not r.queue._attempts)
            assert sink.messages == []
        assert all(erased not in m.rcpt_tos and m.mail_from != erased for m in sink.messages)
    finally:
        await r.stop()


@pytest.mark.parametrize("pipelining", [False, True])
async def test_erasure_while_a_transaction_waits_for_a_reply(
        tmp_path: Path, smtp_sink: Any, pipelining: bool) -> None:
    """The erasure runs while the server holds its reply to the transaction's first RCPT.
    Without PIPELINING the erased recipient gets no RCPT afterwards; with it (every RCPT and
    DATA already sent) the connection is dropped before the body, so the server discards
    the transaction, and the next attempt goes to the other recipient alone."""
    gate = asyncio.Event()
    sink = await smtp_sink(rcpt_gate=gate, pipelining=pipelining)
    r = Relay(tmp_path, make_config(smarthost(sink)))
    await r.start()
    try:
        erased = ERASED.lower()
        first = erased if pipelining else "keep@example.org"
        msg = await r.send([first, *({erased, "keep@example.org"} - {first})])
        await sink.wait_for(lambda: sink.rcpt_attempts == [first])
        await r.spool.erase_address(ERASED)
        gate.set()
        await r.done(msg)
        [got] = sink.messages
        assert got.rcpt_tos == ["keep@example.org"]
        if not pipelining:
            assert sink.rcpt_attempts == ["keep@example.org"]
    finally:
        await r.stop()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                         capture_output=True, check=False)
    assert res.returncode == 0, f"cannot mount a tmpfs: {res.stderr.decode().strip()}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


async def test_a_dsn_that_could_not_be_spooled_is_sent_after_a_restart(
        tmp_path: Path, tiny_fs: Path, smtp_sink: Any) -> None:
    sink = await smtp_sink(rcpt_replies={"gone@example.net": "550 5.1.1 No such user"})
    config = make_config(smarthost(sink))
    r = Relay(tmp_path, config)
    r.spool = Spool(str(tiny_fs / "spool"), fsync=True, metrics=r.metrics)
    r.queue._spool = r.spool
    r.directory = tiny_fs
    sink.behaviour.mail_reply = "451 4.3.0 Not yet"
    await r.start()
    # Large headers make the DSN (which quotes them) need more room than a state update.
    headers = "".join(f"X-Filler-{i}: {'y' * 900}\r\n" for i in range(30))
    original = (f"From: app@example.com\r\n{headers}Subject: dsn duty\r\n\r\nbody\r\n").encode()
    msg = await r.send(["gone@example.net"], data=original)
    await r.wait(lambda: msg.attempts >= 1)
    # Fill the disk, then free two pages: a state update fits, the DSN does not.
    filler = tiny_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096) == 4096:
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, filler.stat().st_size - 2 * 4096)
    sink.behaviour.mail_reply = None  # the next attempt reaches RCPT: 550, a DSN is owed
    await r.wait(lambda: msg.recipients[0].status == "bounced" and msg.recipients[0].dsn_owed)
    await asyncio.sleep(0.2)
    assert not [m for m in sink.messages if m.mail_from == ""], "the DSN fit after all"
    await r.stop()

    filler.unlink()  # space again; the relay restarts before its retry
    again = Relay(tmp_path / "again", config)
    again.spool = Spool(str(tiny_fs / "spool"), fsync=True, metrics=again.metrics)
    again.queue._spool = again.spool
    recovered = await again.start()
    try:
        assert [m.queue_id for m in recovered] == [msg.queue_id]
        assert recovered[0].recipients[0].dsn_owed
        await again.wait(lambda: again.queue.queued == 0)  # the message, then its DSN
        [dsn] = [m for m in sink.messages if m.mail_from == ""]
        assert dsn.rcpt_tos == ["app@example.com"]
        assert b"gone@example.net" in dsn.data
        assert sorted(p.name for p in (tiny_fs / "spool").glob("*.msg")) == []
    finally:
        await again.stop()
