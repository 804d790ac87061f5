"""Durability and privacy while the spool reuses the files of final messages.

A relay under the LD_PRELOAD shim of ``test_durability`` delivers some messages (their files
go to ``free/``, are overwritten with zeros and reused by later commits and state writes) and
defers others (their state updates reuse files too). A power cut is then replayed after every
journalled event (each fdatasync, fsync, rename and 250: the zero-fill and the reuse write are
unsynced, so the disk is the same between two such events), and for each the spool's recovery
must:

- recover every acknowledged message with its own bytes;
- recover no message carrying another message's bytes (a reused file whose new content was not
  synced must not be taken for the old message or for a new one);
- leave no body or subject of a message whose removal was made durable anywhere in the spool
  tree (``corrupt/`` included).

At every point a torn write is modelled too: the latest synced write of a reused message file
reached the disk for its first sectors only (those holding the header and envelope, and the
first of the data), the later ones still holding the file's older content, as a power cut in
the middle of a page's write-back leaves it on a disk without power-loss protection. Recovery
must never read such a message's data as its own (the data checksum fails: the message is not
delivered, its envelope alone is set aside in ``corrupt/``) and must keep no older bytes of it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.spool import Spool, SpoolError
from tests.helpers.relayproc import RelayProcess
from tests.helpers.sink import Sink
from tests.relay.test_durability import Journal, build_shim, rebuild

pytestmark = pytest.mark.timeout(120)

CLIENTS = 4
FIRST = 3  # messages per client before the deliveries are awaited
SECOND = 4  # messages per client that may reuse the files of delivered ones


SECTOR = 512


def tear_latest_reuse(journal: Journal, snaps: Path, spool_dir: Path, crash: int,
                      target: Path) -> str | None:
    """In the spool rebuilt at ``target`` for a power cut after event ``crash``: tear the
    latest synced write of a reused message file (an inode synced before with other content).
    Its sectors up to the first one past the envelope keep the new content, the rest the
    inode's previous synced content (zeros past its end). The torn queue id, or None."""
    listing: dict[str, int] = {}
    history: dict[int, list[tuple[int, bytes]]] = {}
    for seq, kind, rest in journal.events:
        if seq > crash:
            break
        if kind in ("fsync", "fdatasync"):
            ino, snap, path = int(rest[0]), rest[1], " ".join(rest[2:])
            raw = (snaps / snap).read_bytes()
            if Path(path) == spool_dir and kind == "fsync":
                listing = {line.split(" ", 1)[1]: int(line.split(" ", 1)[0])
                           for line in raw.decode().splitlines()}
            else:
                history.setdefault(ino, []).append((seq, raw))
    best: tuple[int, str, bytes] | None = None
    for name, ino in listing.items():
        writes = history.get(ino, [])
        if not name.endswith(".msg") or len(writes) < 2:
            continue
        (_, old), (seq, new) = writes[-2], writes[-1]
        if (target / name).read_bytes() != new or old == new:
            continue  # not what the rebuilt spool holds for it (a later inode of the name)
        line, _, rest = new.partition(b"\n")
        offset = len(line) + 1 + int(line.split()[1])
        cut = (offset // SECTOR + 1) * SECTOR
        if cut >= len(new):
            continue
        torn = new[:cut] + old[cut:len(new)].ljust(len(new) - cut, b"\0")
        if torn != new and (best is None or seq > best[0]):
            best = (seq, name, torn)
    if best is None:
        return None
    (target / best[1]).write_bytes(best[2])
    return best[1][: -len(".msg")]


def sent(i: int, j: int) -> bytes:
    return (f"From: app@example.com\r\nTo: user{i}@dest.test\r\nSubject: reuse-subject-{i}-{j}"
            f"\r\n\r\n").encode() + f"reuse-body-{i}-{j} ".encode() * 40 + b"\r\n"


def marks(data: bytes) -> list[bytes]:
    """Byte strings unique to one message: its subject and its body text."""
    subject = data.split(b"Subject: ")[1].split(b"\r\n")[0]
    return [subject, b"reuse-body-" + subject.split(b"reuse-subject-")[1] + b" "]


async def test_a_power_cut_at_any_point_of_file_reuse_keeps_mail_and_privacy(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any], tmp_path: Path,
) -> None:
    lib = build_shim(tmp_path)
    log, snaps = tmp_path / "journal.log", tmp_path / "snaps"
    snaps.mkdir()
    # Odd clients' recipients are deferred (their messages stay and get state updates), even
    # clients' are delivered (their files are recycled).
    sink: Sink = await smtp_sink(rcpt_replies={
        f"user{i}@dest.test": "451 4.2.0 Try later" for i in range(1, CLIENTS, 2)})
    relay = relay_factory(
        smarthost_port=sink.port, extra={"trustedNetworks": ["127.0.0.0/8"]},
        env={"LD_PRELOAD": str(lib), "SYNCSHIM_LOG": str(log), "SYNCSHIM_SNAP": str(snaps)})
    await asyncio.to_thread(relay.start)
    acked: dict[str, bytes] = {}

    async def client(i: int, js: range) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports["submission"],
                               start_tls=False, timeout=10)
        await smtp.connect()
        for j in js:
            data = sent(i, j)
            _, reply = await smtp.sendmail("app@example.com", [f"user{i}@dest.test"], data)
            acked[reply.rsplit(" ", 1)[1]] = data
        await smtp.quit()

    delivered = CLIENTS // 2
    await asyncio.gather(*(client(i, range(FIRST)) for i in range(CLIENTS)))
    await sink.wait_for_messages(delivered * FIRST, timeout=30)
    await asyncio.gather(*(client(i, range(FIRST, FIRST + SECOND)) for i in range(CLIENTS)))
    await sink.wait_for_messages(delivered * (FIRST + SECOND), timeout=30)
    # Last, a delivered message alone: its files are left in free/ (no commit follows).
    total = FIRST + SECOND + 1
    await client(0, range(FIRST + SECOND, total))
    spool_dir = relay.spool_dir
    free = f"{spool_dir}/free/"
    journal = Journal.read(log)

    def recycled_all() -> bool:
        gone = {r[0] for _, k, r in Journal.read(log).events
                if k == "rename" and r[1].startswith(free)}
        return len(gone) >= delivered * (FIRST + SECOND) + 1

    for _ in range(200):  # the removals follow the deliveries
        if recycled_all():
            break
        await asyncio.sleep(0.05)
    await asyncio.to_thread(relay.kill)
    journal = Journal.read(log)
    assert len(acked) == CLIENTS * (FIRST + SECOND) + 1

    # When each message's file went to free/, and when that removal became durable (the next
    # fsync of the spool directory).
    # (The copy of the listing is taken when the fsync starts, which may precede a rename that
    # completes before it: a removal is durable at the first fsync whose listing lacks it.)
    dir_syncs = [(s, {line.split(" ", 1)[1] for line in
                      (snaps / r[1]).read_text().splitlines()})
                 for s, k, r in journal.events
                 if k == "fsync" and " ".join(r[2:]) == str(spool_dir)]
    removed_durably: dict[str, int] = {}
    gone: set[str] = set()
    for seq, kind, rest in journal.events:
        if kind == "rename" and rest[1].startswith(free) and rest[0].endswith(".msg"):
            qid = Path(rest[0]).name[: -len(".msg")]
            gone.add(qid)
            later = [s for s, names in dir_syncs if s > seq and f"{qid}.msg" not in names]
            if later:
                removed_durably[qid] = later[0]
    reused = [s for s, k, r in journal.events if k == "rename" and r[0].startswith(free)]
    assert [s for s, k, r in journal.events if k == "rename" and r[0].startswith(free)
            and r[1].endswith(".msg")], "no commit reused a recycled file"
    assert [s for s, k, r in journal.events if k == "rename" and r[0].startswith(free)
            and r[1].endswith(".state")], "no state write reused a recycled file"
    assert len(removed_durably) >= delivered * FIRST
    assert list((spool_dir / "free").iterdir()), "no recycled file waits in free/"

    # No delivered message's text in the spool tree as the relay left it.
    for p in spool_dir.rglob("*"):
        if p.is_file():
            raw = p.read_bytes()
            for qid in gone:
                for m in marks(acked[qid]):
                    assert m not in raw, f"{p.relative_to(spool_dir)} holds {m!r} of {qid}"

    replies = journal.replies()
    events = {e[0]: e for e in journal.events}
    first_reuse = reused[0]
    torn_points = 0
    points = sorted({s for s, _, _ in journal.events if s >= first_reuse - 1})
    for n, crash in enumerate(points):
        state = tmp_path / f"cut{n}"
        rebuild(journal, snaps, spool_dir, crash, state)
        torn = tear_latest_reuse(journal, snaps, spool_dir, crash, state)
        if torn is not None:
            torn_points += 1
        spool = Spool(str(state), fsync=True, metrics=RelayMetrics.create())
        recovered = {m.queue_id: m for m in await spool.start()}
        try:
            where = f"power cut after event {crash} {events[crash][1:]}"
            for qid, seq in replies.items():
                # A delivered message may come back (its removal was not durable yet: at least
                # once) or not; a deferred one must.
                if seq <= crash and qid not in gone:
                    assert qid in recovered, f"{where}: acknowledged {qid} is lost"
            for qid, msg in recovered.items():
                assert qid in acked, f"{where}: recovered {qid} was never acknowledged"
                if qid == torn:
                    with pytest.raises(SpoolError, match="does not match its checksum"):
                        spool.read(qid)
                    assert qid not in spool.queue_ids(), f"{where}: torn {qid} still queued"
                    aside = (state / "corrupt" / f"{qid}.torn").read_bytes()
                    assert not any(m in aside for m in marks(acked[qid])), where
                    continue
                try:
                    data = spool.read(qid)
                except SpoolError as exc:
                    pytest.fail(f"{where}: {qid} recovered but unreadable ({exc})")
                assert data.endswith(acked[qid]), (
                    f"{where}: {qid} recovered with other bytes than its own")
                assert [r.address for r in msg.recipients] == [
                    acked[qid].split(b"To: ")[1].split(b"\r\n")[0].decode()], (
                    f"{where}: {qid} recovered with another message's recipients")
            for p in state.rglob("*"):
                if not p.is_file():
                    continue
                raw = p.read_bytes()
                for qid, durable_at in removed_durably.items():
                    if durable_at > crash:
                        continue
                    for m in marks(acked[qid]):
                        assert m not in raw, (
                            f"{where}: {p.relative_to(state)} holds {m!r} of {qid}, "
                            f"removed durably at event {durable_at}")
        finally:
            await spool.close()
    assert os.listdir(tmp_path / "cut0")
    assert torn_points >= 3, f"a torn write was modelled at {torn_points} points only"
