"""Loopback ports for programs that cannot bind port 0 themselves (Postfix, smtp-sink,
Prometheus, ...): ``free_port`` picks one, and its caller starts the program again on another
when the program reports "address already in use" (another process may take the port between
the pick and the bind). Servers that can bind port 0 do so and report the port they got."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


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

