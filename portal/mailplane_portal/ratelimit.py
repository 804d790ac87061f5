"""Login attempts per client address and per user name: token buckets in the portal's memory.

Each key has ``burst`` attempts; they come back at ``per_minute``. A refused attempt says when
to try again (``Retry-After``). The counts are per replica (a few replicas multiply them), which
is enough for what they are for: a script guessing tokens, or one identity opening sessions in a
loop, is slowed to a trickle.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Limiter:
    def __init__(self, *, burst: int, per_minute: float,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 50_000) -> None:
        if burst < 1 or per_minute <= 0:
            raise ValueError("a login rate needs at least 1 attempt and a positive rate")
        self.burst = burst
        self.rate = per_minute / 60.0
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """0 when an attempt is allowed (and counted), else the seconds until one is."""
        now = self.clock()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:  # bounded: the least recent go first
            self._buckets.popitem(last=False)
        return wait

    def held(self, key: str) -> float:
        """0 when an attempt would be allowed now, else the seconds until one is; counts
        nothing (for keys that are charged only when an attempt fails)."""
        now = self.clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate


def retry_after(wait: float) -> str:
    return str(max(1, math.ceil(wait)))


def parse_networks(text: str) -> tuple[Network, ...]:
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            out.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"--trusted-proxies {part!r}: give addresses or networks such as "
                             "10.0.0.0/8, separated by commas") from None
    return tuple(out)


def client_address(remote: str | None, forwarded_for: str | None,
                   trusted: Sequence[Network]) -> str:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the last address
    in ``X-Forwarded-For`` that is not one of the trusted proxies (the ones before it could be
    made up by the client)."""
    def is_trusted(text: str) -> bool:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            return False
        return any(addr in net for net in trusted)

    peer = remote or "unknown"
    if not trusted or not is_trusted(peer) or not forwarded_for:
        return peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        if not is_trusted(hop):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a malformed header: count it against the proxy's address
    return peer
