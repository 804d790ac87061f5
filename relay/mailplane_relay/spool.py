"""The durable spool: a message is on disk (file and directory fsynced) before the 250 reply.

Layout, everything under the ``directory`` the spool is given (one per worker process):

``<queue-id>.msg``
    One file per message: a header line ``MPS1 <n>\\n``, then ``n`` bytes of envelope JSON,
    then the message data. Written under a temporary name, fsynced, then renamed into place,
    so a ``.msg`` file is complete or absent: recovery never takes half a message for real.
``<queue-id>.state``
    The latest envelope (per-recipient state, attempts, next attempt), rewritten atomically by
    :meth:`Spool.save_state`. When present it wins over the envelope inside the ``.msg`` file.
``.tmp-*``
    Files being written; recovery deletes them (their SMTP transaction never got its 250).
``free/``
    Files of removed messages kept for reuse: a commit overwrites one and renames it into place
    instead of creating a file. Creating an inode is the single most expensive step of a commit
    on ext4 under churn (its allocator scans for recently deleted inodes); recycling avoids it.
    Recovery never reads these files. Every envelope names its own queue id and size, and
    recovery checks both: if a crash undid a removal whose file had already been reused, the
    resurrected name holds another message's bytes, fails the check, and is set aside in
    ``corrupt/`` (that message had been delivered; nothing is lost).

Group commit: each commit writes and fsyncs its own file in a thread pool (the kernel merges
concurrent fsyncs into one journal commit), renames it, then joins the open batch; one directory
fsync makes every rename in the batch durable at once. The batch's fsync waits while other
commits are still writing, up to ``group_commit_window``: a lone commit is not delayed, and a
burst shares one fsync.

Delivery semantics are at-least-once: a state update is not fsynced by default (losing one only
repeats an attempt), and a message is removed only when no recipient is pending. A crash after a
delivery but before its state reached the disk redelivers that recipient: a duplicate is possible,
a loss is not.

``fsync=False`` skips every fsync. It is unsafe (a power cut loses accepted mail) and exists only
to measure what durability costs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .metrics import RelayMetrics

log = logging.getLogger(__name__)

RecipientStatus = Literal["pending", "delivered", "bounced", "expired", "suppressed"]
_RECIPIENT_STATUSES = ("pending", "delivered", "bounced", "expired", "suppressed")

_MAGIC = b"MPS1 "
_MSG = ".msg"
_STATE = ".state"
_TMP = ".tmp-"
_CORRUPT = "corrupt"
_FREE = "free"
_MAX_FREE = 512
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_MAX_HEADER = 64


class SpoolError(Exception):
    """The spool cannot store or update a message (disk full, I/O error, permissions)."""


@dataclass
class Recipient:
    address: str
    status: RecipientStatus = "pending"
    attempts: int = 0
    last_response: str | None = None


@dataclass
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

    def to_json(self) -> bytes:
        doc = {
            "queue_id": self.queue_id, "mail_from": self.mail_from,
            "recipients": [
                {"address": r.address, "status": r.status, "attempts": r.attempts,
                 "last_response": r.last_response}
                for r in self.recipients
            ],
            "received_at": self.received_at, "size": self.size, "message_id": self.message_id,
            "credential": self.credential, "sender_domain": self.sender_domain,
            "listener": self.listener, "next_attempt": self.next_attempt,
            "attempts": self.attempts, "extra": self.extra,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

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
        return cls(recipients=recipients, **doc)


def new_queue_id(rng: random.Random | None = None) -> str:
    """Sortable by time (milliseconds, 10 Crockford base32 digits) and unique across processes
    (50 random bits): ``0J8Z3K4M7Q`` + ``X2C9T4PB1R``.

    ``rng``: a generator seeded from the OS once (``os.urandom`` costs ~0.2 ms per call on these
    VMs, which would cap commits at a few thousand per second)."""
    bits = (rng or _SYSTEM_RANDOM).getrandbits(50)
    n = (time.time_ns() // 1_000_000) << 50 | bits
    out = []
    for _ in range(20):
        out.append(_CROCKFORD[n & 31])
        n >>= 5
    return "".join(reversed(out))


_SYSTEM_RANDOM = random.SystemRandom()


def _valid_queue_id(qid: str) -> bool:
    return len(qid) == 20 and all(c in _CROCKFORD for c in qid)


class _Batch:
    __slots__ = ("future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[None] = loop.create_future()


class Spool:
    def __init__(
        self,
        directory: str,
        *,
        fsync: bool,
        group_commit_window: float,
        metrics: RelayMetrics,
        threads: int = 8,
    ) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.group_commit_window = group_commit_window
        self.metrics = metrics
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._batch: _Batch | None = None
        self._flushers: set[asyncio.Task[None]] = set()
        self._writing = 0  # commits whose files are being written now
        self._writer_done: asyncio.Event | None = None
        self._dir_fd: int | None = None
        self._rng = random.Random(os.urandom(32))  # uniqueness, not secrecy
        self._free_dir = self.directory / _FREE
        # Names in free/; deque append/pop are atomic, so threads share it without a lock.
        self._free: collections.deque[str] = collections.deque()
        self.recycled = 0
        # Counters for tests and benchmarks: how many fsyncs a workload cost.
        self._count_lock = threading.Lock()
        self.file_fsyncs = 0
        self.dir_fsyncs = 0

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> list[QueuedMessage]:
        """Create the directory, delete temp files, return every message with pending
        recipients (oldest first)."""
        self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="spool")
        try:
            recovered: list[QueuedMessage] = await self._run(self._recover)
        except OSError as exc:
            raise SpoolError(f"spool {self.directory}: cannot open: {exc.strerror}") from exc
        return recovered

    async def close(self) -> None:
        for task in list(self._flushers):
            await asyncio.shield(task)
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
    ) -> QueuedMessage:
        """Store a message; durable when this returns. Raises SpoolError, leaving nothing."""
        started = time.perf_counter()
        now = time.time()
        msg = QueuedMessage(
            queue_id=new_queue_id(self._rng),
            mail_from=mail_from,
            recipients=[Recipient(a) for a in recipients],
            received_at=now,
            size=len(data),
            message_id=message_id,
            credential=credential,
            sender_domain=sender_domain,
            listener=listener,
            next_attempt=now,
        )
        envelope = msg.to_json()
        final = self.directory / (msg.queue_id + _MSG)
        self._writing += 1
        try:
            await self._run(self._write_message, final, envelope, data)
        except OSError as exc:
            raise SpoolError(f"spool write failed: {exc.strerror or exc}") from exc
        finally:
            self._writing -= 1
            if self._writer_done is not None:
                self._writer_done.set()
        if self.fsync:
            try:
                await self._sync_directory()
            except OSError as exc:
                # The rename may reach the disk later; we answer 4xx, so the client retries and
                # the copy here must not be delivered too.
                await self._run(_unlink_quiet, final)
                raise SpoolError(f"spool directory sync failed: {exc.strerror or exc}") from exc
        self.metrics.spool_commit_latency.observe(time.perf_counter() - started)
        return msg

    def read(self, queue_id: str) -> bytes:
        """The message data (blocking; a small file read)."""
        path = self.directory / (queue_id + _MSG)
        try:
            with path.open("rb") as f:
                offset, _ = _read_header(f)
                f.seek(offset)
                return f.read()
        except (OSError, ValueError) as exc:
            raise SpoolError(f"spool read of {queue_id} failed: {exc}") from exc

    async def save_state(self, msg: QueuedMessage, *, durable: bool = False) -> None:
        """Rewrite the envelope atomically. Not fsynced unless ``durable``: a lost update only
        repeats an attempt (at-least-once)."""
        try:
            await self._run(self._write_state, msg, durable and self.fsync)
        except OSError as exc:
            raise SpoolError(
                f"spool state update of {msg.queue_id} failed: {exc.strerror}"
            ) from exc

    async def remove(self, queue_id: str) -> None:
        """Forget a message whose recipients are all final."""
        try:
            await self._run(self._remove, queue_id)
        except OSError as exc:
            raise SpoolError(f"spool remove of {queue_id} failed: {exc.strerror}") from exc

    # ---------------------------------------------------------------- group commit

    async def _sync_directory(self) -> None:
        batch = self._batch
        if batch is None:
            loop = asyncio.get_running_loop()
            batch = self._batch = _Batch(loop)
            task = loop.create_task(self._flush(batch), name="spool-group-commit")
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        await asyncio.shield(batch.future)

    async def _gather_writers(self) -> None:
        """Wait, at most ``group_commit_window``, while other commits are still writing their
        files: they join this batch instead of paying for their own directory fsync. A commit
        that arrives alone is synced at once, without waiting out the window."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.group_commit_window
        if self._writer_done is None:
            self._writer_done = asyncio.Event()
        while self._writing > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._writer_done.clear()
            try:
                await asyncio.wait_for(self._writer_done.wait(), remaining)
            except TimeoutError:
                return

    async def _flush(self, batch: _Batch) -> None:
        try:
            if self.group_commit_window > 0:
                await self._gather_writers()
            # Close the batch before the fsync starts: a rename that completes after this point
            # is not covered by this fsync and must wait for the next one.
            if self._batch is batch:
                self._batch = None
            await self._run(self._fsync_dir)
        except (OSError, SpoolError) as exc:
            batch.future.set_exception(exc)
        except BaseException:
            if self._batch is batch:
                self._batch = None
            batch.future.set_exception(OSError("spool closed during commit"))
            raise
        else:
            batch.future.set_result(None)

    # ---------------------------------------------------------------- blocking parts (threads)

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._executor is None:
            raise SpoolError("spool is not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _fsync_dir(self) -> None:
        if self._dir_fd is None:
            self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(self._dir_fd)
        with self._count_lock:
            self.dir_fsyncs += 1

    def _write_message(self, final: Path, envelope: bytes, data: bytes) -> None:
        payload = b"%s%d\n%s" % (_MAGIC, len(envelope), envelope)
        tmp = self._write_recycled(payload, data, self.fsync)
        if tmp is None:
            tmp = final.with_name(_TMP + final.name)
            self._write_file(tmp, payload, data, self.fsync)
        try:
            os.rename(tmp, final)
        except OSError:
            _unlink_quiet(tmp)
            raise

    def _write_recycled(self, head: bytes, body: bytes, sync: bool) -> Path | None:
        """Overwrite a free file with this content; its path, or None if none is free."""
        try:
            path = self._free_dir / self._free.pop()
        except IndexError:
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            _write_all(fd, head)
            if body:
                _write_all(fd, body)
            os.ftruncate(fd, len(head) + len(body))
            if sync:
                os.fsync(fd)
                with self._count_lock:
                    self.file_fsyncs += 1
        except BaseException:
            os.close(fd)
            _unlink_quiet(path)
            raise
        os.close(fd)
        with self._count_lock:
            self.recycled += 1
        return path

    def _write_file(self, path: Path, head: bytes, body: bytes, sync: bool) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, head)
            if body:
                _write_all(fd, body)
            if sync:
                os.fsync(fd)
                with self._count_lock:
                    self.file_fsyncs += 1
        except BaseException:
            os.close(fd)
            _unlink_quiet(path)
            raise
        os.close(fd)

    def _write_state(self, msg: QueuedMessage, sync: bool) -> None:
        final = self.directory / (msg.queue_id + _STATE)
        if not (self.directory / (msg.queue_id + _MSG)).exists():
            # Removed meanwhile (or never committed): a state file alone would be an orphan.
            return
        tmp = self._write_recycled(msg.to_json(), b"", sync)
        if tmp is None:
            tmp = final.with_name(f"{_TMP}{secrets.token_hex(4)}-{final.name}")
            self._write_file(tmp, msg.to_json(), b"", sync)
        try:
            os.rename(tmp, final)
        except OSError:
            _unlink_quiet(tmp)
            raise
        if sync:
            self._fsync_dir()

    def _remove(self, queue_id: str) -> None:
        # The message file first: a crash in between leaves an orphan state file, which recovery
        # deletes, never a state file that marks a live message delivered.
        self._discard(queue_id + _MSG)
        self._discard(queue_id + _STATE)

    def _discard(self, name: str) -> None:
        if len(self._free) < _MAX_FREE:
            # A suffix no tool takes for a message or a state file.
            free_name = name + ".free"
            try:
                os.rename(self.directory / name, self._free_dir / free_name)
            except FileNotFoundError:
                return
            except OSError:
                pass
            else:
                self._free.append(free_name)
                return
        _unlink_quiet(self.directory / name)

    def _recover(self) -> list[QueuedMessage]:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._free_dir.mkdir(exist_ok=True)
        self._free.clear()
        for name in os.listdir(self._free_dir):
            if len(self._free) < _MAX_FREE and (self._free_dir / name).is_file():
                self._free.append(name)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(self._free_dir / name)
        names = os.listdir(self.directory)
        messages: list[QueuedMessage] = []
        live: set[str] = set()
        for name in names:
            if name.startswith(_TMP):
                _unlink_quiet(self.directory / name)
            elif name.endswith(_MSG) and _valid_queue_id(name[: -len(_MSG)]):
                live.add(name[: -len(_MSG)])
        for qid in sorted(live):
            msg = self._load(qid)
            if msg is None:
                continue
            if msg.pending():
                messages.append(msg)
            else:
                self._remove(qid)
        for name in names:
            if name.endswith(_STATE) and name[: -len(_STATE)] not in live:
                _unlink_quiet(self.directory / name)
        if self.fsync:
            self._fsync_dir()
        return messages

    def _load(self, qid: str) -> QueuedMessage | None:
        path = self.directory / (qid + _MSG)
        try:
            with path.open("rb") as f:
                offset, envelope = _read_header(f)
                size = os.fstat(f.fileno()).st_size - offset
            msg = QueuedMessage.from_json(envelope)
            if msg.queue_id != qid or msg.size != size:
                raise ValueError("envelope does not match the file")
        except (OSError, ValueError, TypeError, KeyError) as exc:
            # Committed files are complete (fsync before rename), so this is a disk fault or a
            # foreign file: keep it aside for a human rather than delete mail.
            self._quarantine(path, exc)
            return None
        state_path = self.directory / (qid + _STATE)
        try:
            state = QueuedMessage.from_json(state_path.read_bytes())
        except FileNotFoundError:
            return msg
        except (OSError, ValueError, TypeError, KeyError):
            # An unsynced state update torn by a crash: the commit-time envelope is the safe
            # fallback (every recipient pending again: duplicates, no loss).
            log.warning("spool: state file of %s unreadable, using the committed envelope", qid)
            return msg
        return state if state.queue_id == qid else msg

    def _quarantine(self, path: Path, exc: BaseException) -> None:
        log.error("spool: %s is not a valid message file (%s); moved to %s/", path.name,
                  type(exc).__name__, _CORRUPT)
        target = self.directory / _CORRUPT
        try:
            target.mkdir(exist_ok=True)
            os.rename(path, target / path.name)
        except OSError:
            log.exception("spool: cannot quarantine %s", path.name)


def _read_header(f: Any) -> tuple[int, bytes]:
    line = f.readline(_MAX_HEADER)
    if not line.startswith(_MAGIC) or not line.endswith(b"\n"):
        raise ValueError("not a spool file")
    length = int(line[len(_MAGIC):-1])
    envelope = f.read(length)
    if len(envelope) != length:
        raise ValueError("truncated envelope")
    return len(line) + length, envelope


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _unlink_quiet(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
