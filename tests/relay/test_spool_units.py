"""The spool's API called directly on a temporary directory: real files, real fsyncs, and where
the order of the system calls is the promise (data synced before its name is renamed into place,
the directory synced after the renames) a journal of those calls. Fast, so mutation testing can
run it for every mutant of ``spool.py``; the slower end-to-end spool tests live beside it."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailplane_relay import spool as spool_module
from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.spool import (
    HELD,
    LOOP_WRITE_LIMIT,
    Due,
    QueuedMessage,
    Recipient,
    Spool,
    SpoolError,
    adopt,
    count_messages,
    encode_queue_id,
    new_queue_id,
    queue_id_number,
    valid_queue_id,
)

DATA = b"Subject: units\r\n\r\nbody of the message\r\n"


@pytest.fixture
def tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory in memory (tmpfs) where the machine has one: the fsyncs are real system
    calls, but return at once, so each test takes milliseconds (mutation testing runs them
    for every mutant). What a disk makes of them is the crash tests' part."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path_factory.mktemp("spool")
        return
    directory = Path(tempfile.mkdtemp(prefix="spool-units-", dir=shm))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def make(directory: Path, *, fsync: bool = True, **kwargs: Any) -> Spool:
    return Spool(str(directory), fsync=fsync, metrics=RelayMetrics.create(), **kwargs)


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = make(tmp_path / "spool")
    assert await s.start() == []
    assert (s.file_fsyncs, s.dir_fsyncs) == (0, 1)  # recovery's deletions made durable
    yield s
    await s.close()


async def commit(s: Spool, data: bytes = DATA, rcpts: tuple[str, ...] = ("a@example.net",),
                 **kwargs: Any) -> QueuedMessage:
    return await s.commit(mail_from=kwargs.pop("mail_from", "app@example.com"),
                          recipients=list(rcpts), data=data, message_id="<m@example.com>",
                          credential="app", sender_domain="example.com",
                          listener="submission", **kwargs)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def tree_bytes(directory: Path) -> bytes:
    """Every name and byte under ``directory``."""
    out = []
    for p in sorted(directory.rglob("*")):
        out.append(str(p).encode())
        if p.is_file():
            out.append(p.read_bytes())
    return b"\n".join(out)


def write_message(directory: Path, msg: QueuedMessage, data: bytes = DATA) -> Path:
    """A message file as a commit of the previous version (format 1, no checksum) left it."""
    envelope = msg.to_json()
    path = directory / f"{msg.queue_id}.msg"
    path.write_bytes(b"MPS1 %d\n%s%s" % (len(envelope), envelope, data))
    return path


def envelope_of(qid: str | None = None, *, rcpts: tuple[str, ...] = ("a@example.net",),
                size: int = len(DATA), **kwargs: Any) -> QueuedMessage:
    return QueuedMessage(
        queue_id=qid or new_queue_id(), mail_from=kwargs.pop("mail_from", "app@example.com"),
        recipients=[Recipient(a) for a in rcpts], received_at=1.0, size=size,
        message_id=None, credential="app", sender_domain="example.com",
        listener="submission", next_attempt=kwargs.pop("next_attempt", 5.0), **kwargs)


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class Journal:
    """The spool's fdatasync, fsync and rename calls, in order, each still done for real;
    ``fail`` makes the calls it returns True for raise an I/O error instead."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail: Callable[[str, str], bool] = lambda op, path: False
        real_fdatasync, real_fsync, real_rename = os.fdatasync, os.fsync, os.rename

        def fdatasync(fd: int) -> None:
            self._call("fdatasync", fd_path(fd))
            real_fdatasync(fd)

        def fsync(fd: int) -> None:
            self._call("fsync", fd_path(fd))
            real_fsync(fd)

        def rename(src: Any, dst: Any) -> None:
            self._call("rename", f"{os.fspath(src)} -> {os.fspath(dst)}")
            real_rename(src, dst)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)

    def _call(self, op: str, path: str) -> None:
        self.calls.append((op, path))
        if self.fail(op, path):
            raise OSError(5, "Input/output error")

    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]


@pytest.fixture
def journal(monkeypatch: pytest.MonkeyPatch) -> Journal:
    return Journal(monkeypatch)


# ------------------------------------------------------------------ commit


async def test_commit_syncs_the_data_then_renames_then_syncs_the_directory(
        spool: Spool, journal: Journal) -> None:
    msg = await commit(spool, rcpts=("a@example.net", "b@example.net"))
    final = f"{spool.directory}/{msg.queue_id}.msg"
    tmp = f"{spool.directory}/.tmp-{msg.queue_id}.msg"
    assert journal.calls == [("fdatasync", tmp), ("rename", f"{tmp} -> {final}"),
                             ("fsync", str(spool.directory))]
    assert (spool.file_fsyncs, spool.dir_fsyncs) == (1, 2)
    raw = Path(final).read_bytes()
    header, rest = raw.split(b"\n", 1)
    assert header == b"MPS2 %d %d" % (len(msg.to_json()), zlib.crc32(DATA))
    assert json.loads(rest[: len(msg.to_json())]) == json.loads(msg.to_json())
    assert rest[len(msg.to_json()):] == DATA
    assert os.stat(final).st_mode & 0o777 == 0o600
    assert names(spool.directory) == [f"{msg.queue_id}.msg"]
    assert spool.read(msg.queue_id) == DATA
    assert spool.queue_ids() == [msg.queue_id]
    assert spool.load(msg.queue_id) is msg
    assert spool.metrics.registry.get_sample_value(
        "mailplane_relay_spool_commit_seconds_count") == 1.0


async def test_a_committed_envelope_holds_what_the_sender_gave(spool: Spool) -> None:
    before = time.time()
    msg = await commit(spool, rcpts=("a@example.net", "b@example.net"),
                       extra={"smtputf8": True},
                       dsn=[(("SUCCESS", "FAILURE"), "rfc822;orig@example.net"), (None, None)])
    after = time.time()
    assert valid_queue_id(msg.queue_id)
    assert msg.mail_from == "app@example.com"
    assert [r.address for r in msg.recipients] == ["a@example.net", "b@example.net"]
    assert [r.status for r in msg.recipients] == ["pending", "pending"]
    assert msg.recipients[0].notify == ["SUCCESS", "FAILURE"]
    assert msg.recipients[0].orcpt == "rfc822;orig@example.net"
    assert msg.recipients[1].notify is None and msg.recipients[1].orcpt is None
    assert msg.size == len(DATA)
    assert (msg.message_id, msg.credential, msg.sender_domain, msg.listener) == (
        "<m@example.com>", "app", "example.com", "submission")
    assert before <= msg.received_at <= after
    assert msg.next_attempt == msg.received_at
    assert msg.attempts == 0
    assert msg.extra == {"smtputf8": True}
    on_disk = spool.envelope(msg.queue_id)
    assert on_disk is msg
    del on_disk
    gc.collect()
    fresh = make(spool.directory, fsync=False)
    try:
        [recovered] = await fresh.start()
    finally:
        await fresh.close()
    assert recovered.to_json() == msg.to_json()


async def test_the_extra_given_to_commit_is_copied(spool: Spool) -> None:
    extra: dict[str, Any] = {"body": "8BITMIME"}
    msg = await commit(spool, extra=extra)
    msg.extra["held"] = True
    assert extra == {"body": "8BITMIME"}
    plain = await commit(spool)
    assert plain.extra == {}


async def test_a_dsn_list_must_name_every_recipient(spool: Spool) -> None:
    with pytest.raises(ValueError):
        await commit(spool, rcpts=("a@example.net", "b@example.net"), dsn=[(None, None)])


async def test_a_batch_syncs_every_file_before_any_rename_and_the_directory_once(
        spool: Spool, journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    hinted: list[str] = []
    real = spool_module._START_WRITEBACK
    assert real is not None  # Linux

    def writeback(fd: int) -> None:
        hinted.append(fd_path(fd))
        journal.calls.append(("writeback", fd_path(fd)))
        real(fd)

    monkeypatch.setattr(spool_module, "_START_WRITEBACK", writeback)
    first = asyncio.ensure_future(commit(spool))
    await asyncio.sleep(0)  # the first commit's batch is being synced...
    rest = [asyncio.ensure_future(commit(spool)) for _ in range(4)]  # ...these wait together
    msgs = await asyncio.gather(first, *rest)
    assert len({m.queue_id for m in msgs}) == 5
    ops = journal.ops()
    # The lone first commit: no write-back hint; then one batch of four: write-back of each
    # started, then each file's data synced before its name is renamed into place, then the
    # directory synced once.
    assert ops == ["fdatasync", "rename", "fsync"] + ["writeback"] * 4 + [
        "fdatasync", "rename"] * 4 + ["fsync"]
    synced = [path for op, path in journal.calls[3:] if op == "fdatasync"]
    renamed = [path.split(" -> ")[0] for op, path in journal.calls[3:] if op == "rename"]
    assert sorted(hinted) == sorted(synced) and synced == renamed
    assert (spool.file_fsyncs, spool.dir_fsyncs) == (5, 3)
    assert sorted(names(spool.directory)) == sorted(f"{m.queue_id}.msg" for m in msgs)


def test_the_writeback_hint_accepts_a_real_file(tmp_path: Path) -> None:
    start = spool_module._load_sync_file_range()
    assert start is not None
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 100_000)
        start(fd)
    finally:
        os.close(fd)


async def test_a_failed_fdatasync_fails_the_commit_and_leaves_no_file(
        spool: Spool, journal: Journal) -> None:
    journal.fail = lambda op, path: op == "fdatasync"
    with pytest.raises(SpoolError, match="spool write failed: Input/output error"):
        await commit(spool)
    assert names(spool.directory) == []
    assert spool.queue_ids() == []
    assert spool.dir_fsyncs == 1


async def test_a_failed_fdatasync_in_a_batch_fails_that_commit_only(
        spool: Spool, journal: Journal) -> None:
    doomed: list[str] = []

    def fail(op: str, path: str) -> bool:
        if op == "fdatasync" and not doomed and "/.tmp-" in path:
            doomed.append(path)
            return True
        return False

    journal.fail = fail
    results = await asyncio.gather(*(commit(spool) for _ in range(3)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    good = [r for r in results if isinstance(r, QueuedMessage)]
    assert len(errors) == 1 and isinstance(errors[0], SpoolError)
    assert "Input/output error" in str(errors[0])
    assert sorted(names(spool.directory)) == sorted(f"{m.queue_id}.msg" for m in good)
    assert spool.queue_ids() == sorted(m.queue_id for m in good)
    assert spool.file_fsyncs == 3


async def test_a_failed_rename_fails_the_commit_and_leaves_no_file(
        spool: Spool, journal: Journal) -> None:
    journal.fail = lambda op, path: op == "rename"
    with pytest.raises(SpoolError, match="spool write failed: Input/output error"):
        await commit(spool)
    assert names(spool.directory) == []
    assert spool.dir_fsyncs == 1  # nothing was renamed: no directory sync after recovery's


async def test_a_failed_directory_sync_fails_the_batch_and_deletes_its_messages(
        spool: Spool, journal: Journal) -> None:
    journal.fail = lambda op, path: op == "fsync" and path == str(spool.directory)
    with pytest.raises(SpoolError, match="spool directory sync failed: Input/output error"):
        await commit(spool)
    assert names(spool.directory) == []
    assert spool.queue_ids() == []


async def test_without_fsync_a_commit_syncs_nothing(tmp_path: Path, journal: Journal) -> None:
    s = make(tmp_path, fsync=False)
    await s.start()
    try:
        msg = await commit(s)
        await s.save_state(msg, durable=True)
        await s.remove(msg.queue_id)
        assert [op for op in journal.ops() if op != "rename"] == []
        assert (s.file_fsyncs, s.dir_fsyncs) == (0, 0)
    finally:
        await s.close()


async def test_without_fsync_a_failed_rename_is_a_spool_error(
        tmp_path: Path, journal: Journal) -> None:
    s = make(tmp_path, fsync=False)
    await s.start()
    try:
        journal.fail = lambda op, path: op == "rename"
        with pytest.raises(SpoolError, match="spool write failed"):
            await commit(s)
        assert names(tmp_path) == []
    finally:
        await s.close()


async def test_a_large_message_is_durable_too(spool: Spool, journal: Journal) -> None:
    data = b"Subject: big\r\n\r\n" + b"x" * (LOOP_WRITE_LIMIT + 1)
    msg = await commit(spool, data)
    assert journal.ops() == ["fdatasync", "rename", "fsync"]
    assert spool.read(msg.queue_id) == data


async def test_commit_and_handoff_before_start_are_spool_errors(tmp_path: Path) -> None:
    s = make(tmp_path)
    with pytest.raises(SpoolError, match="not started"):
        await commit(s)
    with pytest.raises(SpoolError, match="not started"):
        await s.commit_handoff(envelope_of(), DATA)
    with pytest.raises(SpoolError, match="not started"):
        await s.erase_address("a@example.net")


async def test_a_handed_over_message_keeps_its_envelope_under_a_new_id(spool: Spool) -> None:
    given = envelope_of(rcpts=("a@example.net", "b@example.net"), attempts=3,
                        extra={"envid": "E1"})
    given.recipients[0].status = "delivered"
    given.recipients[0].attempts = 2
    given.recipients[0].last_response = "250 ok"
    given.recipients[0].dsn_owed = True
    before = time.time()
    msg = await spool.commit_handoff(given, DATA)
    assert msg.queue_id != given.queue_id and valid_queue_id(msg.queue_id)
    assert [(r.address, r.status, r.attempts, r.last_response, r.dsn_owed)
            for r in msg.recipients] == [("a@example.net", "delivered", 2, "250 ok", True),
                                         ("b@example.net", "pending", 0, None, False)]
    assert msg.recipients[0] is not given.recipients[0]
    assert (msg.mail_from, msg.received_at, msg.attempts, msg.credential) == (
        "app@example.com", 1.0, 3, "app")
    assert (msg.sender_domain, msg.listener, msg.message_id) == (
        "example.com", "submission", None)
    assert msg.size == len(DATA)
    assert msg.next_attempt >= before
    assert msg.extra == {"envid": "E1"} and msg.extra is not given.extra
    assert spool.read(msg.queue_id) == DATA
    assert spool.load(msg.queue_id) is msg


async def test_queue_ids_of_one_spool_increase_within_a_millisecond(spool: Spool) -> None:
    msgs = [await commit(spool) for _ in range(5)]
    ids = [m.queue_id for m in msgs]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert spool.queue_ids() == ids


def test_a_queue_id_is_the_clock_and_random_bits_in_crockford_base32() -> None:
    before = time.time_ns() // 1_000_000
    qid = new_queue_id()
    after = time.time_ns() // 1_000_000
    assert valid_queue_id(qid)
    assert before <= queue_id_number(qid) >> 50 <= after
    future = queue_id_number(qid) + (1000 << 50)  # an id issued a second ahead of this clock
    assert queue_id_number(new_queue_id(after=future)) == future + 1
    assert new_queue_id(after=future) > qid
    assert queue_id_number("0" * 19 + "Z") == 31
    assert queue_id_number("0" * 18 + "10") == 32
    assert not valid_queue_id(qid[:-1])
    assert not valid_queue_id(qid + "0")
    assert not valid_queue_id(qid[:-1] + "U")  # not a Crockford digit
    assert not valid_queue_id(qid[:-1] + "a")


def test_queue_id_digits_are_crockford_base32_of_the_number() -> None:
    assert encode_queue_id(0) == "0" * 20
    assert encode_queue_id(31) == "0" * 19 + "Z"
    assert encode_queue_id(32) == "0" * 18 + "10"
    assert encode_queue_id(2**100 - 1) == "Z" * 20
    rng = random.Random(7)
    for _ in range(2000):
        n = rng.getrandbits(100)
        qid = encode_queue_id(n)
        assert valid_queue_id(qid) and queue_id_number(qid) == n
        # Digit by digit, most significant first.
        assert qid == "".join("0123456789ABCDEFGHJKMNPQRSTVWXYZ"[(n >> (5 * i)) & 31]
                              for i in reversed(range(20)))


# ------------------------------------------------------------------ envelopes


def test_an_envelope_round_trips_and_leaves_defaults_out() -> None:
    msg = envelope_of(rcpts=("a@example.net", "b@example.net"), extra={"k": [1]})
    msg.recipients[0] = Recipient("a@example.net", "bounced", 2, "550 no", True,
                                  ["FAILURE"], "rfc822;x@example.net")
    doc = json.loads(msg.to_json())
    assert doc["recipients"][1] == {"address": "b@example.net", "status": "pending",
                                    "attempts": 0, "last_response": None}
    assert doc["recipients"][0]["dsn_owed"] is True
    assert b", " not in msg.to_json() and b": " not in msg.to_json()  # compact
    again = QueuedMessage.from_json(msg.to_json())
    assert again == msg


@pytest.mark.parametrize("raw, problem", [
    (b"[]", "^envelope is not an object$"),
    (json.dumps({"recipients": [{"address": "a@x", "status": "lost"}]}).encode(),
     "^unknown recipient status 'lost'$"),
])
def test_an_envelope_that_is_not_one_is_refused(raw: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        QueuedMessage.from_json(raw)


def test_values_many_envelopes_share_are_kept_once_in_memory() -> None:
    # A large queue holds many envelopes of the same sender, domain and listener: each of
    # these values is one string object, not one per envelope.
    raw = envelope_of().to_json()
    first, second = QueuedMessage.from_json(raw), QueuedMessage.from_json(raw)
    for name in ("sender_domain", "listener", "credential", "mail_from"):
        assert isinstance(getattr(first, name), str), name
        assert getattr(first, name) is getattr(second, name), name


def test_what_a_recipient_wants_reported() -> None:
    plain = Recipient("a@example.net")
    assert not plain.wants("SUCCESS")
    assert plain.wants("FAILURE") and plain.wants("DELAY")
    only = Recipient("a@example.net", notify=["SUCCESS"])
    assert only.wants("SUCCESS") and not only.wants("FAILURE")
    never = Recipient("a@example.net", notify=["NEVER"])
    assert not never.wants("FAILURE")


def test_a_message_needs_work_while_a_recipient_is_pending_or_owed_a_dsn() -> None:
    msg = envelope_of(rcpts=("a@example.net", "b@example.net"))
    assert msg.needs_work() and len(msg.pending()) == 2
    msg.recipients[0].status = "delivered"
    assert msg.pending() == [msg.recipients[1]]
    msg.recipients[1].status = "bounced"
    assert not msg.needs_work() and msg.pending() == []
    msg.recipients[1].dsn_owed = True
    assert msg.needs_work()


# ------------------------------------------------------------------ recovery


async def test_recovery_keeps_messages_that_need_work_and_clears_the_rest(
        tmp_path: Path, journal: Journal, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "spool"
    d.mkdir()
    old = envelope_of("0" * 19 + "1", next_attempt=7.0)
    new = envelope_of("0" * 19 + "2")
    owed = envelope_of("0" * 19 + "3")
    owed.recipients[0].status, owed.recipients[0].dsn_owed = "bounced", True
    done = envelope_of("0" * 19 + "4")
    done.recipients[0].status = "delivered"
    for m in (new, old, owed, done):
        write_message(d, m)
    (d / f"{done.queue_id}.state").write_bytes(done.to_json())
    (d / ".tmp-whatever.msg").write_bytes(b"half a message")
    (d / f"{'0' * 19}9.state").write_bytes(b"orphan")  # its message is gone
    (d / "notes.msg").write_bytes(b"not ours")  # not a queue id: left alone
    (d / "free").mkdir()
    (d / "free" / "0").write_bytes(bytes(100))
    s = make(d)
    try:
        recovered = await s.start()
        assert [m.queue_id for m in recovered] == [old.queue_id, new.queue_id, owed.queue_id]
        assert recovered[0].next_attempt == 7.0
        assert s.queue_ids() == [old.queue_id, new.queue_id, owed.queue_id]
        assert names(d) == sorted([f"{old.queue_id}.msg", f"{new.queue_id}.msg",
                                   f"{owed.queue_id}.msg", "notes.msg"])
        assert list((d / "free").iterdir()) == []
        assert s.load(old.queue_id) is recovered[0]  # the recovered objects are the cache
        assert ("fsync", str(d)) in journal.calls  # the deletions are made durable
        assert "not a valid message" not in caplog.text
    finally:
        await s.close()
    assert s._dir_fd is None


async def test_recovery_prefers_the_state_file(tmp_path: Path) -> None:
    msg = envelope_of(rcpts=("a@example.net", "b@example.net"))
    write_message(tmp_path, msg)
    msg.recipients[0].status = "delivered"
    msg.attempts = 4
    (tmp_path / f"{msg.queue_id}.state").write_bytes(msg.to_json())
    s = make(tmp_path)
    try:
        [got] = await s.start()
        assert got.recipients[0].status == "delivered" and got.attempts == 4
        # ... and a later save rewrites it, a later remove deletes it.
        await s.save_state(got)
        await s.remove(got.queue_id)
        assert names(tmp_path) == []
    finally:
        await s.close()


@pytest.mark.parametrize("state", [b"{torn", b"[]", "other"])
async def test_a_state_file_of_another_content_is_deleted_at_recovery(
        tmp_path: Path, state: bytes | str, caplog: pytest.LogCaptureFixture) -> None:
    msg = envelope_of()
    write_message(tmp_path, msg)
    content = envelope_of().to_json() if state == "other" else state
    assert isinstance(content, bytes)
    (tmp_path / f"{msg.queue_id}.state").write_bytes(content)
    s = make(tmp_path)
    try:
        [got] = await s.start()
        assert got.to_json() == msg.to_json()
        assert names(tmp_path) == [f"{msg.queue_id}.msg"]
        assert f"state file of {msg.queue_id} is not this message's state" in caplog.text
        await s.save_state(got)  # the spool knows the file is gone, and writes a new one
        assert names(tmp_path) == [f"{msg.queue_id}.msg", f"{msg.queue_id}.state"]
    finally:
        await s.close()


async def test_an_unreadable_state_file_at_recovery_gives_the_committed_envelope(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    msg = envelope_of()
    write_message(tmp_path, msg)
    (tmp_path / f"{msg.queue_id}.state").mkdir()  # opening it fails with an OSError
    s = make(tmp_path)
    try:
        [got] = await s.start()
        assert got.to_json() == msg.to_json()
        assert f"state file of {msg.queue_id} unreadable" in caplog.text
        assert (tmp_path / f"{msg.queue_id}.state").is_dir()  # left for the next read
    finally:
        await s.close()


@pytest.mark.parametrize("problem", ["garbage", "wrong id", "wrong size", "no newline",
                                     "truncated", "bad status"])
async def test_an_unreadable_message_file_is_set_aside_with_its_state_file(
        tmp_path: Path, problem: str, caplog: pytest.LogCaptureFixture) -> None:
    qid = new_queue_id()
    msg = envelope_of(qid)
    path = tmp_path / f"{qid}.msg"
    envelope = msg.to_json()
    if problem == "garbage":
        path.write_bytes(b"GIF89a" + bytes(range(1, 40)))
    elif problem == "wrong id":
        write_message(tmp_path, envelope_of())
        os.rename(next(tmp_path.glob("*.msg")), path)
    elif problem == "wrong size":
        write_message(tmp_path, msg, DATA + b"more")
    elif problem == "no newline":
        path.write_bytes(b"MPS1 " + b"9" * 70)
    elif problem == "truncated":
        path.write_bytes(b"MPS1 %d\n%s" % (len(envelope), envelope[:-1]))
    else:
        path.write_bytes(b"MPS1 %d\n%s" % (len(envelope), envelope.replace(
            b'"pending"', b'"lost"')))
    (tmp_path / f"{qid}.state").write_bytes(envelope)
    s = make(tmp_path)
    try:
        assert await s.start() == []
        assert names(tmp_path) == []
        assert names(tmp_path / "corrupt") == sorted([f"{qid}.msg", f"{qid}.state"])
        for p in (tmp_path / "corrupt").iterdir():  # the retention starts now
            assert p.stat().st_mtime > time.time() - 60
        assert f"{qid}.msg is not a valid message file" in caplog.text
        assert s.metrics.registry.get_sample_value("mailplane_relay_spool_corrupt_files") == 2.0
        assert s.queue_ids() == []
        assert s.load(qid) is None
    finally:
        await s.close()


async def test_quarantine_moves_each_file_and_names_it_and_where_it_went(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first, second = new_queue_id(), new_queue_id()
    for qid in (first, second):
        (tmp_path / f"{qid}.msg").write_bytes(b"GIF89a" + bytes(range(1, 40)))
    s = make(tmp_path)
    try:
        assert await s.start() == []
    finally:
        await s.close()
    assert names(tmp_path / "corrupt") == sorted([f"{first}.msg", f"{second}.msg"])
    for qid in (first, second):
        assert (f"spool: {qid}.msg is not a valid message file (ValueError); moved to corrupt/"
                in caplog.messages)


async def test_a_message_file_cut_during_its_zero_fill_is_deleted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    qid = new_queue_id()
    (tmp_path / f"{qid}.msg").write_bytes(bytes(16) + b"\0\0end of a delivered message")
    short = new_queue_id()
    (tmp_path / f"{short}.msg").write_bytes(bytes(15))  # too short to tell: set aside
    s = make(tmp_path)
    try:
        assert await s.start() == []
        assert names(tmp_path) == []
        assert names(tmp_path / "corrupt") == [f"{short}.msg"]
        assert f"{qid}.msg was being deleted when the relay stopped; deleted" in caplog.text
    finally:
        await s.close()


async def test_a_large_envelope_is_read_through_the_file(tmp_path: Path) -> None:
    rcpts = tuple(f"recipient-{i:04}@example.net" for i in range(400))
    msg = envelope_of(rcpts=rcpts)
    assert len(msg.to_json()) > 8192
    write_message(tmp_path, msg)
    s = make(tmp_path)
    try:
        [got] = await s.start()
        assert [r.address for r in got.recipients] == list(rcpts)
        assert s.read(got.queue_id) == DATA
    finally:
        await s.close()


async def test_a_file_named_free_is_replaced_by_the_directory(tmp_path: Path) -> None:
    (tmp_path / "free").write_bytes(b"something")
    s = make(tmp_path)
    try:
        await s.start()
        assert (tmp_path / "free").is_dir()
        msg = await commit(s)
        await s.remove(msg.queue_id)
        assert len(list((tmp_path / "free").iterdir())) == 1
    finally:
        await s.close()


async def test_a_spool_that_cannot_be_created_is_a_spool_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    s = make(tmp_path / "file" / "spool")
    with pytest.raises(SpoolError, match="cannot open"):
        await s.start()
    await s.close()


async def test_lazy_recovery_yields_batches_of_due_messages(tmp_path: Path) -> None:
    d = tmp_path
    msgs = [envelope_of(f"{'0' * 19}{i}", next_attempt=float(i)) for i in range(1, 6)]
    msgs[1].extra[HELD] = True
    msgs[2].recipients[0].status = "delivered"  # final: deleted
    for m in msgs:
        write_message(d, m)
    bad = new_queue_id()
    (d / f"{bad}.msg").write_bytes(b"not a spool file at all")
    (d / f"{bad}.state").write_bytes(b"{}")
    orphan = f"{'1' * 20}.state"
    (d / orphan).write_bytes(b"{}")
    s = make(d)
    try:
        assert await s.start(lazy=True) == []
        fresh = await commit(s)  # commits work during recovery
        batches = [b async for b in s.recover(batch=2)]
        assert batches == [[Due(msgs[0].queue_id, 1.0, False), Due(msgs[1].queue_id, 2.0, True)],
                           [Due(msgs[3].queue_id, 4.0, False)],
                           [Due(msgs[4].queue_id, 5.0, False)]]
        assert s.queue_ids() == sorted([msgs[0].queue_id, msgs[1].queue_id, msgs[3].queue_id,
                                        msgs[4].queue_id, fresh.queue_id])
        assert orphan not in names(d) and f"{msgs[2].queue_id}.msg" not in names(d)
        assert names(d / "corrupt") == [f"{bad}.msg", f"{bad}.state"]
        assert s.load(bad) is None
        # Recovery is over: erasure may run.
        report = await s.erase_address("nobody@example.org")
        assert report.messages_deleted == 0
    finally:
        await s.close()


async def test_erasure_waits_for_lazy_recovery(tmp_path: Path) -> None:
    msg = envelope_of(rcpts=("gone@example.net",))
    write_message(tmp_path, msg)
    s = make(tmp_path)
    try:
        await s.start(lazy=True)
        erasure = asyncio.ensure_future(s.erase_address("gone@example.net"))
        await asyncio.sleep(0)
        assert not erasure.done()
        [batch] = [b async for b in s.recover()]
        assert [d.queue_id for d in batch] == [msg.queue_id]
        report = await erasure
        assert report.deleted_ids == (msg.queue_id,)
    finally:
        await s.close()


async def test_an_unfinished_lazy_recovery_refuses_erasure(tmp_path: Path) -> None:
    for i in range(3):
        write_message(tmp_path, envelope_of(f"{'0' * 19}{i}"))
    s = make(tmp_path)
    try:
        await s.start(lazy=True)
        recovery = s.recover(batch=1)
        assert isinstance(recovery, AsyncGenerator)
        assert len(await recovery.__anext__()) == 1
        await recovery.aclose()  # the relay stopped reading: the rest is unread
        with pytest.raises(SpoolError, match="recovery did not finish"):
            await s.erase_address("a@example.net")
    finally:
        await s.close()


# ------------------------------------------------------------------ reads


async def test_load_reads_a_message_no_one_holds_and_keeps_one_object(
        spool: Spool) -> None:
    msg = await commit(spool, rcpts=("a@example.net", "b@example.net"))
    qid = msg.queue_id
    msg.recipients[0].status = "delivered"
    await spool.save_state(msg)
    del msg
    gc.collect()
    loaded = spool.load(qid)
    assert loaded is not None and loaded.recipients[0].status == "delivered"
    loaded.attempts = 9  # not saved: every holder still sees it
    assert spool.load(qid) is loaded
    assert spool.envelope(qid) is loaded
    assert spool.load(new_queue_id()) is None


async def test_envelope_reads_the_files_without_keeping_the_object(spool: Spool) -> None:
    msg = await commit(spool, rcpts=("a@example.net", "b@example.net"))
    qid = msg.queue_id
    msg.recipients[1].status = "bounced"
    await spool.save_state(msg)
    del msg
    gc.collect()
    first = spool.envelope(qid)
    assert first is not None and first.recipients[1].status == "bounced"
    second = spool.envelope(qid)
    assert second is not None and second is not first
    assert spool.envelope(new_queue_id()) is None


async def test_envelope_of_an_unreadable_message_is_none(spool: Spool) -> None:
    msg = await commit(spool)
    other = await commit(spool)
    qid, oid = msg.queue_id, other.queue_id
    del msg, other
    gc.collect()
    path = spool.directory / f"{qid}.msg"
    path.write_bytes(b"garbage")
    assert spool.envelope(qid) is None
    assert qid in spool.queue_ids()  # envelope() never sets anything aside
    os.rename(spool.directory / f"{oid}.msg", path)  # another message's envelope
    assert spool.envelope(qid) is None
    (spool.directory / f"{oid}.msg").write_bytes(b"x")
    os.unlink(path)
    assert spool.envelope(qid) is None


async def test_load_sets_aside_a_message_file_that_is_not_one(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    msg = await commit(spool)
    await spool.save_state(msg)
    qid = msg.queue_id
    del msg
    gc.collect()
    (spool.directory / f"{qid}.msg").write_bytes(b"MPS1 2\n{}")
    assert spool.load(qid) is None
    assert names(spool.directory) == []
    assert names(spool.directory / "corrupt") == [f"{qid}.msg", f"{qid}.state"]
    assert f"{qid}.msg is not a valid message file (KeyError)" in caplog.text
    assert qid not in spool.queue_ids()
    assert spool.load(qid) is None


async def test_load_of_a_vanished_message_forgets_it_and_its_state(spool: Spool) -> None:
    msg = await commit(spool)
    await spool.save_state(msg)
    qid = msg.queue_id
    del msg
    gc.collect()
    os.unlink(spool.directory / f"{qid}.msg")
    assert spool.load(qid) is None
    assert names(spool.directory) == []  # the state file went too
    assert spool.queue_ids() == []


async def test_load_with_an_unreadable_state_file_is_an_error_not_the_old_envelope(
        spool: Spool) -> None:
    msg = await commit(spool)
    await spool.save_state(msg)
    qid = msg.queue_id
    del msg
    gc.collect()
    state = spool.directory / f"{qid}.state"
    os.unlink(state)
    state.mkdir()
    with pytest.raises(SpoolError, match=f"spool read of {qid} failed"):
        spool.load(qid)
    assert qid in spool.queue_ids()  # nothing set aside for a passing error
    assert not (spool.directory / "corrupt").exists()


async def test_a_message_whose_data_does_not_match_its_checksum_is_never_read(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    msg = await commit(spool, rcpts=("torn@example.net",))
    msg.attempts = 3  # the latest envelope known is the one set aside
    path = spool.directory / f"{msg.queue_id}.msg"
    raw = path.read_bytes()
    path.write_bytes(raw[:-4] + b"XXXX")
    with pytest.raises(SpoolError, match="does not match its checksum"):
        spool.read(msg.queue_id)
    assert names(spool.directory) == []
    torn = spool.directory / "corrupt" / f"{msg.queue_id}.torn"
    assert QueuedMessage.from_json(torn.read_bytes()).attempts == 3
    assert DATA[:10] not in tree_bytes(spool.directory)
    assert spool.queue_ids() == [] and spool.load(msg.queue_id) is None
    assert f"data of {msg.queue_id} does not match its checksum" in caplog.text
    assert spool.metrics.registry.get_sample_value("mailplane_relay_spool_corrupt_files") == 1.0


async def test_a_torn_message_no_one_holds_is_set_aside_by_its_committed_envelope(
        spool: Spool) -> None:
    msg = await commit(spool, rcpts=("torn@example.net",))
    qid = msg.queue_id
    del msg
    gc.collect()
    path = spool.directory / f"{qid}.msg"
    path.write_bytes(path.read_bytes()[:-4] + b"XXXX")
    with pytest.raises(SpoolError, match="does not match its checksum"):
        spool.read(qid)
    torn = (spool.directory / "corrupt" / f"{qid}.torn").read_bytes()
    # The envelope as committed (its header line included), for a human to tell the sender.
    assert qid.encode() in torn and b"torn@example.net" in torn
    assert DATA[:10] not in torn


async def test_a_message_of_format_1_is_read_without_a_checksum(tmp_path: Path) -> None:
    msg = envelope_of()
    write_message(tmp_path, msg)
    s = make(tmp_path)
    try:
        [got] = await s.start()
        assert s.read(got.queue_id) == DATA
    finally:
        await s.close()


async def test_read_of_a_missing_or_foreign_file_is_a_spool_error(spool: Spool) -> None:
    with pytest.raises(SpoolError, match="spool read of"):
        spool.read(new_queue_id())
    msg = await commit(spool)
    (spool.directory / f"{msg.queue_id}.msg").write_bytes(b"From: x\r\n")
    with pytest.raises(SpoolError, match="not a spool file"):
        spool.read(msg.queue_id)


async def test_read_reads_on_to_the_end_after_a_short_read(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file system may return fewer bytes than asked (a network file system, a signal):
    # the data is read on to its end, never cut.
    data = DATA + b"x" * 300 + b"\r\n"
    msg = await commit(spool, data)
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: real_read(fd, min(n, 7)))
    assert spool.read(msg.queue_id) == data
    monkeypatch.undo()


# ------------------------------------------------------------------ state updates


async def test_a_state_update_is_not_synced_unless_durable(
        spool: Spool, journal: Journal) -> None:
    msg = await commit(spool)
    journal.calls.clear()
    msg.attempts = 1
    await spool.save_state(msg)
    state = spool.directory / f"{msg.queue_id}.state"
    assert QueuedMessage.from_json(state.read_bytes()).attempts == 1
    assert journal.ops() == ["rename"]
    journal.calls.clear()
    msg.attempts = 2
    await spool.save_state(msg, durable=True)
    tmp = journal.calls[0][1]
    assert journal.calls == [("fsync", tmp), ("rename", f"{tmp} -> {state}"),
                             ("fsync", str(spool.directory))]
    assert QueuedMessage.from_json(state.read_bytes()).attempts == 2
    assert spool.file_fsyncs == 2
    assert names(spool.directory) == [f"{msg.queue_id}.msg", f"{msg.queue_id}.state"]


async def test_a_state_update_of_a_removed_message_writes_nothing(spool: Spool) -> None:
    msg = await commit(spool)
    await spool.remove(msg.queue_id)
    await spool.save_state(msg, durable=True)
    await spool.save_state(msg)
    assert names(spool.directory) == []
    assert spool.load(msg.queue_id) is None


async def test_a_message_removed_while_its_durable_state_is_written_leaves_no_state(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    msg = await commit(spool)
    real_fsync = os.fsync
    removed = asyncio.Event()
    loop = asyncio.get_running_loop()

    def fsync(fd: int) -> None:
        if fd_path(fd).endswith(".state"):
            asyncio.run_coroutine_threadsafe(spool.remove(msg.queue_id), loop).result()
            removed.set()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    await spool.save_state(msg, durable=True)
    assert removed.is_set()
    assert names(spool.directory) == []
    assert b"app@example.com" not in tree_bytes(spool.directory)


async def test_an_older_state_write_finishing_last_is_dropped(spool: Spool) -> None:
    msg = await commit(spool)
    qid = msg.queue_id
    msg.attempts = 2
    spool._write_state(qid, msg.to_json(), 7, False)
    msg.attempts = 1
    spool._write_state(qid, msg.to_json(), 3, False)  # taken earlier, done later
    state = spool.directory / f"{qid}.state"
    assert QueuedMessage.from_json(state.read_bytes()).attempts == 2
    assert names(spool.directory) == [f"{qid}.msg", f"{qid}.state"]
    spool._write_state(qid, msg.to_json(), 7, False)  # the same version again is written
    assert QueuedMessage.from_json(state.read_bytes()).attempts == 1


async def test_a_failed_state_update_keeps_the_envelope_until_one_succeeds(
        spool: Spool, journal: Journal) -> None:
    msg = await commit(spool)
    qid = msg.queue_id
    msg.attempts = 5
    journal.fail = lambda op, path: op == "rename" and path.endswith(".state")
    with pytest.raises(SpoolError, match=f"spool state update of {qid} failed"):
        await spool.save_state(msg)
    assert [p.name for p in spool.directory.iterdir() if p.is_file()] == [f"{qid}.msg"]
    del msg
    gc.collect()
    pinned = spool.load(qid)
    assert pinned is not None and pinned.attempts == 5  # not the committed envelope
    journal.fail = lambda op, path: False
    await spool.save_state(pinned)
    del pinned
    gc.collect()
    again = spool.load(qid)
    assert again is not None and again.attempts == 5  # read back from the state file
    assert qid not in spool._pinned
    await spool.remove(qid)
    assert qid not in spool._pinned


# ------------------------------------------------------------------ removal and reuse


async def test_removal_renames_the_message_file_first_and_leaves_no_byte_of_it(
        spool: Spool, journal: Journal) -> None:
    marker = b"c0ffee-unique-marker"
    msg = await commit(spool, DATA + marker, rcpts=("m@example.net",))
    await spool.save_state(msg)
    journal.calls.clear()
    await spool.remove(msg.queue_id)
    renames = [path for op, path in journal.calls if op == "rename"]
    assert [r.split(" -> ")[0].rsplit("/", 1)[1] for r in renames] == [
        f"{msg.queue_id}.msg", f"{msg.queue_id}.state"]
    assert all(" -> " + str(spool.directory / "free") + "/" in r for r in renames)
    assert names(spool.directory) == []
    tree = tree_bytes(spool.directory)
    assert marker not in tree and b"m@example.net" not in tree
    free = sorted((spool.directory / "free").iterdir())
    assert len(free) == 2 and all(set(p.read_bytes()) == {0} for p in free)
    assert spool.queue_ids() == [] and spool.load(msg.queue_id) is None
    await spool.remove(msg.queue_id)  # twice is harmless


async def test_a_commit_reuses_a_scrubbed_file_of_any_size(spool: Spool) -> None:
    big = await commit(spool, DATA * 50)
    await spool.remove(big.queue_id)
    assert spool.recycled == 0
    small = await commit(spool)
    assert spool.recycled == 1
    assert spool.read(small.queue_id) == DATA  # truncated to its own size
    assert list((spool.directory / "free").iterdir()) == []
    await spool.remove(small.queue_id)
    larger = await commit(spool, DATA * 3)
    assert spool.recycled == 2
    assert spool.read(larger.queue_id) == DATA * 3
    await spool.save_state(larger)  # a state write reuses nothing now: none is free
    assert spool.recycled == 2
    reloaded = make(spool.directory, fsync=False)
    try:
        [got] = await reloaded.start()
        assert got.queue_id == larger.queue_id
    finally:
        await reloaded.close()


async def test_a_large_removed_file_is_unlinked_not_kept(spool: Spool) -> None:
    msg = await commit(spool, b"x" * (LOOP_WRITE_LIMIT + 1))
    await spool.remove(msg.queue_id)
    assert list((spool.directory / "free").iterdir()) == []
    assert names(spool.directory) == []
    edge = await commit(spool, b"x" * (LOOP_WRITE_LIMIT - 2000))
    await spool.remove(edge.queue_id)
    assert len(list((spool.directory / "free").iterdir())) == 1


async def test_at_most_max_free_scrubbed_files_wait(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "_MAX_FREE", 2)
    msgs = [await commit(spool) for _ in range(3)]
    for m in msgs:
        await spool.remove(m.queue_id)
    assert len(list((spool.directory / "free").iterdir())) == 2
    assert names(spool.directory) == []


async def test_a_removal_without_the_free_directory_still_deletes(spool: Spool) -> None:
    msg = await commit(spool)
    os.rmdir(spool.directory / "free")
    await spool.remove(msg.queue_id)
    assert names(spool.directory) == []
    again = await commit(spool)
    assert spool.recycled == 0 and spool.read(again.queue_id) == DATA


async def test_a_scrubbed_file_removed_under_the_spool_is_not_reused(spool: Spool) -> None:
    msg = await commit(spool)
    await spool.remove(msg.queue_id)
    for p in (spool.directory / "free").iterdir():
        os.unlink(p)
    again = await commit(spool)
    assert spool.recycled == 0 and spool.read(again.queue_id) == DATA


async def test_a_removal_that_fails_is_a_spool_error(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    msg = await commit(spool)

    def discard(path: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool, "_discard", discard)
    with pytest.raises(SpoolError, match=f"spool remove of {msg.queue_id} failed"):
        await spool.remove(msg.queue_id)


# ------------------------------------------------------------------ erasure


async def test_erasure_deletes_the_senders_messages_and_edits_the_others(
        spool: Spool, journal: Journal) -> None:
    from_gone = await commit(spool, mail_from="Gone@Example.net", rcpts=("x@example.org",))
    to_gone = await commit(spool, rcpts=("GONE@example.NET", "keep@example.org"),
                           dsn=[(None, None), (("FAILURE",), "rfc822;gone@example.net")],
                           extra={"envid": "for gone@example.net",
                                  "tries": {"gone@example.net": 2, "keep@example.org": 1},
                                  "seen": ["gone@example.net", {"Gone@example.net": 1}]})
    only_gone = await commit(spool, rcpts=("gone@example.net",))
    other = await commit(spool, rcpts=("keep@example.org",))
    await spool.save_state(to_gone)
    journal.calls.clear()
    report = await spool.erase_address("gone@example.net")
    assert report.recipients_removed == 2
    assert report.messages_deleted == 2
    assert sorted(report.deleted_ids) == sorted((from_gone.queue_id, only_gone.queue_id))
    assert spool.queue_ids() == sorted([to_gone.queue_id, other.queue_id])
    # Objects in memory are edited in place.
    assert from_gone.recipients == [] and from_gone.mail_from == "" and from_gone.extra == {}
    assert [r.address for r in to_gone.recipients] == ["keep@example.org"]
    assert to_gone.recipients[0].orcpt is None and to_gone.recipients[0].notify == ["FAILURE"]
    assert to_gone.extra == {"tries": {"keep@example.org": 1}, "seen": [{}]}
    assert [r.address for r in other.recipients] == ["keep@example.org"]
    assert b"gone@example.net" not in tree_bytes(spool.directory).lower()
    # The rewritten message keeps its data, and its file is synced before its rename.
    assert spool.read(to_gone.queue_id) == DATA
    [synced] = [i for i, (op, p) in enumerate(journal.calls) if op == "fdatasync"]
    tmp = journal.calls[synced][1]  # a new file, or a scrubbed one reused
    assert journal.calls.index(
        ("rename", f"{tmp} -> {spool.directory}/{to_gone.queue_id}.msg")) > synced
    assert journal.calls[-1] == ("fsync", str(spool.directory))
    fresh = make(spool.directory, fsync=False)
    try:
        recovered = {m.queue_id: m for m in await fresh.start()}
    finally:
        await fresh.close()
    assert recovered[to_gone.queue_id].to_json() == to_gone.to_json()


async def test_erasure_reads_the_files_of_messages_not_in_memory(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    in_state = await commit(spool, rcpts=("keep@example.org",))
    in_state.recipients[0].orcpt = "rfc822;gone@example.net"  # named in its state file only
    await spool.save_state(in_state)
    sent_to = await commit(spool, rcpts=("gone@example.net", "keep@example.org"))
    unrelated = await commit(spool, rcpts=("keep@example.org",))
    broken = await commit(spool, rcpts=("keep@example.org",))
    ids = (in_state.queue_id, sent_to.queue_id, unrelated.queue_id, broken.queue_id)
    del in_state, sent_to, unrelated, broken
    gc.collect()
    (spool.directory / f"{ids[3]}.msg").write_bytes(b"garbage")
    unrelated_bytes = (spool.directory / f"{ids[2]}.msg").read_bytes()
    report = await spool.erase_address("gone@example.net")
    assert report.messages_deleted == 0 and report.recipients_removed == 1
    assert spool.queue_ids() == sorted(ids[:3])
    assert names(spool.directory / "corrupt") == [f"{ids[3]}.msg"]
    assert b"gone@example.net" not in b"".join(
        p.read_bytes() for p in spool.directory.glob(f"{ids[1]}.*"))
    edited = spool.load(ids[0])
    assert edited is not None and edited.recipients[0].orcpt is None
    assert b"gone@example.net" not in b"".join(
        p.read_bytes() for p in spool.directory.glob(f"{ids[0]}.*"))
    assert (spool.directory / f"{ids[2]}.msg").read_bytes() == unrelated_bytes
    assert "(ValueError)" in caplog.text


async def test_erasure_finds_a_non_ascii_address_and_one_named_only_in_a_state(
        spool: Spool) -> None:
    accented = await commit(spool, rcpts=("Jürgen@example.de", "keep@example.org"))
    later = await commit(spool, rcpts=("keep@example.org", "late@example.org"))
    later.recipients[1].status = "bounced"
    later.recipients[1].dsn_owed = True
    later.recipients[0].orcpt = "rfc822;ALIAS@example.org"
    await spool.save_state(later)
    ids = (accented.queue_id, later.queue_id)
    del accented, later
    gc.collect()
    report = await spool.erase_address("jürgen@example.de")
    assert report.recipients_removed == 1
    got = spool.load(ids[0])
    assert got is not None and [r.address for r in got.recipients] == ["keep@example.org"]
    del got
    report = await spool.erase_address("alias@example.org")
    assert report.recipients_removed == 0 and report.messages_deleted == 0
    kept = spool.load(ids[1])
    assert kept is not None and kept.recipients[0].orcpt is None
    assert b"alias@example.org" not in tree_bytes(spool.directory).lower()


async def test_erasure_finds_an_escaped_address_that_casefolds_to_the_ascii_one(
        spool: Spool) -> None:
    # The Kelvin sign casefolds to "k": an envelope naming it is stored escaped (\\u212a), so
    # the quick byte search cannot see it; the escape sends the envelope to the full parse.
    kelvin = "\u212a@example.net"
    in_file = await commit(spool, rcpts=(kelvin, "keep@example.org"))
    in_state = await commit(spool, rcpts=("keep@example.org", "other@example.org"))
    in_state.recipients[1].address = kelvin
    await spool.save_state(in_state)
    ids = (in_file.queue_id, in_state.queue_id)
    del in_file, in_state
    gc.collect()
    report = await spool.erase_address("k@example.net")
    assert report.recipients_removed == 2 and report.messages_deleted == 0
    for qid in ids:
        got = spool.load(qid)
        assert got is not None and [r.address for r in got.recipients] == ["keep@example.org"]


async def test_erasure_of_an_envid_alone_rewrites_the_message(spool: Spool) -> None:
    msg = await commit(spool, rcpts=("keep@example.org",), extra={"envid": "ref gone@x.org"})
    report = await spool.erase_address("GONE@x.org")
    assert (report.recipients_removed, report.messages_deleted) == (0, 0)
    assert msg.extra == {}
    assert b"gone@x.org" not in tree_bytes(spool.directory)


async def test_erasure_of_an_address_named_nowhere_syncs_nothing(
        spool: Spool, journal: Journal) -> None:
    await commit(spool)
    journal.calls.clear()
    report = await spool.erase_address("nobody@example.org")
    assert report == spool_module.SpoolErasure()
    assert journal.calls == []


async def test_erasure_with_a_quote_in_the_address_parses_every_envelope(spool: Spool) -> None:
    msg = await commit(spool, rcpts=('"a b"@example.org', "keep@example.org"))
    qid = msg.queue_id
    del msg
    gc.collect()
    report = await spool.erase_address('"A B"@example.org')
    assert report.recipients_removed == 1
    got = spool.load(qid)
    assert got is not None and [r.address for r in got.recipients] == ["keep@example.org"]


async def test_an_erasure_that_cannot_write_is_a_spool_error(
        spool: Spool, journal: Journal) -> None:
    await commit(spool, rcpts=("gone@example.net", "keep@example.org"))
    journal.fail = lambda op, path: op == "rename"
    with pytest.raises(SpoolError, match="spool erasure failed"):
        await spool.erase_address("gone@example.net")
    assert [p for p in names(spool.directory) if p.startswith(".tmp-")] == []


# ------------------------------------------------------------------ quarantine purge


async def test_the_purge_deletes_quarantined_files_past_the_retention(tmp_path: Path) -> None:
    s = make(tmp_path, corrupt_retention=100.0)
    await s.start()
    try:
        corrupt = tmp_path / "corrupt"
        corrupt.mkdir()
        now = time.time()
        for name, age in (("old.msg", 100.0), ("older.msg", 500.0), ("new.msg", 99.0)):
            (corrupt / name).write_bytes(b"x")
            os.utime(corrupt / name, (now - age, now - age))
        (corrupt / "dir").mkdir()
        os.utime(corrupt / "dir", (now - 500, now - 500))
        assert s._purge_corrupt(now) == 2
        assert sorted(p.name for p in corrupt.iterdir()) == ["dir", "new.msg"]
        registry = s.metrics.registry
        assert registry.get_sample_value("mailplane_relay_spool_corrupt_purged_total") == 2.0
        assert registry.get_sample_value("mailplane_relay_spool_corrupt_files") == 1.0
        assert s._purge_corrupt(now) == 0
        assert registry.get_sample_value("mailplane_relay_spool_corrupt_purged_total") == 2.0
        assert s._purge_corrupt() == 0  # the clock now: 99 s is still under 100 s
    finally:
        await s.close()


def test_the_purge_of_a_spool_without_quarantine_is_quiet(tmp_path: Path) -> None:
    s = make(tmp_path)
    assert s._purge_corrupt() == 0
    assert s.metrics.registry.get_sample_value("mailplane_relay_spool_corrupt_files") == 0.0


async def test_the_purge_loop_logs_a_failure_and_carries_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    s = make(tmp_path, corrupt_retention=0.0)
    intervals: list[float] = []
    purged = asyncio.Event()
    calls = 0
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        intervals.append(delay)
        await real_sleep(0)

    def purge(now: float | None = None) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(5, "Input/output error")
        purged.set()
        return 0

    await s.start()
    try:
        monkeypatch.setattr(asyncio, "sleep", sleep)
        monkeypatch.setattr(s, "_purge_corrupt", purge)
        await purged.wait()
    finally:
        monkeypatch.undo()
        await s.close()
    assert intervals[:2] == [1.0, 1.0]
    assert "purge of corrupt/ failed: [Errno 5] Input/output error" in caplog.text


@pytest.mark.parametrize("retention, interval", [(86400.0, 3600.0), (100.0, 25.0),
                                                 (2.0, 1.0)])
def test_the_purge_runs_four_times_per_retention_between_a_second_and_an_hour(
        retention: float, interval: float) -> None:
    assert spool_module._purge_interval(retention) == interval


# ------------------------------------------------------------------ adoption


def test_adopt_moves_messages_states_and_quarantine_and_removes_the_source(
        tmp_path: Path, journal: Journal, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    src, dst = tmp_path / "w3", tmp_path / "w0"
    src.mkdir()
    dst.mkdir()
    a, b, half = (envelope_of(f"{'0' * 19}{i}") for i in range(1, 4))
    for m in (a, b):
        write_message(src, m)
    (src / f"{a.queue_id}.state").write_bytes(a.to_json())
    write_message(dst, half)  # moved by an adoption a crash cut short...
    (src / f"{half.queue_id}.state").write_bytes(half.to_json())  # ...before its state
    (src / ".tmp-x.msg").write_bytes(b"partial")
    (src / ".lock").write_bytes(b"")
    (src / "corrupt").mkdir()
    (src / "corrupt" / "bad.msg").write_bytes(b"bad")
    (src / "free").mkdir()
    (src / "free" / "0").write_bytes(bytes(10))
    assert adopt(src, dst, fsync=True) == 2
    assert not src.exists()
    assert names(dst) == sorted(f"{m.queue_id}.{ext}" for m, ext in (
        (a, "msg"), (a, "state"), (b, "msg"), (half, "msg"), (half, "state")))
    assert names(dst / "corrupt") == ["bad.msg"]
    assert ("fsync", str(dst)) in journal.calls and ("fsync", str(src)) in journal.calls
    renames = [p for op, p in journal.calls if op == "rename"]
    assert renames.index(f"{src}/{a.queue_id}.msg -> {dst}/{a.queue_id}.msg") < renames.index(
        f"{src}/{a.queue_id}.state -> {dst}/{a.queue_id}.state")
    assert f"adopted 2 message(s) from {src} into {dst}" in caplog.text


def test_adopt_appends_the_hand_off_ledger_durably_and_removes_the_sources(
        tmp_path: Path, journal: Journal) -> None:
    # The hand-offs the source took are the target's now: a message handed over again is
    # still recognised. Appended after a line break (the target's last line may be cut).
    src, dst = tmp_path / "w1", tmp_path / "w0"
    src.mkdir()
    dst.mkdir()
    (src / "handoffs.log").write_bytes(b"id1 a\nid2 b")
    (dst / "handoffs.log").write_bytes(b"id0 c")
    assert adopt(src, dst, fsync=True) == 0
    assert (dst / "handoffs.log").read_bytes() == b"id0 c\nid1 a\nid2 b"
    assert not src.exists()
    assert ("fsync", f"{dst}/handoffs.log") in journal.calls


def test_adopt_keeps_a_copy_adopted_before(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src, dst = tmp_path / "w1", tmp_path / "w0"
    src.mkdir()
    dst.mkdir()
    dup = envelope_of()
    write_message(src, dup, b"the copy left behind")
    write_message(dst, dup, b"the adopted copy")
    assert adopt(src, dst, fsync=False) == 0
    assert (dst / f"{dup.queue_id}.msg").read_bytes().endswith(b"the adopted copy")
    assert f"{dup.queue_id} is in {src} and {dst}; keeping the adopted one" in caplog.text
    assert f"{src} is not empty after adoption; left in place" in caplog.text


def test_adopt_without_fsync_or_removal(tmp_path: Path, journal: Journal,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    src, dst = tmp_path / "w1", tmp_path / "w0"
    src.mkdir()
    dst.mkdir()
    (src / ".lock").write_bytes(b"")
    assert adopt(src, dst, fsync=False, remove_source=False) == 0
    assert src.is_dir() and names(src) == [".lock"]
    assert [op for op in journal.ops() if op != "rename"] == []
    assert "adopted" not in caplog.text


def test_adopt_leaves_a_source_it_cannot_empty(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src, dst = tmp_path / "w1", tmp_path / "w0"
    src.mkdir()
    dst.mkdir()
    (src / "notes.txt").write_text("someone's file")
    assert adopt(src, dst, fsync=True) == 0
    assert names(src) == ["notes.txt"]
    assert f"{src} is not empty after adoption; left in place" in caplog.text


def test_count_messages(tmp_path: Path) -> None:
    assert count_messages(tmp_path / "none") == 0
    (tmp_path / "file").write_text("x")
    assert count_messages(tmp_path / "file") == 0
    write_message(tmp_path, envelope_of())
    write_message(tmp_path, envelope_of())
    (tmp_path / "notes.msg").write_text("x")
    (tmp_path / f"{new_queue_id()}.state").write_text("x")
    assert count_messages(tmp_path) == 2
    assert count_messages(str(tmp_path)) == 2


# ------------------------------------------------------------------ group state updates


async def test_a_group_state_update_syncs_each_file_renames_them_and_syncs_the_directory_once(
        spool: Spool, journal: Journal) -> None:
    msgs = [await commit(spool) for _ in range(3)]
    before = spool.file_fsyncs
    journal.calls.clear()
    for n, m in enumerate(msgs):
        m.attempts = n + 4
    await spool.save_states(msgs)
    ops = journal.ops()
    assert ops == ["fdatasync"] * 3 + ["rename"] * 3 + ["fsync"]
    synced = [path for op, path in journal.calls if op == "fdatasync"]
    renamed = [path.split(" -> ") for op, path in journal.calls if op == "rename"]
    assert [src for src, _ in renamed] == synced  # every file synced is the one renamed
    assert [dst for _, dst in renamed] == [str(spool.directory / f"{m.queue_id}.state")
                                           for m in msgs]
    assert journal.calls[-1] == ("fsync", str(spool.directory))
    assert spool.file_fsyncs == before + 3
    for n, m in enumerate(msgs):
        state = spool.directory / f"{m.queue_id}.state"
        assert QueuedMessage.from_json(state.read_bytes()).attempts == n + 4
    assert sorted(names(spool.directory)) == sorted(
        f"{m.queue_id}{ext}" for m in msgs for ext in (".msg", ".state"))
    del msgs, m
    gc.collect()
    reread = [spool.load(qid) for qid in spool.queue_ids()]
    assert sorted(r.attempts for r in reread if r is not None) == [4, 5, 6]


async def test_a_group_state_update_without_fsync_only_renames(
        tmp_path: Path, journal: Journal) -> None:
    s = make(tmp_path, fsync=False)
    await s.start()
    try:
        msgs = [await commit(s) for _ in range(2)]
        journal.calls.clear()
        await s.save_states(msgs)
        assert journal.ops() == ["rename", "rename"]
    finally:
        await s.close()


async def test_a_group_state_update_skips_removed_messages(spool: Spool) -> None:
    kept, gone = await commit(spool), await commit(spool)
    await spool.remove(gone.queue_id)
    kept.attempts = gone.attempts = 9
    await spool.save_states([kept, gone])
    assert names(spool.directory) == sorted([f"{kept.queue_id}.msg", f"{kept.queue_id}.state"])
    await spool.save_states([gone])  # nothing live: nothing written
    assert names(spool.directory) == sorted([f"{kept.queue_id}.msg", f"{kept.queue_id}.state"])


async def test_a_failed_group_state_update_leaves_no_file_and_keeps_the_envelopes(
        spool: Spool, journal: Journal) -> None:
    msgs = [await commit(spool) for _ in range(3)]
    qids = [m.queue_id for m in msgs]
    for m in msgs:
        m.attempts = 7
    second = f"{qids[1]}.state"
    journal.fail = lambda op, path: op == "rename" and path.endswith(second)
    with pytest.raises(SpoolError, match="spool state update of 3 message"):
        await spool.save_states(msgs)
    # the first state may stand (it is whole); no temporary file of any of them is left
    left = names(spool.directory)
    assert all(n.endswith((".msg", ".state")) and "-" not in n for n in left), left
    assert f"{qids[1]}.state" not in left and f"{qids[2]}.state" not in left
    del msgs, m
    gc.collect()
    for qid in qids:
        pinned = spool.load(qid)
        assert pinned is not None and pinned.attempts == 7
    journal.fail = lambda op, path: False


async def test_a_failed_sync_in_a_group_state_update_renames_nothing(
        spool: Spool, journal: Journal) -> None:
    msgs = [await commit(spool) for _ in range(2)]
    journal.calls.clear()
    journal.fail = lambda op, path: op == "fdatasync"
    with pytest.raises(SpoolError):
        await spool.save_states(msgs)
    assert "rename" not in journal.ops()
    assert names(spool.directory) == sorted(f"{m.queue_id}.msg" for m in msgs)


async def test_an_older_group_state_write_finishing_last_is_dropped(spool: Spool) -> None:
    msg = await commit(spool)
    qid = msg.queue_id
    msg.attempts = 2
    spool._write_states([(qid, msg.to_json(), 7)], False)
    msg.attempts = 1
    spool._write_states([(qid, msg.to_json(), 3)], False)  # taken earlier, done later
    state = spool.directory / f"{qid}.state"
    assert QueuedMessage.from_json(state.read_bytes()).attempts == 2
    assert names(spool.directory) == [f"{qid}.msg", f"{qid}.state"]


# ------------------------------------------------------------------ close


async def test_close_waits_for_a_commit_in_flight_ends_its_threads_and_may_be_called_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = make(tmp_path)
    await s.start()
    first = await commit(s)  # the spool's threads are running now
    threads = list(s._executor._threads) if s._executor is not None else []
    assert threads
    release = threading.Event()
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        release.wait(30)  # the next commit's sync holds until the test lets it go
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    pending = asyncio.ensure_future(commit(s))
    closing = asyncio.ensure_future(s.close())
    await asyncio.sleep(0.2)
    assert not pending.done() and not closing.done()  # close waits for the commit in flight
    release.set()
    await closing
    second = await pending  # it ended durably before close returned
    assert sorted(names(s.directory)) == sorted([f"{first.queue_id}.msg",
                                                f"{second.queue_id}.msg"])
    assert not [t for t in threads if t.is_alive()]  # close waited for its threads
    await s.close()  # a second close finds nothing left to close


def test_a_queue_ids_random_bits_never_reach_its_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    class AllOnes(random.Random):
        def getrandbits(self, k: int) -> int:
            return (1 << k) - 1

    ms = 1_800_000_000_000  # an even millisecond: a random bit spilling into it would show
    monkeypatch.setattr(time, "time_ns", lambda: ms * 1_000_000 + 999_999)
    n = queue_id_number(new_queue_id(AllOnes()))
    assert n >> 50 == ms
    assert n & ((1 << 50) - 1) == (1 << 50) - 1
