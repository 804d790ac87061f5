"""Erasures that a held-back write must respect.

A log row or a suppression entry recorded while the store did not answer (a database down, a
worker cut off from it) is written later: replayed from the disk buffer, or sent from the
suppression list's unsent entries. An erasure of its address requested in between must not be
undone by that write (docs/store.md, "When the database is down"). The store keeps each
erasure request's time, and its address's keyed hash once the request is closed (for the
message log's retention); the writer asks for the requests made since its oldest held-back
record and leaves out what they erased.
"""

from __future__ import annotations

from .backend import ErasureMark, StoreBackend, complaint_hash


def _normalise(address: str) -> str:
    return address.strip().lower()


class ErasedSince:
    """The erasures a write held back since ``since`` must respect (docs/store.md, "When the
    database is down"): a log row or a suppression entry recorded before an erasure request of
    its address, and written to the store only after it, would bring the address back.
    ``erased(address, ts)``: an erasure of the address was requested at or after ``ts``."""

    def __init__(self, marks: list[ErasureMark], keys: list[bytes]) -> None:
        self._by_address: dict[str, float] = {}
        self._by_hash: dict[str, float] = {}
        for mark in marks:
            if mark.address is not None:
                a = _normalise(mark.address)
                self._by_address[a] = max(self._by_address.get(a, mark.requested),
                                          mark.requested)
            if mark.address_hash is not None:
                h = mark.address_hash
                self._by_hash[h] = max(self._by_hash.get(h, mark.requested), mark.requested)
        self._keys = keys if self._by_hash else []

    def __bool__(self) -> bool:
        return bool(self._by_address or self._by_hash)

    def erased(self, address: str | None, ts: float) -> bool:
        if not address:
            return False
        a = _normalise(address)
        if self._by_address.get(a, -1.0) >= ts:
            return True
        return any(self._by_hash.get(complaint_hash(key, a), -1.0) >= ts for key in self._keys)


async def erased_since(backend: StoreBackend, since: float) -> ErasedSince:
    """The erasures requested at or after ``since`` (a store read; raises when it fails)."""
    marks = await backend.erasures_since(since)
    keys = await backend.erasure_keys() if any(m.address_hash for m in marks) else []
    return ErasedSince(marks, keys)
