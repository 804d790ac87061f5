"""The durable spool: a message is on disk (file and directory fsynced) before the 250 reply.

Layout, everything under the ``directory`` the spool is given (one per worker process):

``<queue-id>.msg``
    One file per message: a header line ``MPS2 <n> <crc>\\n``, then ``n`` bytes of envelope
    JSON, then the message data, whose CRC-32 is ``crc`` (files of earlier versions have the
    header ``MPS1 <n>\\n`` and no checksum; they are still read). Written under a temporary
    name, fsynced, then renamed into place, so a ``.msg`` file is complete or absent: recovery
    never takes half a message for real.
``<queue-id>.state``
    The latest envelope (per-recipient state, attempts, next attempt), rewritten atomically by
    :meth:`Spool.save_state`. When present it wins over the envelope inside the ``.msg`` file.
``.tmp-*``
    Files being written; recovery deletes them (their SMTP transaction never got its 250).
``corrupt/``
    Files recovery could not read as a message (a disk fault or a foreign file), set aside for
    a human to look at and deleted after ``corrupt_retention`` (default 24 h): they may hold
    mail, which the relay keeps no longer than it must. A message file that starts with zeros
    is a removed message's whose removal a crash cut short during its zero-fill: deleted.

``mta-sts-policies.json``
    Only in the spool root (``spool.directory``), by the delivery queue, not the spool: the
    MTA-STS policies of recipient domains (no mail data; see ``delivery.mtasts``).
``destination-suspensions.json``
    Likewise: the delivery destinations suspended by any worker (``delivery.suspensions``).

``free/``
    Files of removed messages, overwritten with zeros, waiting to be reused by a commit or a
    state update (at most 256; more, and files larger than 256 KB, are unlinked). Deleted at
    start: after a crash their zeros may not have reached the disk.

Nothing else is kept. A message whose recipients are all final is deleted at once: its file
and its state file are renamed into ``free/`` and overwritten with zeros there, so no byte of a
delivered message's body, subject or recipients stays in the spool tree. A commit then writes
over such a file instead of creating one: its blocks are allocated already, so no inode is
created or freed and, when the size is unchanged, its fdatasync writes data only. On ext4 under
churn (a commit, read and removal cycle, 32 at a time, while another process deleted a million
files on the same filesystem) a cycle took 128-162 us of CPU this way against 332-348 us when
every removed file was unlinked and every commit created one (measured by
``_MAX_FREE = 0``). A scrubbed file is never recovered as mail: recovery reads only ``.msg``
names, and every envelope names its own queue id and size, which recovery checks (a file that
fails the check is set aside in ``corrupt/``). A state update is not synced, so after a power
cut a ``.state`` name may point at a reused file whose new content never reached the disk and
which still holds an older file's bytes (a removed message's, body included): a state file that
is not a valid envelope of its own message is deleted when read, and the commit-time envelope
used instead. A disk that tears a write (a power cut while it writes the sectors of a page,
or one that acknowledges a flush it has not done) can leave a reused message file with its new
header and envelope but some sectors of an older file's bytes: every read of the data checks
its CRC-32 (about 1 us for a few KB), and a message whose data does not match is never
delivered: its envelope alone is set aside in ``corrupt/<id>.torn`` (the torn bytes may be
another message's and are not kept), its files are scrubbed, and the read raises
:class:`SpoolDataLost`, on which the delivery queue fails the undecided recipients and sends
the sender a DSN.

Group commit: a commit writes its file on the event loop (a few KB into the page cache cost
microseconds; a thread hand-off costs more, in wake-ups and GIL traffic) and joins the open batch.
One thread call per batch then makes the whole batch durable: it starts write-back of every file,
fdatasyncs each, renames each into place, and fsyncs the directory once. While that call runs,
new commits gather in the next batch, which starts the moment the running one ends: a lone
commit is not delayed, and a burst shares one directory fsync and one thread hand-off. Messages
larger than ``LOOP_WRITE_LIMIT`` are written in a thread, so a big message does not stall the
loop.

Removals (a rename and a small overwrite) and non-durable state updates (small writes and
renames) are done on the loop too. The spool keeps in memory which messages are live and which
have a state file, so it never asks the disk about a file it knows is absent.

State updates are serialized on the loop and numbered there; a durable one is written in a
thread, and is not renamed into place when a later update already was, nor left behind when
its message was removed or erased while it ran.

Delivery semantics are at-least-once: a state update is not fsynced by default (losing one only
repeats an attempt), and a message is removed only when no recipient is pending. A crash after a
delivery but before its state reached the disk redelivers that recipient: a duplicate is possible,
a loss is not.

``fsync=False`` skips every fsync. It is unsafe (a power cut loses accepted mail) and exists only
to measure what durability costs.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import ctypes
import io
import itertools
import json
import logging
import os
import random
import secrets
import sys
import threading
import time
import weakref
import zlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from .metrics import RelayMetrics

log = logging.getLogger(__name__)

RecipientStatus = Literal["pending", "delivered", "bounced", "expired", "suppressed"]
_RECIPIENT_STATUSES = ("pending", "delivered", "bounced", "expired", "suppressed")

_MAGIC = b"MPS1 "  # format 1: "MPS1 <envelope length>\n"
_MAGIC2 = b"MPS2 "  # format 2: "MPS2 <envelope length> <CRC-32 of the data>\n"
_TORN = ".torn"
_MSG = ".msg"
_STATE = ".state"
_TMP = ".tmp-"
HANDOFF_LEDGER = "handoffs.log"
"""drain.HandoffLedger's file, beside the messages (moved with them when a spool is adopted)."""
_CORRUPT = "corrupt"
# Scrubbed files of removed messages, reused by commits; emptied at start.
_FREE = "free"
# At most this many scrubbed files wait for reuse; files larger than LOOP_WRITE_LIMIT are
# unlinked rather than scrubbed.
_MAX_FREE = 256
_ZEROS = bytes(64 * 1024)
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_MAX_HEADER = 64
# A message file whose first bytes are all zeros was being scrubbed when the relay stopped.
_SCRUBBED_HEAD = 16
# Recovery reads this much of a message file at once: the header line and a typical envelope.
_HEAD_READ = 8192
# Larger messages are written in a thread rather than on the event loop.
LOOP_WRITE_LIMIT = 256 * 1024


class SpoolError(Exception):
    """The spool cannot store or update a message (disk full, I/O error, permissions)."""


class SpoolDataLost(SpoolError):
    """A message's data failed its checksum (a write torn by a crash): it is lost for good.
    Its envelope is set aside in ``corrupt/`` and its files are gone; the delivery queue fails
    its undecided recipients and tells the sender."""


@dataclass(slots=True)
class Recipient:
    address: str
    status: RecipientStatus = "pending"
    attempts: int = 0
    last_response: str | None = None
    # A DSN reporting this recipient's final status is owed to the sender and not yet spooled.
    # The spool keeps a message while any recipient is pending or owed a DSN, across restarts.
    dsn_owed: bool = False
    # RFC 3461, as given at RCPT: NOTIFY (["NEVER"] or some of SUCCESS, FAILURE, DELAY; None:
    # not given) and ORCPT ("rfc822;<address>", decoded).
    notify: list[str] | None = None
    orcpt: str | None = None

    def wants(self, kind: Literal["SUCCESS", "FAILURE", "DELAY"]) -> bool:
        """Does the sender want a DSN of this kind for this recipient? Without NOTIFY:
        failures and delays (RFC 3461 §4.1 leaves the default to the relay)."""
        if self.notify is None:
            return kind != "SUCCESS"
        return kind in self.notify


@dataclass(slots=True, weakref_slot=True)
class QueuedMessage:
    queue_id: str
    mail_from: str
    recipients: list[Recipient]
    received_at: float
    size: int
    message_id: str | None
    credential: str | None
    sender_domain: str
    listener: str
    next_attempt: float
    attempts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status == "pending"]

    def needs_work(self) -> bool:
        """A recipient is pending, or a DSN is owed: the message must stay in the spool."""
        return any(r.status == "pending" or r.dsn_owed for r in self.recipients)

    def to_json(self) -> bytes:
        doc = {
            "queue_id": self.queue_id, "mail_from": self.mail_from,
            "recipients": [
                {"address": r.address, "status": r.status, "attempts": r.attempts,
                 "last_response": r.last_response, **({"dsn_owed": True} if r.dsn_owed else {}),
                 **({"notify": r.notify} if r.notify is not None else {}),
                 **({"orcpt": r.orcpt} if r.orcpt is not None else {})}
                for r in self.recipients
            ],
            "received_at": self.received_at, "size": self.size, "message_id": self.message_id,
            "credential": self.credential, "sender_domain": self.sender_domain,
            "listener": self.listener, "next_attempt": self.next_attempt,
            "attempts": self.attempts, "extra": self.extra,
        }
        return _ENCODER.encode(doc).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> QueuedMessage:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("envelope is not an object")
        recipients = []
        for r in doc.pop("recipients"):
            if r.get("status") not in _RECIPIENT_STATUSES:
                raise ValueError(f"unknown recipient status {r.get('status')!r}")
            recipients.append(Recipient(**r))
        # Values shared by many messages are kept once in memory (a large queue holds many).
        for name in ("sender_domain", "listener", "credential", "mail_from"):
            value = doc.get(name)
            if isinstance(value, str):
                doc[name] = sys.intern(value)
        return cls(recipients=recipients, **doc)


# The mark in an envelope's ``extra`` of a message on hold (``mailplane queue hold``): not
# scheduled until released, across restarts.
HELD = "held"


class Due(NamedTuple):
    """What recovery hands to the delivery queue for a message: its id, next attempt and
    whether it is on hold. The envelope itself is read again (:meth:`Spool.load`) when the
    message falls due."""

    queue_id: str
    next_attempt: float
    held: bool = False


@dataclass(frozen=True)
class SpoolErasure:
    """What :meth:`Spool.erase_address` removed, for the erasure report."""

    recipients_removed: int = 0  # recipient entries dropped from messages kept for others
    messages_deleted: int = 0  # messages deleted: sent by the address, or left with no recipient
    deleted_ids: tuple[str, ...] = ()  # their queue ids (the delivery queue forgets them)


def new_queue_id(rng: random.Random | None = None, *, after: int = 0) -> str:
    """Sortable by time (milliseconds, 10 Crockford base32 digits) and unique across processes
    (50 random bits): ``0J8Z3K4M7Q`` + ``X2C9T4PB1R``.

    ``rng``: a generator seeded from the OS once (``os.urandom`` costs ~0.2 ms per call on these
    VMs, which would cap commits at a few thousand per second). ``after``: the number of the
    previous id (``queue_id_number``); the new one is greater, so ids of one spool sort in
    commit order even within a millisecond."""
    return encode_queue_id(_next_queue_number(rng, after))


def _next_queue_number(rng: random.Random | None, after: int) -> int:
    bits = (rng or _SYSTEM_RANDOM).getrandbits(50)
    return max((time.time_ns() // 1_000_000) << 50 | bits, after + 1)


def encode_queue_id(n: int) -> str:
    """The 20 Crockford base32 digits of a queue id's number (below 2**100): base64's encoder
    in C, then its alphabet mapped onto Crockford's (a digit loop in Python cost 4 us)."""
    return base64.b32encode((n << 4).to_bytes(13, "big"))[:20].translate(
        _TO_CROCKFORD).decode("ascii")


def queue_id_number(qid: str) -> int:
    n = 0
    for c in qid:
        n = n << 5 | _CROCKFORD.index(c)
    return n


_SYSTEM_RANDOM = random.SystemRandom()
_TO_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _CROCKFORD.encode())
# One compact encoder for every envelope (json.dumps with options builds a new one per call).
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def valid_queue_id(qid: str) -> bool:
    return len(qid) == 20 and not qid.strip(_CROCKFORD)


_valid_queue_id = valid_queue_id


def _load_sync_file_range() -> Callable[[int], None] | None:
    """``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)``: start write-back without waiting,
    so the data of a whole batch goes to the disk together before the fdatasyncs wait for it
    one by one. Linux only; without it the fdatasyncs alone are just as safe, only slower."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start_writeback(fd: int) -> None:
        fn(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE; a failure here only means no head start

    return start_writeback


_START_WRITEBACK = _load_sync_file_range()


class _Pending:
    """A commit whose file is written (``fd`` still open) and waits for its batch's fsyncs."""

    __slots__ = ("error", "fd", "final", "future", "tmp")

    def __init__(self, fd: int, tmp: str, final: str, future: asyncio.Future[None]) -> None:
        self.fd = fd
        self.tmp = tmp
        self.final = final
        self.future = future
        self.error: str | None = None


class Spool:
    def __init__(
        self,
        directory: str,
        *,
        fsync: bool,
        metrics: RelayMetrics,
        threads: int = 4,
        corrupt_retention: float = 86400.0,
    ) -> None:
        self.directory = Path(directory)
        self.corrupt_retention = corrupt_retention
        self.fsync = fsync
        self.metrics = metrics
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._batch: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._dir_fd: int | None = None
        self._rng = random.Random(os.urandom(32))  # uniqueness, not secrecy
        self._corrupt_dir = self.directory / _CORRUPT
        self._corrupt_purger: asyncio.Task[None] | None = None
        # String prefix for the per-message paths: pathlib costs more than the system calls.
        self._d = str(self.directory) + os.sep
        # Queue ids whose .msg file is in place, and those that also have a .state file: the
        # loop's view, so removals and state updates need no stat or failing rename.
        self._live: set[str] = set()
        self._states: set[str] = set()
        # The envelope objects of live messages that are in memory anywhere (returned by
        # commit(), start() or load() and still referenced, e.g. by a delivery attempt); one
        # object per message, so erasure edits the very object an attempt works on. Weak: an
        # envelope leaves memory when the delivery queue drops it (a deferred message is
        # scheduled by queue id and due time only).
        self._envelopes: weakref.WeakValueDictionary[str, QueuedMessage] = (
            weakref.WeakValueDictionary())
        # Envelopes whose latest state could not be written (save_state failed): kept in
        # memory until a later save succeeds, so the state is not lost while the relay runs.
        self._pinned: dict[str, QueuedMessage] = {}
        # Lazy recovery: the message files listed at start and not read yet.
        self._unread: list[str] = []
        self._stale_states: list[str] = []
        self._recovered = asyncio.Event()
        self._last_id = 0  # number of the last queue id issued: ids increase
        # Scrubbed files ready for reuse: (path, size). deque append/pop are atomic, so the
        # threads that write large messages and durable states share it without a lock.
        self._free: collections.deque[tuple[str, int]] = collections.deque()
        self._free_names = itertools.count()
        self._f = str(self.directory / _FREE) + os.sep
        self.recycled = 0  # commits and state writes that reused a scrubbed file
        # State writes are numbered on the loop; the latest number renamed into place per
        # message, so a slower thread's older state never replaces a newer one.
        self._state_versions = itertools.count()
        self._state_written: dict[str, int] = {}
        self._state_lock = threading.Lock()
        # Counters for tests and benchmarks: how many fsyncs a workload cost.
        self._count_lock = threading.Lock()
        self.file_fsyncs = 0
        self.dir_fsyncs = 0

    # ---------------------------------------------------------------- lifecycle

    async def start(self, *, lazy: bool = False) -> list[QueuedMessage]:
        """Create the directory, delete temp files, return every message with pending
        recipients or an owed DSN (oldest first).

        ``lazy``: only list the directory (a second or two for a million messages) and return
        nothing; :meth:`recover` then reads the envelopes in batches, in a thread, while the
        relay already accepts mail. Commits, reads, state updates and removals work at once;
        :meth:`erase_address` waits until every envelope is read."""
        self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="spool")
        try:
            if lazy:
                self._unread, self._stale_states = await self._run(self._list)
                recovered: list[QueuedMessage] = []
            else:
                recovered = await self._run(self._recover)
                for msg in recovered:
                    self._envelopes[msg.queue_id] = msg
                self._recovered.set()
        except OSError as exc:
            raise SpoolError(f"spool {self.directory}: cannot open: {exc.strerror}") from exc
        self._corrupt_purger = asyncio.get_running_loop().create_task(
            self._purge_corrupt_loop(), name="spool-corrupt-purge")
        return recovered

    async def recover(self, batch: int = 2000) -> AsyncIterator[list[Due]]:
        """After ``start(lazy=True)``: the messages that need work, in batches, oldest first,
        as queue id and next attempt (the envelopes are read here and dropped; :meth:`load`
        reads one again when it is needed). A batch is read in a thread; a message committed
        since the start is not among them."""
        try:
            start = 0
            while start < len(self._unread):
                chunk = self._unread[start:start + batch]
                start += batch
                try:
                    due, final, bad = await self._run(self._due_batch, chunk)
                except OSError as exc:
                    raise SpoolError(f"spool recovery failed: {exc.strerror or exc}") from exc
                self._apply_batch(final, bad)
                if due:
                    yield due
            self._unread = []
            await self._run(self._end_recovery, self._stale_states)
        finally:
            self._recovered.set()

    async def close(self) -> None:
        if self._corrupt_purger is not None:
            self._corrupt_purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._corrupt_purger
            self._corrupt_purger = None
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    # ---------------------------------------------------------------- API

    async def commit(
        self,
        *,
        mail_from: str,
        recipients: list[str],
        data: bytes,
        message_id: str | None,
        credential: str | None,
        sender_domain: str,
        listener: str,
        extra: dict[str, Any] | None = None,
        dsn: list[tuple[tuple[str, ...] | None, str | None]] | None = None,
    ) -> QueuedMessage:
        """Store a message; durable when this returns. Raises SpoolError, leaving nothing.
        ``extra`` starts the envelope's ``extra`` (the ingress records ``smtputf8``, ``body``
        and ``eight_bit`` there, and the RFC 3461 ``dsn_ret`` and ``envid``). ``dsn``: the
        RFC 3461 NOTIFY and ORCPT of each recipient, in order."""
        if self._executor is None:
            raise SpoolError("spool is not started")
        started = time.perf_counter()
        now = time.time()
        msg = QueuedMessage(
            queue_id=self._new_queue_id(),
            mail_from=mail_from,
            recipients=[Recipient(a) for a in recipients] if not dsn else [
                Recipient(a, notify=None if n is None else list(n), orcpt=o)
                for a, (n, o) in zip(recipients, dsn, strict=True)],
            received_at=now,
            size=len(data),
            message_id=message_id,
            credential=credential,
            sender_domain=sender_domain,
            listener=listener,
            next_attempt=now,
            extra=dict(extra or {}),
        )
        return await self._store(msg, data, started)

    def new_queue_id(self) -> str:
        """A queue id for a message about to be stored here (`commit_handoff`)."""
        return self._new_queue_id()

    async def commit_handoff(self, envelope: QueuedMessage, data: bytes, *,
                             queue_id: str | None = None) -> QueuedMessage:
        """Store a message handed over by another relay of the pool (it drains): its envelope
        as it was there — recipients and their states, attempts, reception time, credential,
        extra — under a new queue id of this spool (`queue_id`, from `new_queue_id`), due at
        once. Durable when this returns; raises SpoolError, leaving nothing."""
        if self._executor is None:
            raise SpoolError("spool is not started")
        started = time.perf_counter()
        msg = QueuedMessage(
            queue_id=queue_id or self._new_queue_id(),
            mail_from=envelope.mail_from,
            recipients=[Recipient(r.address, r.status, r.attempts, r.last_response, r.dsn_owed)
                        for r in envelope.recipients],
            received_at=envelope.received_at,
            size=len(data),
            message_id=envelope.message_id,
            credential=envelope.credential,
            sender_domain=envelope.sender_domain,
            listener=envelope.listener,
            next_attempt=time.time(),
            attempts=envelope.attempts,
            extra=dict(envelope.extra),
        )
        return await self._store(msg, data, started)

    async def _store(self, msg: QueuedMessage, data: bytes, started: float) -> QueuedMessage:
        head = _head(msg.to_json(), data)
        name = msg.queue_id + _MSG
        final = self._d + name
        try:
            if len(data) > LOOP_WRITE_LIMIT:
                tmp, fd = await self._run(self._write_open, name, head, data)
            else:
                tmp, fd = self._write_open(name, head, data)
        except OSError as exc:
            raise SpoolError(f"spool write failed: {exc.strerror or exc}") from exc
        if not self.fsync:
            os.close(fd)
            try:
                os.rename(tmp, final)
            except OSError as exc:
                _unlink_quiet(tmp)
                raise SpoolError(f"spool write failed: {exc.strerror or exc}") from exc
        else:
            pending = _Pending(fd, tmp, final, asyncio.get_running_loop().create_future())
            self._batch.append(pending)
            if self._flusher is None:
                self._flusher = asyncio.get_running_loop().create_task(
                    self._flush(), name="spool-group-commit")
            await asyncio.shield(pending.future)
            if pending.error is not None:
                raise SpoolError(pending.error)
        self._live.add(msg.queue_id)
        self._envelopes[msg.queue_id] = msg
        self.metrics.spool_commit_latency.observe(time.perf_counter() - started)
        return msg

    def read(self, queue_id: str) -> bytes:
        """The message data (blocking; a small file read)."""
        try:
            # One read of the whole file (a buffered file object adds fstat, lseek and reads).
            fd = os.open(self._d + queue_id + _MSG, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                raw = os.read(fd, size + 1)
                if len(raw) != size:  # a short read, or a foreign writer: read on to the end
                    chunks = [raw]
                    while chunk := os.read(fd, 1 << 20):
                        chunks.append(chunk)
                    raw = b"".join(chunks)
            finally:
                os.close(fd)
            offset, _, crc = _read_header_crc(io.BytesIO(raw))
        except (OSError, ValueError) as exc:
            raise SpoolError(f"spool read of {queue_id} failed: {exc}") from exc
        if crc is not None and zlib.crc32(memoryview(raw)[offset:]) != crc:
            self._set_aside_torn(queue_id, raw[:offset])
            raise SpoolDataLost(f"spool read of {queue_id} failed: its data does not match its "
                             f"checksum (a write torn by a crash); not delivered, its envelope "
                             f"set aside in {_CORRUPT}/{queue_id}{_TORN}")
        return raw[offset:]

    def _set_aside_torn(self, queue_id: str, head: bytes) -> None:
        """A message whose data is torn: its envelope (the latest one known) goes to
        ``corrupt/`` for a human, without any data byte (some may be another message's), and
        its files are scrubbed like a removed message's."""
        held = self._envelopes.get(queue_id) or self._pinned.get(queue_id)
        envelope = held.to_json() if held is not None else head
        log.error("spool: data of %s does not match its checksum (a write torn by a crash); "
                  "not delivered, envelope set aside in %s/", queue_id, _CORRUPT)
        try:
            self._corrupt_dir.mkdir(exist_ok=True)
            with open(self._corrupt_dir / (queue_id + _TORN), "wb") as f:
                f.write(envelope)
        except OSError:
            log.exception("spool: cannot set aside the envelope of %s", queue_id)
        self._remove(queue_id)
        self.metrics.spool_torn_messages.inc()
        self._count_corrupt()

    def queue_ids(self) -> list[str]:
        """The queue ids of the messages in the spool, oldest first."""
        return sorted(self._live)

    def envelope(self, queue_id: str) -> QueuedMessage | None:
        """The current envelope of a message: the object in memory when the spool holds one,
        else read from its files (blocking; a small read). None when the message is gone or
        unreadable. Never the message data."""
        held = self._envelopes.get(queue_id)
        if held is not None:
            return held
        if queue_id not in self._live:
            return None
        try:
            with open(self._d + queue_id + _MSG, "rb") as f:
                _, raw = _read_header(f)
            msg = QueuedMessage.from_json(raw)
            if queue_id in self._states:
                with open(self._d + queue_id + _STATE, "rb") as f:
                    msg = QueuedMessage.from_json(f.read())
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return msg if msg.queue_id == queue_id else None

    def load(self, queue_id: str) -> QueuedMessage | None:
        """The envelope of a live message: the object already in memory if there is one
        (so that every holder sees the same state), else read from its files (blocking; a
        small read). None if the message is gone, or its content is not a message (then set
        aside in corrupt/, as recovery does). SpoolError when the files cannot be read now
        (e.g. too many open files, an I/O error): nothing is set aside for that."""
        if queue_id not in self._live:
            return None
        msg = self._envelopes.get(queue_id)
        if msg is not None:
            return msg
        try:
            msg = self._read_envelope(queue_id, state_errors=True)
        except FileNotFoundError:
            msg = None
        except OSError as exc:
            raise SpoolError(f"spool read of {queue_id} failed: {exc.strerror or exc}") from exc
        except (ValueError, TypeError, KeyError) as exc:
            self._quarantine(Path(self._d + queue_id + _MSG), exc)
            if queue_id in self._states:
                # Its state file names the recipients too: it goes (and is purged) with it.
                with contextlib.suppress(OSError):
                    os.rename(self._d + queue_id + _STATE,
                              self._corrupt_dir / (queue_id + _STATE))
                    os.utime(self._corrupt_dir / (queue_id + _STATE))
            msg = None
        if msg is None:
            self._live.discard(queue_id)
            if queue_id in self._states:
                self._states.discard(queue_id)
                _unlink_quiet(self._d + queue_id + _STATE)
            return None
        self._envelopes[queue_id] = msg
        return msg

    async def save_state(self, msg: QueuedMessage, *, durable: bool = False) -> None:
        """Rewrite the envelope atomically. Not fsynced unless ``durable``: a lost update only
        repeats an attempt (at-least-once). When the write fails the envelope is kept in memory
        (:meth:`load` returns it) until a later one succeeds."""
        qid = msg.queue_id
        if qid not in self._live:
            return  # removed meanwhile (or never committed): a state file would be an orphan
        # Serialized here, on the loop: a thread must not read an envelope the loop may be
        # editing, and the version orders this write against later ones.
        envelope = msg.to_json()
        version = next(self._state_versions)
        try:
            if durable and self.fsync:
                await self._run(self._write_state, qid, envelope, version, True)
            else:
                self._write_state(qid, envelope, version, False)
        except OSError as exc:
            if qid in self._live:
                self._pinned[qid] = msg
            raise SpoolError(f"spool state update of {qid} failed: {exc.strerror}") from exc
        if qid not in self._live:
            # Removed (delivered, deleted, erased) while the write ran in a thread: the state
            # file it left would outlive the message, naming its recipients.
            self._discard(self._d + qid + _STATE)
            self._state_written.pop(qid, None)
            return
        self._states.add(qid)
        self._pinned.pop(msg.queue_id, None)

    async def save_states(self, msgs: list[QueuedMessage]) -> None:
        """:meth:`save_state` with ``durable=True`` for many messages, as one group commit: the
        state files are written, their write-back started together, fdatasynced one by one,
        renamed into place, and the directory fsynced once (``mailplane queue hold`` of a
        destination with a large backlog: one directory fsync per call, not per message).
        On failure none is counted written and each envelope is kept in memory, as for
        :meth:`save_state`."""
        items = [(m.queue_id, m.to_json(), next(self._state_versions))
                 for m in msgs if m.queue_id in self._live]
        if not items:
            return
        try:
            await self._run(self._write_states, items, self.fsync)
        except OSError as exc:
            for m in msgs:
                if m.queue_id in self._live:
                    self._pinned[m.queue_id] = m
            raise SpoolError(f"spool state update of {len(items)} message(s) failed: "
                             f"{exc.strerror or exc}") from exc
        for qid, _, _ in items:
            if qid not in self._live:  # removed while the thread ran
                self._discard(self._d + qid + _STATE)
                self._state_written.pop(qid, None)
                continue
            self._states.add(qid)
            self._pinned.pop(qid, None)

    def _write_states(self, items: list[tuple[str, bytes, int]], sync: bool) -> None:
        written: list[tuple[str, int, str, int]] = []
        try:
            for qid, envelope, version in items:
                tmp, fd = self._write_open(f"{secrets.token_hex(4)}-{qid}{_STATE}", envelope,
                                           b"")
                written.append((qid, version, tmp, fd))
            if sync:
                if _START_WRITEBACK is not None:
                    for *_, fd in written:
                        _START_WRITEBACK(fd)
                for *_, fd in written:
                    os.fdatasync(fd)
                with self._count_lock:
                    self.file_fsyncs += len(written)
        except BaseException:
            for _, _, tmp, fd in written:
                os.close(fd)
                _unlink_quiet(tmp)
            raise
        for *_, fd in written:
            os.close(fd)
        with self._state_lock:
            for n, (qid, version, tmp, _) in enumerate(written):
                if self._state_written.get(qid, -1) > version:
                    self._discard(tmp)  # superseded: scrubbed like any removed file
                    continue
                try:
                    os.rename(tmp, self._d + qid + _STATE)
                except OSError:
                    for _, _, rest, _ in written[n:]:
                        _unlink_quiet(rest)
                    raise
                self._state_written[qid] = version
        if sync:
            self._fsync_dir()

    async def remove(self, queue_id: str) -> None:
        """Forget a message whose recipients are all final."""
        try:
            self._remove(queue_id)
        except OSError as exc:
            raise SpoolError(f"spool remove of {queue_id} failed: {exc.strerror}") from exc

    async def erase_address(self, address: str) -> SpoolErasure:
        """Erase an address from the spool, durably when this returns.

        Every message whose envelope sender is ``address`` is deleted; the address is removed
        from the recipients of every other message (whatever their status), and a message left
        without recipients is deleted. A message kept for its other recipients is rewritten
        (new file, fdatasynced, renamed over the old one; its state file rewritten too), so no
        file in the spool names the address afterwards; the directory is fsynced at the end.
        Addresses compare case-insensitively. Every live message is looked at: envelopes in
        memory, and the files of the others (read in a thread; a deferred message's envelope
        is not kept in memory). Envelope objects are edited in place, so a delivery attempt
        holding one sees the change at once: a deleted message is left with no recipient and
        a null sender (nothing more is sent, logged or bounced for it).

        The message data is the sender's and is not edited: a copy still being delivered to
        others keeps the headers it was submitted with (which may name the address) until it
        is final, when it is deleted. A message committed while this runs is not covered."""
        if self._executor is None:
            raise SpoolError("spool is not started")
        await self._recovered.wait()  # every envelope in memory, so none escapes
        if self._unread:
            raise SpoolError("spool recovery did not finish: erasure would miss messages")
        key = address.casefold()
        # Strong references for the whole erasure: while it runs, load() returns these very
        # objects, so an attempt starting meanwhile works on the edited envelope.
        candidates = dict(self._envelopes.items())
        others = [qid for qid in self._live if qid not in candidates]
        try:
            found, bad = await self._run(self._scan, others, key)
        except OSError as exc:
            raise SpoolError(f"spool erasure failed: {exc.strerror or exc}") from exc
        for qid in bad:
            if qid in self._live and qid not in self._envelopes:
                # Unreadable: set aside (and purged) as recovery and load() do.
                self._quarantine(Path(self._d + qid + _MSG), ValueError("unreadable"))
                self._live.discard(qid)
                if qid in self._states:
                    self._states.discard(qid)
                    _unlink_quiet(self._d + qid + _STATE)
        for msg in found:
            if msg.queue_id not in self._live:
                continue  # removed while the files were read
            # Loaded meanwhile by an attempt: that object is the one to edit.
            current = self._envelopes.setdefault(msg.queue_id, msg)
            candidates[msg.queue_id] = current
        removed = 0
        deleted: list[str] = []
        rewrite: list[QueuedMessage] = []
        for msg in list(candidates.values()):
            if msg.mail_from.casefold() == key:
                deleted.append(msg.queue_id)
                continue
            keep = [r for r in msg.recipients if r.address.casefold() != key]
            # RFC 3461 parameters may name the address too: ORCPT as a recipient's original
            # address (the recipient stays, its ORCPT goes), ENVID as free text.
            named = [r for r in keep if (r.orcpt or "").partition(";")[2].casefold() == key]
            envid = msg.extra.get("envid")
            envid_named = isinstance(envid, str) and key in envid.casefold()
            if len(keep) == len(msg.recipients) and not named and not envid_named:
                continue
            for r in named:
                r.orcpt = None
            if envid_named:
                del msg.extra["envid"]
            removed += len(msg.recipients) - len(keep)
            if not keep:
                deleted.append(msg.queue_id)
                continue
            msg.recipients[:] = keep
            _scrub(msg.extra, key)
            rewrite.append(msg)
        try:
            for qid in deleted:
                msg = candidates[qid]
                msg.recipients.clear()
                msg.mail_from = ""
                msg.extra.clear()
                self._remove(qid)
            for msg in rewrite:
                await self._rewrite(msg)
            if (deleted or rewrite) and self.fsync:
                await self._run(self._fsync_dir)
        except OSError as exc:
            raise SpoolError(f"spool erasure failed: {exc.strerror or exc}") from exc
        return SpoolErasure(recipients_removed=removed, messages_deleted=len(deleted),
                            deleted_ids=tuple(deleted))

    def _scan(self, qids: list[str], key: str) -> tuple[list[QueuedMessage], list[str]]:
        """The envelopes among these messages that name ``key`` (a casefolded address) as
        sender or recipient, and the messages whose files cannot be read (thread)."""
        # Cheap pre-check on the raw envelope when the address is plain ASCII (JSON leaves it
        # as is): most envelopes are not parsed at all.
        needle = key.encode() if key.isascii() and not set(key) & set('"\\') else None
        found: list[QueuedMessage] = []
        bad: list[str] = []
        for qid in qids:
            if needle is not None:
                try:
                    if not self._mentions(qid, needle):
                        continue
                except FileNotFoundError:
                    continue
                except (OSError, ValueError):
                    pass  # read properly below
            try:
                msg = self._read_envelope(qid)
            except FileNotFoundError:
                continue  # removed meanwhile
            except (OSError, ValueError, TypeError, KeyError):
                bad.append(qid)
                continue
            if msg.mail_from.casefold() == key or any(
                    r.address.casefold() == key
                    or (r.orcpt or "").partition(";")[2].casefold() == key
                    for r in msg.recipients) or key in str(msg.extra.get("envid", "")).casefold():
                found.append(msg)
        return found, bad

    def _mentions(self, qid: str, needle: bytes) -> bool:
        """Whether the envelope in the message file, or the state file, may name ``needle``
        (lower-cased ASCII). An envelope with escaped non-ASCII text may (some characters
        casefold to ASCII ones): it is parsed."""
        fd = os.open(self._d + qid + _MSG, os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = os.read(fd, _HEAD_READ)
        finally:
            os.close(fd)
        _, envelope = _read_header(io.BytesIO(head))  # ValueError: a large envelope
        if needle in envelope.lower() or b"\\u" in envelope:
            return True
        if qid in self._states:
            try:
                with open(self._d + qid + _STATE, "rb") as f:
                    state = f.read()
            except FileNotFoundError:
                return False
            return needle in state.lower() or b"\\u" in state
        return False

    async def _rewrite(self, msg: QueuedMessage) -> None:
        """Replace the message file with one carrying the current envelope (same data)."""
        qid = msg.queue_id
        envelope = msg.to_json()
        tmp = await self._run(self._write_rewritten, qid, envelope)
        if qid not in self._live:  # delivered and removed meanwhile
            _unlink_quiet(tmp)
            return
        try:
            os.rename(tmp, self._d + qid + _MSG)
        except OSError:
            _unlink_quiet(tmp)
            raise
        if qid in self._states:
            # The old state file names the address too: replace it with the current envelope.
            self._write_state(qid, msg.to_json(), next(self._state_versions), False)

    def _write_rewritten(self, qid: str, envelope: bytes) -> str:
        with open(self._d + qid + _MSG, "rb") as f:
            offset, _ = _read_header(f)
            f.seek(offset)
            data = f.read()
        head = _head(envelope, data)
        tmp, fd = self._write_open(f"{secrets.token_hex(4)}-{qid}{_MSG}", head, data)
        try:
            if self.fsync:
                os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quiet(tmp)
            raise
        os.close(fd)
        return tmp

    # ---------------------------------------------------------------- group commit

    def _new_queue_id(self) -> str:
        n = self._last_id = _next_queue_number(self._rng, self._last_id)
        return encode_queue_id(n)

    async def _flush(self) -> None:
        """Make batch after batch durable, one thread call each, until no commit waits."""
        try:
            while self._batch:
                batch, self._batch = self._batch, []
                try:
                    await self._run(self._sync_batch, batch)
                except BaseException as exc:
                    for p in batch:
                        if p.error is None:
                            p.error = f"spool commit interrupted: {exc!r}"
                        if not p.future.done():
                            p.future.set_result(None)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for p in batch:
                    if not p.future.done():
                        p.future.set_result(None)
        finally:
            self._flusher = None
            # A cancelled flusher must not strand commits that joined meanwhile.
            for p in self._batch:
                p.error = "spool closed during commit"
                os.close(p.fd)
                _unlink_quiet(p.tmp)
                if not p.future.done():
                    p.future.set_result(None)
            self._batch = []

    # ---------------------------------------------------------------- blocking parts (threads)

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._executor is None:
            raise SpoolError("spool is not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _sync_batch(self, batch: list[_Pending]) -> None:
        """Write-back of every file started, then each file's data on disk before its rename,
        then one directory fsync: a ``.msg`` name never points at data that could be lost, and
        every name in the batch is durable when this returns without setting ``error``."""
        if _START_WRITEBACK is not None and len(batch) > 1:
            for p in batch:
                _START_WRITEBACK(p.fd)
        renamed: list[_Pending] = []
        for p in batch:
            try:
                os.fdatasync(p.fd)
            except OSError as exc:
                p.error = f"spool write failed: {exc.strerror or exc}"
            finally:
                os.close(p.fd)
            if p.error is not None:
                _unlink_quiet(p.tmp)
                continue
            try:
                os.rename(p.tmp, p.final)
            except OSError as exc:
                p.error = f"spool write failed: {exc.strerror or exc}"
                _unlink_quiet(p.tmp)
            else:
                renamed.append(p)
        with self._count_lock:
            self.file_fsyncs += len(batch)
        if not renamed:
            return
        try:
            self._fsync_dir()
        except OSError as exc:
            # The renames may reach the disk later; these commits answer 4xx, so the clients
            # retry, and the copies here must not be delivered too.
            for p in renamed:
                p.error = f"spool directory sync failed: {exc.strerror or exc}"
                _unlink_quiet(p.final)

    def _fsync_dir(self) -> None:
        if self._dir_fd is None:
            self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(self._dir_fd)
        with self._count_lock:
            self.dir_fsyncs += 1

    def _write_open(self, name: str, head: bytes, body: bytes) -> tuple[str, int]:
        """Write ``head + body`` to a scrubbed file for reuse, or else a new temporary file;
        its path and open fd."""
        recycled = self._write_recycled(head, body)
        if recycled is not None:
            return recycled
        tmp = self._d + _TMP + name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, head, body)
        except BaseException:
            os.close(fd)
            _unlink_quiet(tmp)
            raise
        return tmp, fd

    def _write_recycled(self, head: bytes, body: bytes) -> tuple[str, int] | None:
        """Overwrite a scrubbed file with this content (its blocks are allocated already, so
        a same-size write needs no new inode or block and its fdatasync no metadata); its path
        and open fd, or None when none is free."""
        try:
            path, old_size = self._free.pop()
        except IndexError:
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            _unlink_quiet(path)
            return None
        try:
            _write_all(fd, head, body)
            if len(head) + len(body) < old_size:
                os.ftruncate(fd, len(head) + len(body))
        except BaseException:
            os.close(fd)
            _unlink_quiet(path)
            raise
        with self._count_lock:
            self.recycled += 1
        return path, fd

    def _discard(self, path: str) -> None:
        """Delete a removed message's file from the spool: renamed into ``free/`` and
        overwritten with zeros there (no byte of the message stays in the spool tree), kept
        for reuse; unlinked when enough files wait, or when it is large."""
        if len(self._free) >= _MAX_FREE:
            _unlink_quiet(path)
            return
        target = self._f + str(next(self._free_names))
        try:
            os.rename(path, target)
        except OSError:
            # Gone already, or free/ removed under us: delete as before.
            _unlink_quiet(path)
            return
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                if size > LOOP_WRITE_LIMIT:
                    raise OSError("too large to scrub")
                offset = 0
                while offset < size:
                    offset += os.pwrite(fd, _ZEROS[:size - offset], offset)
            finally:
                os.close(fd)
        except OSError:
            _unlink_quiet(target)
            return
        self._free.append((target, size))

    def _write_state(self, qid: str, envelope: bytes, version: int, sync: bool) -> None:
        """Write a state file, unless a later version of it (taken on the loop after this
        one's) is in place already: two writes in threads may finish in either order."""
        name = qid + _STATE
        final = self._d + name
        tmp, fd = self._write_open(f"{secrets.token_hex(4)}-{name}", envelope, b"")
        try:
            if sync:
                os.fsync(fd)
                with self._count_lock:
                    self.file_fsyncs += 1
        except BaseException:
            os.close(fd)
            _unlink_quiet(tmp)
            raise
        os.close(fd)
        with self._state_lock:
            if self._state_written.get(qid, -1) > version:
                self._discard(tmp)  # superseded: scrubbed like any removed file
                return
            try:
                os.rename(tmp, final)
            except OSError:
                _unlink_quiet(tmp)
                raise
            self._state_written[qid] = version
        if sync:
            self._fsync_dir()

    def _remove(self, queue_id: str) -> None:
        # The message file first: a crash in between leaves an orphan state file, which recovery
        # deletes, never a state file that marks a live message delivered.
        self._live.discard(queue_id)
        self._envelopes.pop(queue_id, None)
        self._pinned.pop(queue_id, None)
        self._state_written.pop(queue_id, None)
        self._discard(self._d + queue_id + _MSG)
        if queue_id in self._states:
            self._states.discard(queue_id)
            self._discard(self._d + queue_id + _STATE)

    def _recover(self) -> list[QueuedMessage]:
        live, stale_states = self._list()
        messages, final, bad = self._load_batch(live)
        self._apply_batch(final, bad)
        self._end_recovery(stale_states)
        return messages

    def _list(self) -> tuple[list[str], list[str]]:
        """The first step of recovery: directories made, temp files deleted, the live
        message files listed (oldest first) and taken as live; and the state files without
        a message (deleted when recovery ends)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        # Scrubbed files of the last run: after a crash their zeros may not have reached the
        # disk, so they are deleted, not reused.
        _remove_tree_files(self.directory / _FREE)
        (self.directory / _FREE).mkdir()
        self._purge_corrupt()
        names = os.listdir(self.directory)
        live: set[str] = set()
        for name in names:
            if name.startswith(_TMP):
                _unlink_quiet(self.directory / name)
            elif name.endswith(_MSG) and _valid_queue_id(name[: -len(_MSG)]):
                live.add(name[: -len(_MSG)])
        states = {name[: -len(_STATE)] for name in names if name.endswith(_STATE)}
        self._live = set(live)
        self._states = states & live
        return sorted(live), sorted(states - live)

    def _load_batch(self, qids: list[str]
                    ) -> tuple[list[QueuedMessage], list[str], list[str]]:
        """Read these messages (file work only, safe in a thread while the loop runs): those
        that need work, those found final (their files deleted) and the unreadable ones (set
        aside in corrupt/ with their state file)."""
        messages: list[QueuedMessage] = []
        final: list[str] = []
        bad: list[str] = []
        for qid in qids:
            msg = self._load(qid)
            if msg is None:
                bad.append(qid)
                if qid in self._states:
                    # Its state file names the recipients too: it goes (and is purged) with it.
                    with contextlib.suppress(OSError):
                        os.rename(self._d + qid + _STATE, self._corrupt_dir / (qid + _STATE))
                        os.utime(self._corrupt_dir / (qid + _STATE))
                    self._count_corrupt()
            elif msg.needs_work():
                messages.append(msg)
            else:
                final.append(qid)
                _unlink_quiet(self._d + qid + _MSG)
                _unlink_quiet(self._d + qid + _STATE)
        return messages, final, bad

    def _due_batch(self, qids: list[str]) -> tuple[list[Due], list[str], list[str]]:
        """:meth:`_load_batch`, keeping of each message only what scheduling needs."""
        messages, final, bad = self._load_batch(qids)
        return ([Due(m.queue_id, m.next_attempt, bool(m.extra.get(HELD))) for m in messages],
                final, bad)

    def _apply_batch(self, final: list[str], bad: list[str]) -> None:
        for qid in final + bad:
            self._live.discard(qid)
            self._states.discard(qid)

    def _end_recovery(self, stale_states: list[str]) -> None:
        for qid in stale_states:
            if qid not in self._live:
                _unlink_quiet(self._d + qid + _STATE)
        if self.fsync:
            self._fsync_dir()

    def _load(self, qid: str) -> QueuedMessage | None:
        """The message's current envelope, or None when its file is unreadable (then set
        aside in corrupt/)."""
        try:
            return self._read_envelope(qid)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            # Committed files are complete (fsync before rename), so this is a disk fault or a
            # foreign file: keep it aside for a human rather than delete mail.
            self._quarantine(Path(self._d + qid + _MSG), exc)
            return None

    def _read_envelope(self, qid: str, *, state_errors: bool = False) -> QueuedMessage:
        """The envelope of a message file, or the state file's when there is one (raises
        OSError, ValueError, TypeError or KeyError on a missing or unreadable message file).
        ``state_errors``: a state file that exists but cannot be read now (too many open
        files, an I/O error) raises OSError too, rather than giving the commit-time envelope
        (which would undo deliveries and holds for a running relay)."""
        # Plain string paths and raw reads of the head only: recovery runs this per message.
        path = self._d + qid + _MSG
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = os.read(fd, _HEAD_READ)
            offset, envelope = _read_header(io.BytesIO(head))
            size = os.fstat(fd).st_size - offset
        except ValueError:
            if len(head) < _HEAD_READ:
                raise
            # A large envelope (many recipients): read the header through the file.
            os.lseek(fd, 0, os.SEEK_SET)
            with os.fdopen(os.dup(fd), "rb") as f:
                offset, envelope = _read_header(f)
            size = os.fstat(fd).st_size - offset
        finally:
            os.close(fd)
        msg = QueuedMessage.from_json(envelope)
        if msg.queue_id != qid or msg.size != size:
            raise ValueError("envelope does not match the file")
        if qid not in self._states:
            return msg
        state_path = self._d + qid + _STATE
        try:
            with open(state_path, "rb") as f:
                state = QueuedMessage.from_json(f.read())
        except FileNotFoundError:
            return msg
        except OSError:
            if state_errors:
                raise
            # Not readable now (e.g. too many open files): the commit-time envelope (at
            # recovery: duplicates, no loss), and the file stays for the next read.
            log.warning("spool: state file of %s unreadable, using the committed envelope", qid)
            return msg
        except (ValueError, TypeError, KeyError):
            state = None
        if state is None or state.queue_id != qid:
            # An unsynced state update cut by a crash. Its file may be a reused one whose new
            # content never reached the disk, so it may hold an older file's bytes: those of a
            # removed message, body included. It is deleted, and the commit-time envelope is
            # the safe fallback (every recipient pending again: duplicates, no loss).
            log.warning("spool: state file of %s is not this message's state (cut by a crash); "
                        "deleted, using the committed envelope", qid)
            _unlink_quiet(state_path)
            return msg
        return state

    def _quarantine(self, path: Path, exc: BaseException) -> None:
        if _scrubbed(path):
            # A removed message's file whose removal a crash undid, its zero-fill begun: what
            # is left of the message was delivered or bounced, and is not kept.
            log.warning("spool: %s was being deleted when the relay stopped; deleted",
                        path.name)
            _unlink_quiet(path)
            return
        log.error("spool: %s is not a valid message file (%s); moved to %s/", path.name,
                  type(exc).__name__, _CORRUPT)
        target = self._corrupt_dir
        try:
            target.mkdir(exist_ok=True)
            os.rename(path, target / path.name)
            # The purge counts the retention from the quarantine, not from the commit.
            os.utime(target / path.name)
        except OSError:
            log.exception("spool: cannot quarantine %s", path.name)
        self._count_corrupt()

    # ---------------------------------------------------------------- corrupt files

    async def _purge_corrupt_loop(self) -> None:
        interval = _purge_interval(self.corrupt_retention)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._run(self._purge_corrupt)
            except (OSError, SpoolError) as exc:
                log.error("spool: purge of %s/ failed: %s", _CORRUPT, exc)

    def _purge_corrupt(self, now: float | None = None) -> int:
        """Delete quarantined files older than ``corrupt_retention``; how many were deleted."""
        cutoff = (time.time() if now is None else now) - self.corrupt_retention
        purged = 0
        try:
            entries = list(os.scandir(self._corrupt_dir))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                    os.unlink(entry.path)
                    purged += 1
            except FileNotFoundError:
                continue
            except IsADirectoryError:
                continue
        if purged:
            log.warning("spool: deleted %d quarantined file(s) older than %ds from %s/",
                        purged, self.corrupt_retention, _CORRUPT)
            self.metrics.spool_corrupt_purged.inc(purged)
        self._count_corrupt()
        return purged

    def _count_corrupt(self) -> None:
        try:
            count = sum(1 for e in os.scandir(self._corrupt_dir) if e.is_file())
        except FileNotFoundError:
            count = 0
        self.metrics.spool_corrupt_files.set(count)


def _purge_interval(retention: float) -> float:
    """How often the quarantine is purged: four times per retention (a file outlives it by a
    quarter at most), not more than once a second, at least once an hour."""
    return min(max(retention / 4, 1.0), 3600.0)


def _scrub(value: Any, key: str) -> Any:
    """Drop ``key`` (a casefolded address) from the delivery side's per-address records in an
    envelope's ``extra``: dict keys and list items equal to it, at any depth."""
    if isinstance(value, dict):
        for k in [k for k in value if isinstance(k, str) and k.casefold() == key]:
            del value[k]
        for v in value.values():
            _scrub(v, key)
    elif isinstance(value, list):
        value[:] = [v for v in value if not (isinstance(v, str) and v.casefold() == key)]
        for v in value:
            _scrub(v, key)
    return value


def count_messages(directory: str | Path) -> int:
    """How many message files lie directly in ``directory`` (0 when it does not exist)."""
    try:
        return sum(1 for name in os.listdir(directory)
                   if name.endswith(_MSG) and _valid_queue_id(name[: -len(_MSG)]))
    except (FileNotFoundError, NotADirectoryError):
        return 0


def adopt(source: str | Path, target: str | Path, *, fsync: bool,
          remove_source: bool = True) -> int:
    """Move the spooled messages of ``source`` (a spool directory no process owns any more,
    e.g. ``w3`` after ``workers`` went from 4 to 2) into ``target``; the number moved.

    Both directories must be locked by the caller, and ``target`` not yet recovered. Each
    message file is renamed first, then its state file: a crash in between leaves the state
    file in ``source``, and the next adoption moves it too. Temp files are deleted, corrupt
    files join ``target``'s ``corrupt/`` (and its purge). Both directories are fsynced; with
    ``remove_source``, the emptied ``source`` (and its lock file) is removed."""
    src, dst = Path(source), Path(target)
    moved = 0
    names = sorted(os.listdir(src))
    for name in names:
        path = src / name
        if name.startswith(_TMP):
            _unlink_quiet(path)
        elif name.endswith(_MSG) and _valid_queue_id(name[: -len(_MSG)]):
            qid = name[: -len(_MSG)]
            if (dst / name).exists():  # queue ids are unique: a copy adopted before a crash
                log.warning("spool: %s is in %s and %s; keeping the adopted one", qid, src, dst)
                continue
            os.rename(path, dst / name)
            if (src / (qid + _STATE)).exists():
                os.rename(src / (qid + _STATE), dst / (qid + _STATE))
            moved += 1
    for name in names:  # state files whose message moved in an interrupted adoption
        if name.endswith(_STATE) and (src / name).exists() and (
                dst / (name[: -len(_STATE)] + _MSG)).exists():
            os.rename(src / name, dst / name)
    if (src / _CORRUPT).is_dir():
        (dst / _CORRUPT).mkdir(exist_ok=True)
        for name in os.listdir(src / _CORRUPT):
            with contextlib.suppress(OSError):
                os.rename(src / _CORRUPT / name, dst / _CORRUPT / name)
        with contextlib.suppress(OSError):
            os.rmdir(src / _CORRUPT)
    _remove_tree_files(src / _FREE)
    _adopt_ledger(src, dst, fsync=fsync)
    if fsync:
        for d in (dst, src):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    if remove_source:
        _unlink_quiet(src / ".lock")
        try:
            os.rmdir(src)
        except OSError:
            log.warning("spool: %s is not empty after adoption; left in place", src)
    if moved:
        log.info("spool: adopted %d message(s) from %s into %s", moved, src, dst)
    return moved


def _adopt_ledger(src: Path, dst: Path, *, fsync: bool) -> None:
    """The hand-offs ``src`` took (drain.HandoffLedger) are ``dst``'s now, as its messages are:
    appended to its ledger (read when ``dst`` starts), so a message handed over again is still
    recognised after the layout changed."""
    try:
        taken = (src / HANDOFF_LEDGER).read_bytes()
    except FileNotFoundError:
        return
    with open(dst / HANDOFF_LEDGER, "ab") as out:
        out.write(b"\n" + taken)  # after a line a crash may have cut
        out.flush()
        if fsync:
            os.fsync(out.fileno())
    _unlink_quiet(src / HANDOFF_LEDGER)


def _head(envelope: bytes, data: bytes) -> bytes:
    """The header line and envelope of a message file of the current format."""
    return b"%s%d %d\n%s" % (_MAGIC2, len(envelope), zlib.crc32(data), envelope)


def _read_header(f: Any) -> tuple[int, bytes]:
    offset, envelope, _ = _read_header_crc(f)
    return offset, envelope


def _read_header_crc(f: Any) -> tuple[int, bytes, int | None]:
    """The data's offset, the envelope and the data's CRC-32 (None in format 1)."""
    line = f.readline(_MAX_HEADER)
    if not line.endswith(b"\n"):
        raise ValueError("not a spool file")
    crc: int | None = None
    if line.startswith(_MAGIC2):
        length_text, _, crc_text = line[len(_MAGIC2):-1].partition(b" ")
        length, crc = int(length_text), int(crc_text)
    elif line.startswith(_MAGIC):
        length = int(line[len(_MAGIC):-1])
    else:
        raise ValueError("not a spool file")
    envelope = f.read(length)
    if len(envelope) != length:
        raise ValueError("truncated envelope")
    return len(line) + length, envelope, crc


def _write_all(fd: int, head: bytes, body: bytes) -> None:
    """Both parts, in one system call unless the kernel takes less."""
    total = len(head) + len(body)
    n = os.writev(fd, [head, body]) if body else os.write(fd, head)
    if n < total:
        rest = memoryview(head + body)[n:]
        while rest:
            rest = rest[os.write(fd, rest):]


def _remove_tree_files(directory: Path) -> None:
    """Delete a directory and the files in it (gone already is fine)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    except NotADirectoryError:  # a file of that name (not ours): it goes too
        _unlink_quiet(directory)
        return
    for name in names:
        with contextlib.suppress(IsADirectoryError):
            _unlink_quiet(directory / name)
    with contextlib.suppress(OSError):
        os.rmdir(directory)


def _scrubbed(path: Path) -> bool:
    """Does the file start with zeros, as a removed message's file being overwritten does (a
    message file starts with its header)?"""
    try:
        with open(path, "rb") as f:
            head = f.read(_SCRUBBED_HEAD)
    except OSError:
        return False
    return len(head) == _SCRUBBED_HEAD and not head.strip(b"\0")


def _unlink_quiet(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
