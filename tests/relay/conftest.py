"""Fixtures shared by the in-process relay tests of this folder."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mailplane_relay.config import RelayConfig
from tests.relay.test_delivery_flows import Relay


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Callable[[RelayConfig], Awaitable[Relay]]]:
    """Start in-process relays (spool, delivery queue, message log) from a configuration; all
    are stopped at the end of the test."""
    relays: list[Relay] = []

    async def make(config: RelayConfig) -> Relay:
        r = Relay(tmp_path / f"r{len(relays)}", config)
        await r.start()
        relays.append(r)
        return r

    yield make
    for r in relays:
        await r.stop()
