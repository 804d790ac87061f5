"""Durability you can see: the system calls behind every 250, and a power cut replayed.

The relay runs with an LD_PRELOAD shim (``syncshim.c``, compiled here with gcc) that journals
file creations, ``fdatasync``/``fsync`` (with a copy of what the file or directory held when the
call started), renames, and every "queued as <id>" reply before it is written to the client's
socket. From the journal:

- the order test asserts, for every acknowledged message, that its file was fdatasynced, then
  renamed into place, then the spool directory fsynced, all before its 250 left;
- the power-loss test rebuilds the spool as a power cut at each acknowledgment would leave it on
  a disk that keeps nothing unsynced (a file's content as of its last completed sync, or empty;
  the directory's entries as of its last completed fsync), runs the spool's recovery on that
  state, and asserts that every message acknowledged by then is recovered, byte for byte.

Removing the spool's ``fdatasync`` or its directory ``fsync`` makes both fail.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.spool import Spool
from tests.helpers.relayproc import RelayProcess
from tests.helpers.sink import Sink

pytestmark = pytest.mark.timeout(90)

SHIM_SOURCE = Path(__file__).with_name("syncshim.c")
CLIENTS = 6
PER_CLIENT = 8


def build_shim(out: Path) -> Path:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is not installed (scripts/bootstrap installs it)"
    lib = out / "syncshim.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-Wall", "-Wno-format-truncation",
                    "-o", str(lib), str(SHIM_SOURCE), "-ldl"], check=True, capture_output=True)
    return lib


@dataclass
class Journal:
    """The shim's journal, in completion order."""

    events: list[tuple[int, str, list[str]]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Journal:
        events = []
        for line in path.read_text().splitlines():
            seq, kind, *rest = line.split(" ")
            events.append((int(seq), kind, rest))
        events.sort()
        return cls(events)

    def replies(self) -> dict[str, int]:
        """Queue id -> seq of its first 250."""
        out: dict[str, int] = {}
        for seq, kind, rest in self.events:
            if kind == "reply":
                out.setdefault(rest[1], seq)
        return out


def rebuild(journal: Journal, snaps: Path, spool_dir: Path, crash: int, target: Path) -> None:
    """The spool directory as a power cut right after event ``crash`` leaves it."""
    listing: dict[str, int] | None = None
    created: dict[int, int] = {}
    content: dict[int, tuple[int, bytes]] = {}
    for seq, kind, rest in journal.events:
        if seq > crash:
            break
        if kind == "create":
            created[int(rest[0])] = seq
        elif kind in ("fsync", "fdatasync"):
            ino, snap, path = int(rest[0]), rest[1], " ".join(rest[2:])
            raw = (snaps / snap).read_bytes()
            if Path(path) == spool_dir and kind == "fsync":
                listing = {}
                for line in raw.decode().splitlines():
                    i, name = line.split(" ", 1)
                    listing[name] = int(i)
            else:
                content[ino] = (seq, raw)
    target.mkdir()
    for name, ino in (listing or {}).items():
        if name == ".lock":
            continue
        data = b""
        if ino in content and content[ino][0] > created.get(ino, 0):
            data = content[ino][1]  # synced since this inode was (last) created
        (target / name).write_bytes(data)


def sent_data(i: int, j: int) -> bytes:
    return (f"From: app@example.com\r\nTo: user{i}@dest.test\r\nSubject: durability {i}.{j}\r\n"
            f"\r\n").encode() + f"body {i}.{j} ".encode() * 50 + b"\r\n"


@pytest.fixture
async def journalled_run(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any], tmp_path: Path,
) -> tuple[RelayProcess, Journal, Path, dict[str, bytes]]:
    """Messages sent by concurrent plaintext clients (a trusted network, so the 250 is visible
    on the wire) to a relay whose upstream defers everything: all mail stays spooled."""
    lib = build_shim(tmp_path)
    log, snaps = tmp_path / "journal.log", tmp_path / "snaps"
    snaps.mkdir()
    sink: Sink = await smtp_sink(mail_reply="451 4.3.0 Try again later")
    relay = relay_factory(
        smarthost_port=sink.port, extra={"trustedNetworks": ["127.0.0.0/8"]},
        env={"LD_PRELOAD": str(lib), "SYNCSHIM_LOG": str(log), "SYNCSHIM_SNAP": str(snaps)})
    await asyncio.to_thread(relay.start)
    acked: dict[str, bytes] = {}

    async def client(i: int) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports["submission"],
                               start_tls=False, timeout=10)
        await smtp.connect()
        for j in range(PER_CLIENT):
            data = sent_data(i, j)
            _, reply = await smtp.sendmail("app@example.com", [f"user{i}@dest.test"], data)
            acked[reply.rsplit(" ", 1)[1]] = data
        await smtp.quit()

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    await asyncio.sleep(0.5)  # a few deferred attempts and their state updates
    await asyncio.to_thread(relay.kill)
    assert len(acked) == CLIENTS * PER_CLIENT
    return relay, Journal.read(log), snaps, acked


async def test_every_250_follows_file_sync_rename_and_directory_sync(
    journalled_run: tuple[RelayProcess, Journal, Path, dict[str, bytes]],
) -> None:
    relay, journal, _, acked = journalled_run
    spool_dir = str(relay.spool_dir)
    replies = journal.replies()
    assert set(replies) == set(acked), "the shim missed replies"
    batched = 0
    for qid, reply_seq in replies.items():
        tmp = f"{spool_dir}/.tmp-{qid}.msg"
        final = f"{spool_dir}/{qid}.msg"
        synced = [s for s, k, r in journal.events
                  if k in ("fdatasync", "fsync") and " ".join(r[2:]) == tmp]
        renamed = [s for s, k, r in journal.events if k == "rename" and r == [tmp, final]]
        assert synced, f"{qid}: its file was never fdatasynced"
        assert len(renamed) == 1, f"{qid}: not renamed into place exactly once"
        dir_synced = [s for s, k, r in journal.events
                      if k == "fsync" and " ".join(r[2:]) == spool_dir and s > renamed[0]]
        assert dir_synced, f"{qid}: the spool directory was not fsynced after its rename"
        assert synced[0] < renamed[0] < dir_synced[0] < reply_seq, (
            f"{qid}: fdatasync@{synced[0]} rename@{renamed[0]} dirsync@{dir_synced[0]} "
            f"250@{reply_seq}")
        # Group commit: the directory fsync that covered this rename may cover others.
        batched += sum(1 for s, k, r in journal.events
                       if k == "rename" and renamed[0] < s < dir_synced[0])
    assert batched > 0, "concurrent clients never shared a directory fsync (no group commit)"


async def test_a_power_cut_after_any_250_loses_no_acknowledged_message(
    journalled_run: tuple[RelayProcess, Journal, Path, dict[str, bytes]], tmp_path: Path,
) -> None:
    relay, journal, snaps, acked = journalled_run
    replies = journal.replies()
    # Every acknowledgment is a crash point, and so are the events between the last two.
    points = sorted(replies.values())
    points += list(range(points[-2], points[-1]))
    for n, crash in enumerate(sorted(set(points))):
        state = tmp_path / f"cut{n}"
        rebuild(journal, snaps, relay.spool_dir, crash, state)
        spool = Spool(str(state), fsync=True, metrics=RelayMetrics.create())
        recovered = {m.queue_id: m for m in await spool.start()}
        try:
            for qid, seq in replies.items():
                if seq > crash:
                    continue
                assert qid in recovered, (
                    f"power cut after event {crash}: {qid}, acknowledged at {seq}, is lost "
                    f"({sorted(os.listdir(state))[:5]}...)")
                assert spool.read(qid).endswith(acked[qid]), f"{qid}: content differs"
                assert [r.address for r in recovered[qid].recipients] == [
                    acked[qid].split(b"To: ")[1].split(b"\r\n")[0].decode()]
        finally:
            await spool.close()


ERASE_SCRIPT = """
import asyncio, socket, sys
from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.spool import Spool

async def main(directory):
    s = Spool(directory, fsync=True, metrics=RelayMetrics.create())
    await s.start()
    data = b"Subject: erasure\\r\\n\\r\\nbody\\r\\n"
    kept = await s.commit(mail_from="app@example.com", data=data, message_id=None,
                          recipients=["gone@example.net", "keep@example.net"],
                          credential=None, sender_domain="example.com", listener="t")
    await s.save_state(kept)
    alone = await s.commit(mail_from="app@example.com", data=data, message_id=None,
                           recipients=["gone@example.net"],
                           credential=None, sender_domain="example.com", listener="t")
    mark, _peer = socket.socketpair()
    mark.send(b"queued as BEFORE\\r\\n")
    await s.erase_address("gone@example.net")
    mark.send(b"queued as ERASED\\r\\n")  # the shim journals this "reply" when erasure returned
    print(kept.queue_id, alone.queue_id)
    await s.close()

asyncio.run(main(sys.argv[1]))
"""


async def test_an_erasure_is_durable_when_it_returns(tmp_path: Path) -> None:
    """A power cut right after erase_address returned: the address is in no spool file, the
    message kept for another recipient is intact, the one left without recipients is gone."""
    lib = build_shim(tmp_path)
    log, snaps, spool_dir = tmp_path / "journal.log", tmp_path / "snaps", tmp_path / "spool"
    snaps.mkdir()
    script = tmp_path / "erase.py"
    script.write_text(ERASE_SCRIPT)
    env = {**os.environ, "LD_PRELOAD": str(lib), "SYNCSHIM_LOG": str(log),
           "SYNCSHIM_SNAP": str(snaps)}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(script), str(spool_dir)], env=env,
        capture_output=True, text=True, timeout=60, check=True)
    kept, alone = done.stdout.split()
    journal = Journal.read(log)
    marks = journal.replies()
    rewritten = [s for s, k, r in journal.events if k == "rename"
                 and r[1] == f"{spool_dir}/{kept}.msg" and marks["BEFORE"] < s]
    assert rewritten, "the kept message's file was not rewritten"
    tmp = next(r[0] for s, k, r in journal.events if s == rewritten[0])
    synced = [s for s, k, r in journal.events if k in ("fdatasync", "fsync")
              and " ".join(r[2:]) == tmp]
    dir_synced = [s for s, k, r in journal.events if k == "fsync"
                  and " ".join(r[2:]) == str(spool_dir) and s > rewritten[-1]]
    assert synced and synced[0] < rewritten[0], "the rewritten file was not synced first"
    assert dir_synced and dir_synced[0] < marks["ERASED"], "no directory fsync before return"

    state = tmp_path / "after-cut"
    rebuild(journal, snaps, spool_dir, marks["ERASED"], state)
    for p in state.iterdir():
        if p.is_file():
            assert b"gone@example.net" not in p.read_bytes(), f"{p.name} names the address"
    spool = Spool(str(state), fsync=True, metrics=RelayMetrics.create())
    recovered = {m.queue_id: m for m in await spool.start()}
    try:
        assert list(recovered) == [kept]
        assert [r.address for r in recovered[kept].recipients] == ["keep@example.net"]
        assert spool.read(kept) == b"Subject: erasure\r\n\r\nbody\r\n"
        assert alone not in recovered
    finally:
        await spool.close()
