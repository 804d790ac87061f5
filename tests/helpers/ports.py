"""Free loopback ports for servers that cannot bind port 0 themselves (subprocesses)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port where nothing listens, for as long as the block runs: the port is bound
    but not listening, so connections to it are refused and no other process can take it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@pytest.fixture
def unused_port() -> Callable[[], int]:
    return free_port
