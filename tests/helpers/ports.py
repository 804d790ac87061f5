"""Free loopback ports for servers that cannot bind port 0 themselves (subprocesses)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def unused_port() -> Callable[[], int]:
    return free_port
