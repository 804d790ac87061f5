"""Erasure of an address on request (the privacy policy's right to deletion)."""

from __future__ import annotations

from .backend import EraseReport, StoreBackend, complaint_hash
from .suppression import normalise


async def erase_address(backend: StoreBackend, address: str) -> EraseReport:
    """Delete every log row and suppression entry of ``address`` from the store.

    A complaint is kept as a keyed hash of the address: the complainant still gets no mail,
    and the store no longer holds the address."""
    address = normalise(address)
    key = await backend.erasure_key()
    return await backend.erase(address, keep_hash=complaint_hash(key, address))
