"""Destination suspensions shared by the workers of a relay and kept across restarts.

A suspended destination (see ``destinations.py``) is recorded in ``destination-suspensions.json``
in the spool root (``spool.directory``, beside the MTA-STS cache): its end (wall-clock time),
the suspensions in a row, the reply that caused it, and the worker that holds its probe. Every
change (a suspension, a probe claimed, a suspension lifted) reads the file and rewrites it whole
under an exclusive lock on ``.destination-suspensions.json.lock`` beside it, so the workers merge
their changes instead of overwriting each other's; readers take the file as it is (it is
replaced by a rename, never seen half written), at most every ``REFRESH`` seconds.

What it gives:

- a destination one worker suspended is suspended in the others too (within ``REFRESH``), and
  a worker that suspends it again in the meantime (it had a connection in flight) adopts the
  suspension in force instead of counting a second failure;
- when the suspension ends, one probe per relay: the worker that starts one first claims it in
  the file; the others defer their work until the probe's outcome is written (a working session
  lifts the suspension for all, a failed one suspends again for the next backoff step), or until
  the claim lapses (``probe_lease``: the worker holding it stopped);
- a restart keeps the backoff: a destination suspended at the restart stays suspended until its
  recorded end, and its next failure is the next step of the schedule.

The file names destinations only (the smarthost, or a recipient domain's MX hosts) and server
replies, with any address a reply quotes replaced by ``<address>``: never a message, an address
or a credential (so an erasure has nothing to find here). A lost update (the file is not fsynced)
costs at most one extra probe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "destination-suspensions.json"
# How old the workers' view of the file may be (seconds) when no change of their own is due.
REFRESH = 0.25
# A worker waiting for another's probe looks at the file again this often (seconds).
PROBE_POLL = 2.0
# What a server reply may quote of an envelope ("<user@example.net>", "user@example.net"),
# with a quoted local part ('"jane doe"@example.net', RFC 5321 Quoted-string, spaces and
# backslash escapes included) or an address literal ("user@[192.0.2.1]", "@[IPv6:...]").
_ADDRESS = re.compile(r"<?(?:\"(?:[^\"\\]|\\.)*\"|[^\s<>()\[\]\"',;:]+)"
                      r"@(?:\[[^\]\s]*\]|[^\s<>()\[\]\"',;:]+)>?")
# Entries whose suspension ended this long ago with no probe outcome are dropped (seconds).
FORGET_AFTER = 7 * 86400.0
# At most this many destinations in the file (about 400 bytes each): every change rewrites it
# whole on the event loop and every worker parses it again, so mail to thousands of dead
# domains would otherwise cost each suspension tens to hundreds of milliseconds. Beyond it the
# entries that ended (or end) first are left out: those destinations stay suspended in the
# worker that suspended them, and lose only the sharing (at most one probe per worker).
MAX_ENTRIES = 500


def without_addresses(reply: str) -> str:
    """A server reply with every address it quotes replaced by ``<address>``."""
    return _ADDRESS.sub("<address>", reply)


@dataclass(slots=True)
class Suspension:
    until: float  # wall-clock end of the suspension
    failures: int  # suspensions in a row (the backoff step)
    reason: str  # the reply that caused it
    kind: str  # "connect" | "throttled"
    probe_by: str = ""  # the worker that holds the probe, once the suspension ended
    probe_until: float = 0.0  # when that claim lapses


class SharedSuspensions:
    """The workers' shared record of suspended destinations (one object per worker)."""

    def __init__(self, path: Path, *, owner: str | None = None,
                 clock: Callable[[], float] = time.time,
                 max_entries: int = MAX_ENTRIES) -> None:
        self.path = path
        self.max_entries = max_entries
        self.owner = owner or f"pid-{os.getpid()}"
        self._clock = clock
        self._lock_path = path.with_name(f".{path.name}.lock")
        self._entries: dict[str, Suspension] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")

    # ---------------------------------------------------------------- reading

    def view(self) -> dict[str, Suspension]:
        """The suspensions as the file holds them (re-read when it changed, at most every
        ``REFRESH`` seconds)."""
        now = time.monotonic()
        if now - self._checked >= REFRESH:
            self._checked = now
            self._reload()
        return self._entries

    def get(self, key: str) -> Suspension | None:
        return self.view().get(key)

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._entries, self._stamp = {}, None
            return
        except OSError as exc:
            log.warning("delivery: cannot read %s: %s", self.path, exc)
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._entries = self._read()
        self._stamp = stamp

    def _read(self) -> dict[str, Suspension]:
        try:
            doc = json.loads(self.path.read_bytes())
            entries = doc["destinations"] if doc.get("version") == 1 else {}
            return {str(k): Suspension(**v) for k, v in entries.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            # A damaged file lifts the suspensions it held: at worst a probe too many.
            log.warning("delivery: %s is not readable (%s); starting without it", self.path,
                        exc)
            return {}

    # ---------------------------------------------------------------- changes

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Suspension]]:
        """The current entries under the lock; written back when the block ends."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            entries = self._read()
            yield entries
            now = self._clock()
            entries = {k: v for k, v in entries.items()
                       if max(v.until, v.probe_until) > now - FORGET_AFTER}
            if len(entries) > self.max_entries:
                latest = sorted(entries, key=lambda k: max(entries[k].until,
                                                           entries[k].probe_until))
                for key in latest[:len(entries) - self.max_entries]:
                    del entries[key]
            data = json.dumps({"version": 1, "destinations": {
                k: asdict(v) for k, v in sorted(entries.items())}}, sort_keys=True).encode()
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
            self._entries = entries
            self._checked = time.monotonic()
            with contextlib.suppress(OSError):
                st = os.stat(self.path)
                self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)

    def suspend(self, key: str, *, failures: int, delay: Callable[[int], float], reason: str,
                kind: str) -> tuple[Suspension, bool]:
        """Record a suspension after a failure of this worker; (the suspension in force, and
        whether it is a new one). One that another worker recorded and that has not ended is
        adopted as it is; otherwise the next backoff step follows the larger of this worker's
        and the file's count of suspensions in a row."""
        now = self._clock()
        with self._locked() as entries:
            current = entries.get(key)
            if current is not None and current.until > now:
                return current, False
            step = max(failures, current.failures if current is not None else 0) + 1
            entry = Suspension(until=now + delay(step), failures=step,
                               reason=without_addresses(reason), kind=kind)
            entries[key] = entry
            return entry, True

    def claim_probe(self, key: str, lease: float) -> Suspension | None:
        """Claim the probe of a destination whose suspension ended: None when this worker may
        connect (it holds the probe, or the destination is not suspended), else the
        suspension or another worker's claim to wait for."""
        now = self._clock()
        current = self.view().get(key)
        if current is None:
            return None
        if current.until > now:
            return current
        with self._locked() as entries:
            current = entries.get(key)
            if current is None:
                return None
            if current.until > now:
                return current
            if current.probe_by not in ("", self.owner) and current.probe_until > now:
                return current
            current.probe_by, current.probe_until = self.owner, now + lease
            return None

    def lift(self, key: str) -> None:
        """A session worked: the destination is no longer suspended, for every worker."""
        with self._locked() as entries:
            entries.pop(key, None)

    def end_now(self, keys: list[str]) -> None:
        """An administrator's flush or resume: the suspensions end now (a probe decides)."""
        if not keys:
            return
        now = self._clock()
        with self._locked() as entries:
            for key in keys:
                entry = entries.get(key)
                if entry is not None:
                    entry.until = min(entry.until, now)
                    entry.probe_by, entry.probe_until = "", 0.0
