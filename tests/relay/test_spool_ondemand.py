"""A deferred message is scheduled by queue id and due time only: its envelope leaves memory
after the attempt and is read from the spool when the message falls due again. Erasure still
finds an address in such an envelope, a restarted relay schedules its spool without reading
every envelope into memory, and expiry and its DSN work on reloaded envelopes.

Real spools on disk, the real DeliveryQueue delivering to an aiosmtpd sink (the ``Relay``
wiring of test_delivery_flows)."""

from __future__ import annotations

import errno
import gc
import time
import weakref
from pathlib import Path
from typing import Any

from mailplane_relay.delivery import queue as queue_module
from mailplane_relay.spool import QueuedMessage
from tests.relay.test_delivery_flows import Relay, dsns, make_config, message, smarthost

SLOW_RETRY = {"retryInitial": 30, "retryMax": 30, "retryJitter": 0}


def in_memory(r: Relay, queue_id: str) -> bool:
    """Whether any part of the relay holds the message's envelope object."""
    gc.collect()
    return (queue_id in r.spool._envelopes or queue_id in r.queue._kept
            or queue_id in r.queue._attempts)


async def deferred(r: Relay, count: int) -> None:
    """Wait until ``count`` deferrals are recorded and no attempt is in progress."""
    await r.wait(lambda: r.count("deferred") == count and not r.queue._attempts)


def make_due(r: Relay, queue_id: str) -> None:
    """Bring a scheduled message's next attempt forward to now (what a queue flush does)."""
    r.queue._push(queue_id, time.time())


def count_loads(r: Relay) -> list[str]:
    """The queue ids whose envelopes the spool reads from disk for ``Spool.load`` from now on
    (not those it has in memory)."""
    loaded: list[str] = []
    real = r.spool.load

    def load(qid: str) -> QueuedMessage | None:
        if qid not in r.spool._envelopes:
            loaded.append(qid)
        return real(qid)

    r.spool.load = load  # type: ignore[method-assign,assignment]
    return loaded


def files_text(directory: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


async def test_a_deferred_envelope_leaves_memory_and_is_read_again_when_due(
        relay: Any, smtp_sink: Any) -> None:
    sink = await smtp_sink(rcpt_replies={"later@example.net": "451 4.2.0 Try again later"})
    r = await relay(make_config(smarthost(sink), queue=SLOW_RETRY))
    loads = count_loads(r)
    msg = await r.send(["later@example.net"])
    qid, committed = msg.queue_id, weakref.ref(msg)
    del msg
    await deferred(r, 1)
    assert not in_memory(r, qid) and committed() is None
    assert r.queue.queued == 1 and loads == []
    assert r.metrics.registry.get_sample_value("mailplane_relay_queue_messages") == 1
    sink.behaviour.rcpt_replies.clear()
    make_due(r, qid)
    await r.wait(lambda: r.queue.queued == 0)
    assert loads == [qid]  # the second attempt read the envelope from the spool
    [got] = sink.messages
    assert got.rcpt_tos == ["later@example.net"]
    rows = await r.events(QueuedMessage(qid, "", [], 0, 0, None, None, "", "", 0))
    assert [(e["status"], e["attempt"]) for e in rows] == [("deferred", 1), ("delivered", 2)]
    assert r.spooled() == []


async def test_erasure_finds_the_address_in_envelopes_only_on_disk(
        relay: Any, smtp_sink: Any) -> None:
    erased = "Erased.Person@Example.net"
    sink = await smtp_sink(mail_reply="451 4.3.0 Not now")
    r = await relay(make_config(smarthost(sink), queue=SLOW_RETRY))
    # The message data names nobody (erasure edits envelopes, not the sender's data).
    shared = (await r.send([erased.lower(), "keep@example.org"],
                           data=message("keep@example.org"))).queue_id
    sent_by = (await r.send(["friend@example.org"], sender=erased.upper(),
                            data=message("friend@example.org"))).queue_id
    other = (await r.send(["someone@example.org"])).queue_id
    await deferred(r, 4)  # four recipients
    assert not any(in_memory(r, q) for q in (shared, sent_by, other))
    assert erased.lower().encode() in files_text(r.directory / "spool").lower()

    result = await r.spool.erase_address(erased)
    for qid in result.deleted_ids:
        r.queue.forget(qid)

    assert (result.recipients_removed, result.deleted_ids) == (1, (sent_by,))
    assert erased.lower().encode() not in files_text(r.directory / "spool").lower()
    assert r.queue.queued == 2 and r.queue.message(sent_by) is None
    kept = r.queue.message(shared)
    assert kept is not None and [x.address for x in kept.recipients] == ["keep@example.org"]
    del kept
    sink.behaviour.mail_reply = None
    make_due(r, shared)
    make_due(r, other)
    await r.wait(lambda: r.queue.queued == 0)
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == [
        "keep@example.org", "someone@example.org"]


async def test_a_restart_schedules_the_spool_without_holding_envelopes(
        tmp_path: Path, smtp_sink: Any) -> None:
    sink = await smtp_sink(mail_reply="451 4.3.0 Not now")
    config = make_config(smarthost(sink), queue=SLOW_RETRY)
    first = Relay(tmp_path, config)
    await first.start()
    qids = [(await first.send([f"u{i}@example.net"])).queue_id for i in range(5)]
    await deferred(first, 5)
    await first.stop()

    again = Relay(tmp_path, config)
    await again.spool.start(lazy=True)
    await again.store.open()
    await again.log.start()
    await again.suppression.start()
    await again.queue.start([])
    try:
        loads = count_loads(again)
        async for batch in again.spool.recover(batch=2):
            assert all(isinstance(d.next_attempt, float) for d in batch)
            again.queue.schedule(batch)
        assert again.queue.queued == 5 and sorted(again.queue.queued_ids()) == sorted(qids)
        assert not any(in_memory(again, q) for q in qids) and loads == []
        again.queue.update_gauges()
        # The oldest message's age comes from its queue id (no envelope is read for it).
        age = again.metrics.registry.get_sample_value(
            "mailplane_relay_queue_oldest_message_age_seconds")
        assert age is not None and 0 < age < 120
        sink.behaviour.mail_reply = None
        for qid in qids:
            make_due(again, qid)
        await again.wait(lambda: again.queue.queued == 0)
        assert sorted(loads) == sorted(qids)
        assert sorted(m.rcpt_tos[0] for m in sink.messages) == [
            f"u{i}@example.net" for i in range(5)]
    finally:
        await again.stop()


async def test_expiry_and_its_dsn_work_on_a_reloaded_envelope(relay: Any, smtp_sink: Any
                                                                ) -> None:
    sink = await smtp_sink(rcpt_replies={"stuck@example.net": "451 4.4.1 Try later"})
    r = await relay(make_config(smarthost(sink), queue={**SLOW_RETRY, "maxLifetime": 1.0}))
    loads = count_loads(r)
    msg = await r.send(["stuck@example.net"])
    qid = msg.queue_id
    del msg
    # The retry falls at the end of the lifetime; that attempt reads the envelope again.
    await r.wait(lambda: r.queue.message(qid) is None if qid in loads else False, 15)
    await sink.wait_for(lambda: len(dsns(sink)) == 1)
    assert loads[0] == qid
    assert r.count("expired") == 1
    assert "Status: 5.4.1" in list(dsns(sink)[0].iter_parts())[1].as_string()
    assert f"{qid}.msg" not in r.spooled()


async def test_a_transient_read_error_retries_and_sets_nothing_aside(
        relay: Any, smtp_sink: Any) -> None:
    sink = await smtp_sink(rcpt_replies={"later@example.net": "451 4.2.0 Try again later"})
    r = await relay(make_config(smarthost(sink), queue={**SLOW_RETRY, "retryInitial": 0.2}))
    qid = (await r.send(["later@example.net"])).queue_id
    await deferred(r, 1)
    assert not in_memory(r, qid)
    real, failures = r.spool._read_envelope, []

    def flaky(queue_id: str, **options: bool) -> QueuedMessage:
        if not failures:
            failures.append(queue_id)
            raise OSError(errno.EMFILE, "Too many open files")
        return real(queue_id, **options)

    r.spool._read_envelope = flaky  # type: ignore[method-assign]
    sink.behaviour.rcpt_replies.clear()
    make_due(r, qid)
    await r.wait(lambda: r.queue.queued == 0)
    assert failures == [qid]
    assert [m.rcpt_tos for m in sink.messages] == [["later@example.net"]]
    assert not (r.directory / "spool" / "corrupt").exists()


async def test_beyond_the_kept_envelopes_a_fresh_message_is_read_when_due(
        relay: Any, smtp_sink: Any, monkeypatch: Any) -> None:
    # As when a backlog is worked off while mail keeps coming: no more envelopes are kept.
    monkeypatch.setattr(queue_module, "MAX_KEPT", 0)
    sink = await smtp_sink()
    r = await relay(make_config(smarthost(sink), queue=SLOW_RETRY))
    loads = count_loads(r)
    msg = await r.send(["a@example.net"])
    qid = msg.queue_id
    assert qid not in r.queue._kept
    del msg
    await r.wait(lambda: r.queue.queued == 0)
    assert loads == [qid]  # read from the spool for its first attempt
    assert [m.rcpt_tos for m in sink.messages] == [["a@example.net"]]


async def test_the_oldest_message_gauge_follows_removals_and_stays_compact(
        relay: Any, smtp_sink: Any) -> None:
    sink = await smtp_sink(rcpt_replies={"old@example.net": "451 4.2.0 Try again later"})
    r = await relay(make_config(smarthost(sink), queue=SLOW_RETRY))
    old = (await r.send(["old@example.net"])).queue_id
    await deferred(r, 1)
    for i in range(1200):  # delivered behind the deferred one
        await r.send([f"u{i}@example.net"])
    await r.wait(lambda: r.queue.queued == 1, 60)
    r.queue.update_gauges()
    age = r.metrics.registry.get_sample_value("mailplane_relay_queue_oldest_message_age_seconds")
    assert age is not None and age > 0
    assert len(r.queue._by_age) <= 1000 + 2  # rebuilt, not 1,201 ids
    await r.spool.remove(old)
    r.queue.forget(old)
    assert r.metrics.registry.get_sample_value(
        "mailplane_relay_queue_oldest_message_age_seconds") == 0
