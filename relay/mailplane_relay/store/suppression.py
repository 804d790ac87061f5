"""The suppression list: addresses that must not receive mail, cached in every worker.

Lookups hit an in-memory dict. About every second a background task applies the changes made
since its last look (the store's change feed), so entries added or removed by the CLI, another
worker, another pod or the purge apply within about a second, at a cost that grows with the
number of changes, not with the size of the list.

The cache is also written to a file (``cache_file``) after each change, and read from it when
the store cannot be reached at start: a pod that starts while the database is down still refuses
suppressed addresses.

An erased complaint stays on the list as a keyed hash of the address, never the address itself:
it still suppresses, and nobody can read the address back from it. The keys are the configured
ones (``store.erasureKeyFiles``) and the store's own if it has one (``backend.erasure_keys()``),
fetched at the first successful refresh; an address is checked against a hash by each.

An entry is pool-wide (delivery facts: bounces, complaints; the platform's CLI) or scoped to a
namespace (added by that team through the portal): a scoped entry stops only mail sent with
that namespace's credentials (``is_suppressed(address, namespace)``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..aiotasks import cancel_and_wait
from ..metrics import RelayMetrics
from .backend import POOL_WIDE, Entry, Scopes, StoreBackend, complaint_hash
from .erased import erased_since
from .health import StoreHealth

log = logging.getLogger(__name__)

SUPPRESSION_REFRESH_INTERVAL = 1.0
# More changes than this since the last look: one full reload is cheaper than the delta.
SUPPRESSION_DELTA_LIMIT = 20_000


def normalise(address: str) -> str:
    return address.strip().lower()


class SuppressionList:
    def __init__(
        self, backend: StoreBackend, metrics: RelayMetrics,
        *, refresh_interval: float = SUPPRESSION_REFRESH_INTERVAL, export_gauge: bool = True,
        delta_limit: int = SUPPRESSION_DELTA_LIMIT,
        on_added: Callable[[list[tuple[str, str]]], Awaitable[None]] | None = None,
        use_erasure_key: bool = True,
        cache_file: str | None = None,
        health: StoreHealth | None = None,
    ) -> None:
        self.backend = backend
        self._health = health
        # Told (address, reason) of entries that appeared since the last refresh, whoever
        # wrote them (the CLI, another worker); not for the entries present at start.
        self._on_added = on_added
        self._metrics = metrics
        # With several workers each holds the whole list; one of them reports its size, so
        # that summing the gauge over processes counts each address once.
        self._export_gauge = export_gauge
        self._refresh_interval = refresh_interval
        self._use_key = use_erasure_key
        self._keys: list[bytes] = []
        self._cache_file = Path(cache_file) if cache_file else None
        self._cache: dict[str, Scopes] = {}
        self._version = -1  # number of the last change applied to the cache; -1: none yet
        self._delta_limit = delta_limit
        self.full_reloads = 0  # for tests: how often the whole table was read
        self._task: asyncio.Task[None] | None = None
        self._refreshed = asyncio.Condition()
        self._passes_started = 0
        self._passes_done = 0
        self._cache_dirty = False
        # Entries added while the store did not answer, to write when it does.
        self._unsent: dict[str, tuple[str, str, float]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def _set_gauge(self) -> None:
        if self._export_gauge:
            self._metrics.suppression_entries.set(len(self._cache))

    async def start(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:
            if not self.backend.shared:
                raise  # a local file that cannot be read is a broken volume: say so at start
            loaded = await self._load_cache_file()
            # Mail flow never waits on a shared database: start on the cache kept on disk
            # (empty on a pod's very first start) and catch up when the store answers.
            log.error("suppression list: the store (%s) did not answer (%s); using %s until "
                      "it does", self.backend.description, exc,
                      f"the {len(self._cache)} entries cached on disk" if loaded
                      else "an EMPTY list (no cache on disk yet)")
        self._task = asyncio.create_task(self._refresher(), name="suppression-refresh")

    def is_suppressed(self, address: str, namespace: str | None = None) -> Entry | None:
        """The entry that stops mail to ``address`` sent with credentials of ``namespace``
        (None: a client of no namespace): a pool-wide one, or one that namespace added."""
        address = normalise(address)
        scopes = self._cache.get(address)
        if scopes:
            entry = scopes.get(POOL_WIDE)
            if entry is None and namespace:
                entry = scopes.get(namespace)
            if entry is not None:
                return entry
        if self._cache:
            for key in self._keys:
                # A complaint kept as a hash is pool-wide, like every complaint.
                entry = self._cache.get(complaint_hash(key, address), {}).get(POOL_WIDE)
                if entry is not None:
                    return entry
        return None

    async def add(self, address: str, reason: str, *, source: str) -> None:
        """Suppress an address: at once in this worker, in the store as soon as it answers
        (an entry the store did not take is retried by the refresher; it raises meanwhile)."""
        address = normalise(address)
        created = time.time()
        # In the cache first: this worker suppresses at once, even if the store is down.
        self._cache.setdefault(address, {})[POOL_WIDE] = (reason, created)
        self._set_gauge()
        self._cache_dirty = True
        try:
            await self.backend.suppression_upsert(address, reason, source, created)
        except Exception:
            self._unsent[address] = (reason, source, created)
            raise
        self._unsent.pop(address, None)

    async def send_unsent(self) -> None:
        """Write the entries the store did not take when they were added (the refresher does
        this about every second). An address whose erasure was requested after its entry was
        added is not brought back: a complaint goes in as the address's keyed hash, as the
        erasure would have left it; any other entry is dropped."""
        if not self._unsent:
            return
        erased = await erased_since(self.backend,
                                    min(created for _r, _s, created in self._unsent.values()))
        for address, (reason, source, created) in list(self._unsent.items()):
            if erased.erased(address, created):
                if reason == "complaint":
                    key = await self.backend.erasure_key()
                    await self.backend.suppression_upsert(complaint_hash(key, address), reason,
                                                          source, created)
                scopes = self._cache.get(address, {})
                if scopes.get(POOL_WIDE) == (reason, created):
                    del scopes[POOL_WIDE]
                    if not scopes:
                        self._cache.pop(address, None)
                    self._set_gauge()
                    self._cache_dirty = True
                log.info("suppression list: an entry added before its address was erased was "
                         "not written back (%s)", "kept as a keyed hash" if reason == "complaint"
                         else "dropped")
            else:
                await self.backend.suppression_upsert(address, reason, source, created)
            if self._unsent.get(address) == (reason, source, created):
                del self._unsent[address]

    async def remove(self, address: str) -> bool:
        """Remove every entry of the address (pool-wide and scoped)."""
        address = normalise(address)
        removed = await self.backend.suppression_delete(address)
        self._cache.pop(address, None)
        self._set_gauge()
        self._cache_dirty = True
        return removed

    async def refresh(self) -> bool:
        """Apply the changes made since the last look (by anyone); True if there were any."""
        if not self._keys and self._use_key:
            # Made once (the store's key is created if there is none and none is configured).
            await self.backend.erasure_key()
            self._keys = await self.backend.erasure_keys()
        since = self._version
        changes = await self.backend.suppression_changes(since, self._delta_limit)
        if changes is None:
            return False
        first_load = since < 0
        before = self._cache
        self._version = changes.last
        entries = changes.entries
        # New pool-wide entries (or a new reason): complaints are counted from these.
        added = [(a, e[POOL_WIDE][0]) for a, e in entries.items()
                 if POOL_WIDE in e and (POOL_WIDE not in before.get(a, {})
                                        or before[a][POOL_WIDE][0] != e[POOL_WIDE][0])]
        if changes.full:
            self._cache = {a: dict(e) for a, e in entries.items() if e}
            for address, (reason, _source, created) in self._unsent.items():
                self._cache.setdefault(address, {}).setdefault(POOL_WIDE, (reason, created))
        else:
            for address, scopes in entries.items():
                if scopes:
                    self._cache[address] = dict(scopes)
                else:
                    self._cache.pop(address, None)
        self.full_reloads += changes.full
        self._set_gauge()
        self._cache_dirty = True
        if self._on_added is not None and added and not first_load:
            await self._on_added(added)
        return True

    async def wait_refreshed(self) -> None:
        """Wait for a background refresh pass that started after this call, so that it saw
        every write made before the call (by the CLI or another process)."""
        target = self._passes_started + 1
        async with self._refreshed:
            await self._refreshed.wait_for(lambda: self._passes_done >= target)

    async def _refresher(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._refresh_interval)
            self._passes_started += 1
            try:
                if self._unsent:
                    await self.send_unsent()
                await self.refresh()
                if self._health is not None:
                    self._health.ok("suppression")
                if failing:
                    log.info("suppression list: the store answers again")
                failing = False
                if self._cache_dirty:
                    await self._save_cache_file()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._health is not None:
                    self._health.failed("suppression", exc)
                if not failing:
                    log.error("suppression list: refresh from %s failed (%s); keeping the "
                              "cached entries", self.backend.description, exc)
                failing = True
            self._passes_done = self._passes_started
            async with self._refreshed:
                self._refreshed.notify_all()

    # ---- the cache on disk -----------------------------------------------------------------

    async def _save_cache_file(self) -> None:
        path = self._cache_file
        self._cache_dirty = False
        if path is None:
            return
        snapshot = {a: {ns: list(e) for ns, e in scopes.items()}
                    for a, scopes in self._cache.items()}
        # The store's own key (if used) is kept with the cache, so that a pod starting while the
        # database is down still recognises hashed complaints; configured keys are not: they
        # are on the pod already, in their files.
        configured = set(getattr(self.backend, "configured_keys", ()))
        stored = [k.hex() for k in self._keys if k not in configured]
        key = stored[0] if stored else None

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"key": key, "entries": snapshot}, f)
            os.replace(tmp, path)

        try:
            await asyncio.to_thread(write)
        except OSError:
            log.exception("suppression list: could not write the cache file %s", path)

    async def _load_cache_file(self) -> bool:
        path = self._cache_file
        if path is None:
            return False

        def read() -> dict[str, Any] | None:
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError):
                return None
            return data if isinstance(data, dict) else None

        data = await asyncio.to_thread(read)
        if data is None:
            return False
        try:
            self._cache = {str(a): _scopes_from_file(e)
                           for a, e in dict(data["entries"]).items()}
            stored = [bytes.fromhex(str(data["key"]))] if data.get("key") else []
            self._keys = [*getattr(self.backend, "configured_keys", ()), *stored]
        except (KeyError, TypeError, ValueError, IndexError):
            log.error("suppression list: the cache file %s is unreadable; ignoring it", path)
            return False
        self._set_gauge()
        return True

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        if self._cache_dirty:
            await self._save_cache_file()


def _scopes_from_file(value: Any) -> Scopes:
    """An address's entries as the cache file holds them: {namespace: [reason, created]};
    a file written before scopes existed holds one [reason, created], pool-wide."""
    if isinstance(value, list):
        return {POOL_WIDE: (str(value[0]), float(value[1]))}
    return {str(ns): (str(e[0]), float(e[1])) for ns, e in dict(value).items()}
