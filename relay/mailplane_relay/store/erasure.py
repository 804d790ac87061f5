"""Erasure of an address on request (the privacy policy's right to deletion), across the pool.

``erase_address`` deletes the address's log rows and suppression entry from the store (a
complaint stays as a keyed hash). ``erase_across_pool`` also records an erasure request: every
relay worker that is alive (seen by the store within ``PEER_HORIZON``) polls for requests every
``POLL_INTERVAL``, erases the address from its own spool (pending messages it sent are deleted,
it is dropped from the recipients of the others), flushes its message log and reports its
counts. When no live worker is left to report, the store-side erasure runs once more (for rows
written meanwhile), the request is closed, its address dropped and the report kept. A worker or
the CLI, whichever sees it first, closes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from .backend import EraseReport, ErasureState, StoreBackend, complaint_hash
from .suppression import normalise

POLL_INTERVAL = 5.0  # how often each worker looks for requests
# A worker not seen for this long is not waited for (it is down; see docs/store.md).
PEER_HORIZON = 60.0
DEFAULT_TIMEOUT = 60.0
# The report's count of workers that were down (seen within a day, not within PEER_HORIZON)
# and did not erase their spools; a report with it is not complete.
UNREACHABLE = "workers_unreachable"


def is_complete(report: dict[str, int] | None) -> bool:
    return report is not None and not report.get(UNREACHABLE)


async def erase_address(backend: StoreBackend, address: str) -> EraseReport:
    """Delete every log row and suppression entry of ``address`` from the store.

    A complaint is kept as a keyed hash of the address: the complainant still gets no mail,
    and the store no longer holds the address."""
    address = normalise(address)
    key = await backend.erasure_key()
    return await backend.erase(address, keep_hash=complaint_hash(key, address))


def _merge(report: EraseReport, counts: dict[str, int]) -> None:
    for place, n in counts.items():
        report.add(place, n)


async def complete_if_done(backend: StoreBackend, request_id: int,
                           now: float | None = None) -> ErasureState | None:
    """Close the request if every live worker has reported; its state afterwards."""
    now = time.time() if now is None else now
    state = await backend.erasure_state(request_id, now, PEER_HORIZON)
    if state is None or state.completed is not None or state.waiting or state.address is None:
        return state
    report = await erase_address(backend, state.address)
    for counts in state.worker_reports:
        _merge(report, counts)
    report.counts["workers"] = len(state.worker_reports)
    if state.unreachable:
        # Down workers were not waited for: their spools may still name the address.
        report.counts[UNREACHABLE] = state.unreachable
    key = await backend.erasure_key()
    await backend.erasure_complete(request_id, now, report.counts,
                                   address_hash=complaint_hash(key, state.address))
    return await backend.erasure_state(request_id, now, PEER_HORIZON)


async def erase_across_pool(
    backend: StoreBackend, address: str, *, wait_for: float = DEFAULT_TIMEOUT,
    poll: float = 0.5, wait: bool = True,
) -> tuple[int, EraseReport, bool]:
    """Erase now from the store, request the spools' part, and (``wait``) wait up to
    ``wait_for`` seconds for every live worker. Returns (request id, report so far, complete?):
    complete only when closed with no worker left out (``UNREACHABLE``)."""
    address = normalise(address)
    first = await erase_address(backend, address)
    request_id = await backend.erasure_request(address, time.time())
    deadline = time.monotonic() + wait_for
    while True:
        state = await complete_if_done(backend, request_id)
        if state is not None and state.completed is not None:
            report = EraseReport(dict(state.report or {}))
            _merge(report, first.counts)
            return request_id, report, is_complete(state.report)
        if not wait or time.monotonic() >= deadline:
            report = EraseReport(dict(first.counts))
            for counts in state.worker_reports if state else []:
                _merge(report, counts)
            return request_id, report, False
        await asyncio.sleep(poll)


async def carry_out_requests(
    backend: StoreBackend, peer: str,
    erase_spool: Callable[[str], Awaitable[dict[str, int]]],
) -> int:
    """One pass of a worker: note itself alive, carry out the open requests it has not yet,
    close those nobody else is waited for. Returns how many it carried out."""
    now = time.time()
    await backend.peers(peer, now, PEER_HORIZON)
    done = 0
    for request_id, address in await backend.erasure_pending(peer):
        counts = await erase_spool(address)
        await backend.erasure_progress(request_id, peer, time.time(), counts)
        await complete_if_done(backend, request_id)
        done += 1
    return done
