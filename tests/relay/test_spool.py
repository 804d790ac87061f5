"""The durable spool: commit, recovery, state updates, group commit, failures."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.spool import (
    LOOP_WRITE_LIMIT,
    QueuedMessage,
    Spool,
    SpoolError,
    new_queue_id,
)


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def make_spool(directory: Path, *, fsync: bool = True) -> Spool:
    return Spool(str(directory), fsync=fsync,
                 metrics=RelayMetrics.create())


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = make_spool(tmp_path / "spool")
    assert await s.start() == []
    yield s
    await s.close()


async def commit(s: Spool, data: bytes = b"Subject: x\r\n\r\nbody\r\n",
                 rcpts: tuple[str, ...] = ("a@example.net", "b@example.net")) -> QueuedMessage:
    return await s.commit(mail_from="app@example.com", recipients=list(rcpts), data=data,
                          message_id="<m1@example.com>", credential="app",
                          sender_domain="example.com", listener="submission")


def test_queue_ids_sort_by_time_and_are_unique() -> None:
    ids = [new_queue_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 20 and i.isalnum() and i.isupper() for i in ids)
    # The first 10 characters are the millisecond clock: never decreasing.
    prefixes = [i[:10] for i in ids]
    assert prefixes == sorted(prefixes)


async def test_commit_is_complete_on_disk_when_it_returns(spool: Spool) -> None:
    data = b"Subject: hello\r\n\r\n" + os.urandom(5000)
    dir_syncs = spool.dir_fsyncs
    msg = await commit(spool, data)
    path = spool.directory / f"{msg.queue_id}.msg"
    raw = path.read_bytes()
    header, rest = raw.split(b"\n", 1)
    length = int(header.split()[1])
    envelope = json.loads(rest[:length])
    assert rest[length:] == data
    assert envelope["queue_id"] == msg.queue_id
    assert envelope["mail_from"] == "app@example.com"
    assert [r["address"] for r in envelope["recipients"]] == ["a@example.net", "b@example.net"]
    assert {r["status"] for r in envelope["recipients"]} == {"pending"}
    assert envelope["size"] == len(data)
    assert envelope["credential"] == "app"
    assert spool.read(msg.queue_id) == data
    assert spool.file_fsyncs == 1 and spool.dir_fsyncs == dir_syncs + 1
    assert files(spool.directory) == [path.name]


async def test_recovery_returns_committed_drops_temp_and_orphans(tmp_path: Path) -> None:
    s = make_spool(tmp_path)
    await s.start()
    first = await commit(s, b"one\r\n")
    second = await commit(s, b"two\r\n")
    done = await commit(s, b"three\r\n")
    await s.close()
    # A commit interrupted by a crash, an orphan state file, and a finished message whose
    # removal did not happen.
    (tmp_path / f".tmp-{new_queue_id()}.msg").write_bytes(b"MPS1 999\n{half")
    (tmp_path / f"{new_queue_id()}.state").write_text("{}")
    done.recipients[0].status = "delivered"
    done.recipients[1].status = "bounced"
    (tmp_path / f"{done.queue_id}.state").write_bytes(done.to_json())

    again = make_spool(tmp_path)
    recovered = await again.start()
    try:
        assert [m.queue_id for m in recovered] == [first.queue_id, second.queue_id]
        assert recovered[0] == first
        assert again.read(second.queue_id) == b"two\r\n"
        assert files(tmp_path) == sorted([f"{first.queue_id}.msg", f"{second.queue_id}.msg"])
    finally:
        await again.close()


async def test_state_updates_survive_restart_and_remove_forgets(tmp_path: Path) -> None:
    s = make_spool(tmp_path)
    await s.start()
    msg = await commit(s)
    msg.recipients[0].status = "delivered"
    msg.recipients[1].attempts = 2
    msg.recipients[1].last_response = "451 4.3.0 try later"
    msg.attempts = 2
    msg.next_attempt = msg.received_at + 120
    await s.save_state(msg)
    await s.save_state(msg, durable=True)
    other = await commit(s)
    await s.remove(other.queue_id)
    await s.save_state(other)  # a late update of a removed message leaves nothing behind
    await s.close()

    again = make_spool(tmp_path)
    recovered = await again.start()
    await again.close()
    assert recovered == [msg]
    assert [r.address for r in recovered[0].pending()] == ["b@example.net"]


async def test_torn_state_file_falls_back_to_the_committed_envelope(tmp_path: Path) -> None:
    s = make_spool(tmp_path)
    await s.start()
    msg = await commit(s)
    await s.close()
    (tmp_path / f"{msg.queue_id}.state").write_bytes(b"")
    again = make_spool(tmp_path)
    recovered = await again.start()
    await again.close()
    assert recovered == [msg]


async def test_corrupt_message_file_is_quarantined_not_deleted(tmp_path: Path) -> None:
    s = make_spool(tmp_path)
    await s.start()
    msg = await commit(s)
    await s.close()
    path = tmp_path / f"{msg.queue_id}.msg"
    path.write_bytes(path.read_bytes()[:-3])  # size no longer matches the envelope
    again = make_spool(tmp_path)
    assert await again.start() == []
    await again.close()
    assert (tmp_path / "corrupt" / path.name).exists()


async def test_a_quarantined_message_takes_its_state_file_along(tmp_path: Path) -> None:
    s = make_spool(tmp_path)
    await s.start()
    msg = await commit(s)
    await s.save_state(msg)
    await s.close()
    path = tmp_path / f"{msg.queue_id}.msg"
    path.write_bytes(path.read_bytes()[:-3])
    again = make_spool(tmp_path)
    assert await again.start() == []
    # Nothing naming the recipients stays in the spool itself; corrupt/ is purged in time.
    assert files(tmp_path) == []
    assert files(tmp_path / "corrupt") == [f"{msg.queue_id}.msg", f"{msg.queue_id}.state"]
    assert again._purge_corrupt(now=time.time() + 86400 + 1) == 2
    await again.close()


async def test_data_whose_checksum_fails_is_never_read_and_its_envelope_set_aside(
        tmp_path: Path) -> None:
    """A torn write: the header and envelope are the message's, a later sector holds other
    bytes. The data is not returned (so never delivered); the envelope alone goes to
    corrupt/, no data byte, and the message's files are scrubbed."""
    s = make_spool(tmp_path)
    await s.start()
    data = b"Subject: torn\r\n\r\n" + b"own-body " * 200
    msg = await commit(s, data)
    await s.save_state(msg)
    path = tmp_path / f"{msg.queue_id}.msg"
    raw = path.read_bytes()
    assert raw.startswith(b"MPS2 ")
    torn = raw[:1024] + b"other-mail-body " * 20
    path.write_bytes(torn + raw[len(torn):])  # same size: the envelope check still passes
    assert s.load(msg.queue_id) is msg
    with pytest.raises(SpoolError, match="does not match its checksum"):
        s.read(msg.queue_id)
    assert msg.queue_id not in s.queue_ids() and s.load(msg.queue_id) is None
    assert files(tmp_path) == []
    [aside] = (tmp_path / "corrupt").iterdir()
    assert aside.name == f"{msg.queue_id}.torn"
    kept = aside.read_bytes()
    assert json.loads(kept)["recipients"][0]["address"] == "a@example.net"
    assert b"own-body" not in kept and b"other-mail" not in kept
    for p in (tmp_path / "free").iterdir():
        assert b"other-mail" not in p.read_bytes() and b"own-body" not in p.read_bytes()
    assert s.metrics.registry.get_sample_value("mailplane_relay_spool_corrupt_files") == 1
    await s.close()


async def test_message_files_of_format_1_without_checksum_are_still_read(
        tmp_path: Path) -> None:
    s = make_spool(tmp_path)
    await s.start()
    data = b"Subject: old\r\n\r\nold body\r\n"
    msg = await commit(s, data)
    await s.close()
    path = tmp_path / f"{msg.queue_id}.msg"
    header, rest = path.read_bytes().split(b"\n", 1)
    assert header.startswith(b"MPS2 ")
    path.write_bytes(b"MPS1 %s\n" % header.split()[1] + rest)
    again = make_spool(tmp_path)
    [recovered] = await again.start()
    assert recovered.queue_id == msg.queue_id
    assert again.read(msg.queue_id) == data
    await again.close()


async def test_group_commit_shares_directory_fsyncs(tmp_path: Path) -> None:
    s = make_spool(tmp_path)
    await s.start()
    s.dir_fsyncs = 0
    try:
        msgs = await asyncio.gather(*(commit(s, b"m%d\r\n" % i) for i in range(40)))
        assert len({m.queue_id for m in msgs}) == 40
        assert s.file_fsyncs == 40
        # 40 commits started together: one batch, maybe a second for stragglers, never one each.
        assert 1 <= s.dir_fsyncs <= 4
        for i, m in enumerate(msgs):
            assert s.read(m.queue_id) == b"m%d\r\n" % i
    finally:
        await s.close()


async def test_fsync_off_skips_every_fsync(tmp_path: Path) -> None:
    s = make_spool(tmp_path, fsync=False)
    await s.start()
    await asyncio.gather(*(commit(s) for _ in range(5)))
    await s.close()
    assert s.file_fsyncs == 0 and s.dir_fsyncs == 0
    assert len(list(tmp_path.glob("*.msg"))) == 5


async def test_directory_gone_raises_spool_error_and_leaves_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    s = make_spool(directory)
    await s.start()
    try:
        shutil.rmtree(directory)
        directory.write_text("not a directory")  # root ignores permissions, not ENOTDIR
        with pytest.raises(SpoolError, match="spool write failed"):
            await commit(s)
        assert directory.read_text() == "not a directory"
    finally:
        await s.close()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                         capture_output=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


async def test_disk_full_raises_spool_error_and_leaves_no_partial_file(tiny_fs: Path) -> None:
    s = make_spool(tiny_fs)
    await s.start()
    try:
        small = await commit(s, b"fits\r\n")
        with pytest.raises(SpoolError, match="No space left"):
            await commit(s, os.urandom(200_000))
        assert files(tiny_fs) == [f"{small.queue_id}.msg"]
    finally:
        await s.close()


async def test_commit_before_start_is_a_spool_error(tmp_path: Path) -> None:
    s = make_spool(tmp_path)
    with pytest.raises(SpoolError):
        await commit(s)


def tree_bytes(directory: Path) -> bytes:
    """Every byte of every file under ``directory``, names included."""
    out = []
    for p in sorted(directory.rglob("*")):
        out.append(str(p).encode())
        if p.is_file():
            out.append(p.read_bytes())
    return b"\n".join(out)


async def test_removed_message_leaves_no_byte_of_it_on_disk(tmp_path: Path) -> None:
    s = make_spool(tmp_path)
    await s.start()
    marker = uuid.uuid4().hex
    data = f"Subject: {marker}\r\n\r\nbody {marker}\r\n".encode()
    msg = await commit(s, data, rcpts=(f"{marker}@example.net",))
    assert marker.encode() in tree_bytes(tmp_path)
    msg.recipients[0].status = "delivered"
    await s.save_state(msg)
    await s.remove(msg.queue_id)
    # Its two files wait in free/, zeros only, for reuse.
    free = sorted((tmp_path / "free").iterdir())
    assert len(free) == 2 and all(set(p.read_bytes()) == {0} for p in free)
    assert marker.encode() not in tree_bytes(tmp_path)
    # A later commit reuses one, holding nothing of the removed message.
    another = await commit(s, b"another\r\n")
    assert s.recycled == 1 and len(list((tmp_path / "free").iterdir())) == 1
    assert (tmp_path / f"{another.queue_id}.msg").read_bytes().endswith(b"another\r\n")
    await s.close()
    assert marker.encode() not in tree_bytes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "free") == [
        p.name for p in tmp_path.glob("*.msg")]


async def test_a_removal_without_free_dir_still_deletes_the_message(tmp_path: Path) -> None:
    s = make_spool(tmp_path)
    await s.start()
    msg = await commit(s, b"gone\r\n")
    (tmp_path / "free").rmdir()  # removed under the running spool
    await s.remove(msg.queue_id)
    await s.close()
    assert list(tmp_path.glob("*.msg")) == []


async def test_a_larger_message_reuses_a_smaller_scrubbed_file_and_a_smaller_one_a_larger(
        tmp_path: Path) -> None:
    s = make_spool(tmp_path)
    await s.start()
    small = await commit(s, b"x" * 100)
    await s.remove(small.queue_id)
    big = await commit(s, b"y" * 9000)
    await s.remove(big.queue_id)
    tiny = await commit(s, b"z" * 10)
    await s.close()
    again = make_spool(tmp_path)
    [recovered] = await again.start()
    assert recovered.queue_id == tiny.queue_id
    assert again.read(tiny.queue_id) == b"z" * 10
    assert s.recycled == 2
    await again.close()


async def test_free_files_of_older_versions_are_deleted_at_start(tmp_path: Path) -> None:
    (tmp_path / "free").mkdir()
    (tmp_path / "free" / f"{new_queue_id()}.msg.free").write_bytes(b"MPS1 2\n{}old mail")
    s = make_spool(tmp_path)
    assert await s.start() == []
    await s.close()
    assert list((tmp_path / "free").iterdir()) == []


async def test_quarantined_files_are_purged_after_the_retention(tmp_path: Path) -> None:
    metrics = RelayMetrics.create()
    s = Spool(str(tmp_path), fsync=True, metrics=metrics, corrupt_retention=3600)
    await s.start()
    msg = await commit(s)
    await s.close()
    path = tmp_path / f"{msg.queue_id}.msg"
    path.write_bytes(path.read_bytes()[:-3])
    old = time.time() - 7200
    os.utime(path, (old, old))  # the commit was long ago: the window starts at the quarantine

    def sample(name: str) -> float:
        value = metrics.registry.get_sample_value(name)
        return 0.0 if value is None else value

    again = Spool(str(tmp_path), fsync=True, metrics=metrics, corrupt_retention=3600)
    assert await again.start() == []
    quarantined = tmp_path / "corrupt" / path.name
    assert quarantined.exists()
    assert sample("mailplane_relay_spool_corrupt_files") == 1
    assert again._purge_corrupt(now=time.time() + 3500) == 0
    assert quarantined.exists()
    assert again._purge_corrupt(now=time.time() + 3601) == 1
    assert not quarantined.exists()
    assert sample("mailplane_relay_spool_corrupt_files") == 0
    assert sample("mailplane_relay_spool_corrupt_purged_total") == 1
    await again.close()


async def test_the_purge_runs_by_itself_while_the_spool_is_open(tmp_path: Path) -> None:
    (tmp_path / "corrupt").mkdir()
    stale = tmp_path / "corrupt" / f"{new_queue_id()}.msg"
    s = Spool(str(tmp_path), fsync=True, metrics=RelayMetrics.create(), corrupt_retention=1)
    await s.start()
    try:
        stale.write_bytes(b"set aside after the start")
        deadline = time.monotonic() + 10
        while stale.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not stale.exists()
    finally:
        await s.close()


async def test_queue_ids_of_one_spool_follow_commit_order(spool: Spool) -> None:
    # Commits can finish within one millisecond; recovery order is commit order anyway.
    ids = [(await commit(spool, b"m\r\n")).queue_id for _ in range(50)]
    assert ids == sorted(ids) and len(set(ids)) == 50


async def test_large_message_is_written_off_the_loop_and_durable(tmp_path: Path) -> None:
    s = make_spool(tmp_path)
    await s.start()
    data = b"Subject: big\r\n\r\n" + os.urandom(LOOP_WRITE_LIMIT) + b"\r\n"
    small, big = await asyncio.gather(commit(s, b"small\r\n"), commit(s, data))
    assert s.file_fsyncs == 2
    await s.close()
    again = make_spool(tmp_path)
    recovered = await again.start()
    try:
        assert sorted(m.queue_id for m in recovered) == sorted([small.queue_id, big.queue_id])
        assert again.read(big.queue_id) == data
    finally:
        await again.close()


async def test_lazy_recovery_lists_at_start_and_reads_envelopes_in_batches(
        tmp_path: Path) -> None:
    s = make_spool(tmp_path)
    await s.start()
    msgs = [await commit(s, b"m%d\r\n" % i, rcpts=(f"r{i}@example.net",)) for i in range(5)]
    msgs[1].recipients[0].status = "delivered"  # final: recovery deletes it
    await s.save_state(msgs[1])
    await s.close()
    corrupt = tmp_path / f"{msgs[2].queue_id}.msg"
    corrupt.write_bytes(corrupt.read_bytes()[:-2])

    again = make_spool(tmp_path)
    assert await again.start(lazy=True) == []
    # Mail is accepted, and erasure waits for the envelopes, before recovery has read any.
    fresh = await commit(again, b"new\r\n", rcpts=("r4@example.net",))
    erasing = asyncio.create_task(again.erase_address("r4@example.net"))
    await asyncio.sleep(0.05)
    assert not erasing.done()
    batches = [[m.queue_id for m in b] async for b in again.recover(batch=2)]
    # Two files per batch: the final one and the corrupt one are dropped from theirs.
    assert batches == [[msgs[0].queue_id], [msgs[3].queue_id], [msgs[4].queue_id]]
    result = await erasing
    assert sorted(result.deleted_ids) == sorted([msgs[4].queue_id, fresh.queue_id])
    assert again.read(msgs[3].queue_id) == b"m3\r\n"
    await again.close()
    assert files(tmp_path) == sorted(f"{m.queue_id}.msg" for m in (msgs[0], msgs[3]))
    assert files(tmp_path / "corrupt") == [corrupt.name]
