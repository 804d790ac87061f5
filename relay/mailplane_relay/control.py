"""The queue administration socket: ``mailplane queue`` talks to every relay process here.

Each relay process (each worker with ``workers: N``) listens on a unix socket of its own,
``<spool.directory>/control/w<index>.sock`` (``w0.sock`` for a single process), and answers
for the messages of its own spool. The directory is mode 0700 and the socket 0600, owned by
the relay's user; a peer of another user (other than root) is refused as well, whatever the
file modes say. The socket is reachable only inside the pod (``kubectl exec``), never over
the network: the ops HTTP port has no authentication and serves none of this.

The protocol is one JSON object per line each way: a request ``{"op": "list", ...}``, then one
answer ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``, then the relay
closes the connection. A request with ``"progress": true`` (hold, release and flush of many
messages) is also sent ``{"progress": {"done": n, "total": m}}`` lines before its answer, at
most every ``PROGRESS_EVERY`` seconds, so that the client knows the relay is working. Nothing
here reads message data: ``show`` answers the envelope and its delivery state, never the body or
a header.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import math
import os
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import domain_of
from .spool import QueuedMessage, Spool, SpoolError
from .spool import valid_queue_id as _valid_queue_id

if TYPE_CHECKING:
    from .delivery import DeliveryQueue
    from .drain import Drainer

log = logging.getLogger(__name__)

CONTROL_DIR = "control"
# Destination names: domains, and keys such as "smarthost:host:587/bulk+tls=verify".
_DESTINATION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:/+=_-]{0,252}\Z")
# Requests are small (an operation and a few names); anything longer is not ours.
MAX_REQUEST = 16 * 1024
# The answer to `bounce`: the recipients fail with it, and the sender's DSN quotes it.
ADMIN_BOUNCE_REPLY = "550 5.0.0 Returned to the sender by the relay administrator"
# Unix socket paths are limited to 107 bytes on Linux.
MAX_SOCKET_PATH = 107
# `list` answers at most this many messages unless asked for another limit (0: all).
DEFAULT_LIST_LIMIT = 1000
# Envelopes read per thread hand-off while listing.
LIST_BATCH = 500
OPS = ("list", "show", "destinations", "hold", "release", "flush", "delete", "bounce")
# Seconds between two progress lines of a long operation.
PROGRESS_EVERY = 1.0
# The progress reporter of the request being served (one per connection task).
_PROGRESS: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "control_progress", default=None)
# Between the workers of one pod (drain.py): the worker serving the admin port passes drain
# orders to the others and adds up their state. Not for the CLI (not listed to it).
WORKER_OPS = ("drain", "undrain", "drain-status")


def control_dir(spool_root: str | Path) -> Path:
    """Where the sockets of the relay processes using ``spool.directory`` are."""
    return Path(spool_root) / CONTROL_DIR


def socket_path(spool_root: str | Path, index: int) -> Path:
    return control_dir(spool_root) / f"w{index}.sock"


def remove_stale_sockets(directory: Path, workers: int) -> list[str]:
    """Delete the sockets of worker indexes at or above ``workers`` that nobody listens on
    (left by a layout with more workers); their names."""
    removed: list[str] = []
    try:
        paths = sorted(directory.glob("w*.sock"))
    except OSError:
        return removed
    for path in paths:
        index = path.name[1:-len(".sock")]
        if not index.isdigit() or int(index) < workers:
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            try:
                with _short_path(path) as address:
                    sock.connect(address)
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed.append(path.name)
            except (OSError, ControlError):
                continue
    if removed:
        log.info("queue administration: removed the sockets of gone workers: %s",
                 " ".join(removed))
    return removed


class ControlError(Exception):
    """A request the relay cannot carry out; the text says why and what to do."""


class ControlServer:
    def __init__(self, path: Path, *, queue: DeliveryQueue, spool: Spool,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._queue = queue
        self._spool = spool
        self._clock = clock
        self._server: asyncio.AbstractServer | None = None
        self.drainer: Drainer | None = None
        """This process's drainer, for the drain orders of the worker serving the admin port."""

    async def start(self) -> None:
        """Bind the socket (the caller holds the spool lock of this worker, so a socket left
        at this path belongs to a process that is gone: it is replaced)."""
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with _short_path(self.path) as bind_path:
            self._server = await asyncio.start_unix_server(
                self._handle, path=bind_path, limit=MAX_REQUEST)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer: dict[str, Any]
            if not _peer_allowed(writer):
                # Refused before its request is parsed, and given a second to send it (read
                # and dropped, so that the answer is not lost to a reset connection).
                log.warning("queue administration: refused a client of another user")
                with contextlib.suppress(ValueError, TimeoutError, asyncio.LimitOverrunError):
                    await asyncio.wait_for(reader.readline(), 1.0)
                answer = {"ok": False, "error": "permission denied: run this as the "
                                                "relay's user (or root)"}
            else:
                try:
                    line = await asyncio.wait_for(reader.readline(), 10.0)
                    # RecursionError: nesting deeper than the parser goes ("[[[[...").
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("not an object")
                except (ValueError, RecursionError, TimeoutError, asyncio.LimitOverrunError):
                    answer = {"ok": False,
                              "error": "bad request: send one JSON object on a line"}
                else:
                    if request.get("progress") is True:
                        _PROGRESS.set(_reporter(writer))
                    answer = await self.call(request)
            writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def call(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        try:
            if op in WORKER_OPS:
                return {"ok": True, "result": await self._worker_op(str(op), request)}
            if op not in OPS:
                raise ControlError(f"unknown operation; one of {', '.join(OPS)}")
            for name in ("queue_id", "destination"):
                _optional_str(request, name)  # checked before anything is done or logged
            result = await getattr(self, f"_op_{op}")(request)
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except SpoolError as exc:
            return {"ok": False, "error": f"spool: {exc}"}
        log.info("queue administration: %s %s", op, _target(request))
        return {"ok": True, "result": result}

    async def _worker_op(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        """A drain order from the worker serving the admin port (the token it carries is
        never logged)."""
        drainer = self.drainer
        if drainer is None:
            raise ControlError("this process does not drain (yet): try again")
        if op == "drain":
            peers, token = request.get("peers"), request.get("token")
            if not (isinstance(peers, list) and all(isinstance(p, str) for p in peers)
                    and isinstance(token, str)):
                raise ControlError("drain needs peers (a list of URLs) and token")
            await drainer.start(peers, token)
        elif op == "undrain":
            await drainer.stop()
        return drainer.status()

    # ---------------------------------------------------------------- operations

    async def _op_list(self, request: dict[str, Any]) -> dict[str, Any]:
        destination = _optional_str(request, "destination")
        older_than = request.get("older_than")
        if older_than is not None and (not isinstance(older_than, int | float)
                                       or not math.isfinite(older_than)):
            raise ControlError("older_than must be a number of seconds")
        limit = request.get("limit", DEFAULT_LIST_LIMIT)
        if not isinstance(limit, int) or limit < 0:
            raise ControlError("limit must be a whole number (0: no limit)")
        now = self._clock()
        out: list[dict[str, Any]] = []
        matched = 0
        async for msg in self._envelopes():
            if older_than is not None and now - msg.received_at < older_than:
                continue
            if destination is not None and destination not in _domains(msg):
                continue
            matched += 1
            if not limit or len(out) < limit:
                out.append(self._summary(msg))
        return {"messages": out, "matched": matched}

    async def _op_show(self, request: dict[str, Any]) -> dict[str, Any]:
        queue_id = _queue_id(request)
        msg = await asyncio.to_thread(self._spool.envelope, queue_id)
        if msg is None:
            raise ControlError(f"{queue_id}: not in this relay process's queue")
        doc = json.loads(msg.to_json())
        doc["state"] = self._state(msg)
        return dict(doc)

    async def _op_destinations(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        return self._queue.destinations()

    async def _op_hold(self, request: dict[str, Any]) -> list[str]:
        return await self._queue.hold_many(await self._targets(request), _PROGRESS.get())

    async def _op_release(self, request: dict[str, Any]) -> list[str]:
        return await self._queue.release_many(await self._targets(request), _PROGRESS.get())

    async def _op_flush(self, request: dict[str, Any]) -> dict[str, Any]:
        destination = _optional_str(request, "destination")
        resumed = self._queue.resume_destinations(destination)
        if destination is None:
            ids = self._queue.queued_ids()
        else:
            ids = await self._targets(request)
        flushed = await self._queue.flush_many(ids, _PROGRESS.get())
        return {"messages": flushed, "destinations": resumed}

    async def _op_delete(self, request: dict[str, Any]) -> list[str]:
        queue_id = _queue_id(request)
        try:
            await self._queue.delete(queue_id)
        except KeyError:
            raise ControlError(f"{queue_id}: not in this relay process's queue") from None
        return [queue_id]

    async def _op_bounce(self, request: dict[str, Any]) -> list[str]:
        queue_id = _queue_id(request)
        try:
            await self._queue.bounce(queue_id, ADMIN_BOUNCE_REPLY)
        except KeyError:
            raise ControlError(f"{queue_id}: not in this relay process's queue") from None
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        return [queue_id]

    # ---------------------------------------------------------------- helpers

    async def _envelopes(self) -> AsyncIterator[QueuedMessage]:
        """Every message of this spool, oldest first, listed from the spool directory; each
        envelope the object in memory when there is one (an attempt's), else read from the
        spool files, in a thread a batch at a time (the queue keeps deferred messages'
        envelopes on disk only): a large queue neither stalls the event loop nor fills the
        memory."""
        ids = self._spool.queue_ids()
        for start in range(0, len(ids), LIST_BATCH):
            batch = ids[start:start + LIST_BATCH]
            read = await asyncio.to_thread(
                lambda b=batch: [self._spool.envelope(q) for q in b])  # type: ignore[misc]
            for msg in read:
                if msg is not None:
                    yield msg

    async def _targets(self, request: dict[str, Any]) -> list[str]:
        """The queue ids a hold/release/flush names: one id, or every message with a pending
        recipient at a destination (recipient domain). Only messages the queue holds."""
        queue_id = _optional_str(request, "queue_id")
        if queue_id is not None:
            if not self._queue.is_queued(queue_id):
                raise ControlError(f"{queue_id}: not in this relay process's queue")
            return [queue_id]
        destination = _optional_str(request, "destination")
        if destination is None:
            raise ControlError("name a queue id or a destination")
        return [m.queue_id async for m in self._envelopes()
                if destination in _domains(m) and self._queue.is_queued(m.queue_id)]

    def _state(self, msg: QueuedMessage) -> str:
        state = self._queue.state_by_id(msg.queue_id)
        if state is not None:
            return state
        return "final" if not msg.needs_work() else "loading"

    def _summary(self, msg: QueuedMessage) -> dict[str, Any]:
        return {
            "queue_id": msg.queue_id, "sender": msg.mail_from, "received_at": msg.received_at,
            "size": msg.size, "state": self._state(msg), "next_attempt": msg.next_attempt,
            "attempts": msg.attempts, "destinations": sorted(_domains(msg)),
            "recipients": [{"address": r.address, "status": r.status,
                            "last_response": r.last_response}
                           for r in msg.recipients if r.status == "pending" or r.dsn_owed],
        }


def _reporter(writer: asyncio.StreamWriter) -> Callable[[int, int], None]:
    """Progress lines to the client, at most every ``PROGRESS_EVERY`` seconds (the last one
    of an operation always: the answer follows it)."""
    last = [time.monotonic()]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < PROGRESS_EVERY:
            return
        last[0] = now
        line = {"progress": {"done": done, "total": total}}
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            writer.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")

    return report


def _domains(msg: QueuedMessage) -> set[str]:
    return {domain_of(r.address) for r in msg.recipients if r.status == "pending"}


def _optional_str(request: dict[str, Any], name: str) -> str | None:
    """A queue id (20 characters of the queue id alphabet) or a destination (a domain name,
    or a destination key as `destinations` prints it): checked, so that what is logged and
    echoed is what the relay issued."""
    value = request.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ControlError(f"{name} must be a string")
    if name == "queue_id":
        if not _valid_queue_id(value):
            raise ControlError("queue_id must be a queue id (20 characters, as `mailplane "
                               "queue list` prints)")
        return value
    if not _DESTINATION.match(value):
        raise ControlError(f"{name} must be a domain name or a destination as "
                           "`mailplane queue destinations` prints it")
    return value.lower()


def _queue_id(request: dict[str, Any]) -> str:
    value = _optional_str(request, "queue_id")
    if value is None:
        raise ControlError("this operation needs a queue id")
    return value


def _target(request: dict[str, Any]) -> str:
    parts = [f"{k}={request[k]}" for k in ("queue_id", "destination") if request.get(k)]
    return " ".join(parts)


@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
    """A name for ``path`` that fits a unix socket address (107 bytes on Linux): the path
    itself when short enough, else the socket's name under ``/proc/self/fd/<directory fd>``
    (a deep spool directory works too)."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield str(path)
        return
    if not os.path.isdir("/proc/self/fd"):
        raise ControlError(f"queue administration socket path {path} is longer than "
                           f"{MAX_SOCKET_PATH} bytes; use a shorter spool.directory")
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return True  # the 0700 directory is the protection where credentials are unknown
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.geteuid())


# ---------------------------------------------------------------- client (the CLI)


WORKER_CALL_TIMEOUT = 10.0


async def call_worker(spool_root: str | Path, index: int,
                      request: dict[str, Any]) -> dict[str, Any]:
    """One request to the relay process ``w<index>`` of this pod; its result. ControlError
    when it does not answer or refuses."""
    path = socket_path(spool_root, index)
    payload = json.dumps(request, separators=(",", ":")).encode() + b"\n"
    try:
        async with asyncio.timeout(WORKER_CALL_TIMEOUT):
            with _short_path(path) as address:
                reader, writer = await asyncio.open_unix_connection(address, limit=1 << 20)
            try:
                writer.write(payload)
                await writer.drain()
                raw = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()
        answer = json.loads(raw)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ControlError(f"worker {index} does not answer ({type(exc).__name__})") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else "no answer"
        raise ControlError(f"worker {index}: {error}")
    result = answer.get("result")
    return result if isinstance(result, dict) else {}



def _progress_line(line: bytes) -> tuple[int, int] | None:
    """(done, total) of a progress line; None for any other line (the answer)."""
    if not line.startswith(b'{"progress":'):
        return None
    try:
        doc = json.loads(line)["progress"]
        return int(doc["done"]), int(doc["total"])
    except (ValueError, KeyError, TypeError):
        return None


def request_all(directory: Path, request: dict[str, Any], timeout: float = 30.0,
                progress: Callable[[str, int, int], None] | None = None,
                ) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """Send ``request`` to every relay process with a socket in ``directory``: the answers
    ``(worker, answer)`` of the processes that replied, and a note for each socket nobody
    listens on (a worker that is gone). ``timeout``: the longest silence of a relay process;
    with ``progress``, the request asks for progress lines (each one restarts that wait) and
    ``progress(worker, done, total)`` is called for each."""
    if progress is not None:
        request = {**request, "progress": True}
    try:
        names = sorted(p.name for p in directory.iterdir() if p.name.endswith(".sock"))
    except FileNotFoundError:
        raise ControlError(
            f"{directory} does not exist: no relay runs with this spool.directory (give the "
            "relay's --config, or --control-dir)") from None
    except PermissionError:
        raise ControlError(f"{directory}: permission denied; run this as the relay's user "
                           "(e.g. through kubectl exec)") from None
    answers: list[tuple[str, dict[str, Any]]] = []
    stale: list[str] = []
    payload = json.dumps(request, separators=(",", ":")).encode() + b"\n"
    for name in names:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                with _short_path(directory / name) as address:
                    sock.connect(address)
            except (ConnectionRefusedError, FileNotFoundError):
                stale.append(name)
                continue
            except PermissionError:
                raise ControlError(f"{directory / name}: permission denied; run this as the "
                                   "relay's user (e.g. through kubectl exec)") from None
            sock.sendall(payload)
            worker = name.removesuffix(".sock")
            buffer = b""
            try:
                while chunk := sock.recv(1 << 16):
                    buffer += chunk
                    while b"\n" in buffer:
                        line, rest = buffer.split(b"\n", 1)
                        seen = _progress_line(line)
                        if seen is None:
                            break  # the answer (the last line)
                        buffer = rest
                        if progress is not None:
                            progress(worker, *seen)
            except TimeoutError:
                raise ControlError(
                    f"{worker}: no answer within {timeout:g}s; the relay may still be working "
                    "on it (check with `mailplane queue list`), or raise --timeout") from None
        try:
            answer = json.loads(buffer)
        except ValueError:
            raise ControlError(f"{name}: the relay gave no answer (did it stop?)") from None
        answers.append((worker, answer))
    if not answers and not stale:
        raise ControlError(f"no relay process has a socket in {directory}; is the relay "
                           "running?")
    return answers, stale
