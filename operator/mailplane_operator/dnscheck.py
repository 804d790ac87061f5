"""DNS lookups for SendingDomain verification (TXT records), against a configurable resolver.

A lookup that gets an answer (records, NXDOMAIN or no TXT data) is a result; a lookup that fails
(timeout, SERVFAIL, no reachable server) is ``None``, so that a DNS outage reads as "could not
check" and never as "the record is gone".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

logger = logging.getLogger(__name__)


def parse_resolver(text: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT`` -> (address, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    else:
        host, port = text, 53
    if not host or not 0 < port < 65536:
        raise ValueError(f"{text!r} is not a resolver address such as 10.0.0.10 or "
                         "127.0.0.1:5353")
    return host, port


class DnsChecker:
    """TXT lookups with one overall deadline per name."""

    def __init__(self, nameserver: tuple[str, int] | None = None, *,
                 timeout: float = 5.0) -> None:
        if nameserver is None:
            self._resolver = dns.asyncresolver.Resolver()
        else:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [nameserver[0]]
            self._resolver.port = nameserver[1]
        self._resolver.lifetime = timeout
        self._resolver.timeout = min(timeout, 2.0)
        self._resolver.cache = None  # verification must see changes as soon as DNS serves them

    async def txt(self, name: str) -> list[str] | None:
        return (await self.txt_with_error(name))[0]

    async def txt_with_error(self, name: str) -> tuple[list[str] | None, str | None]:
        """(answers, None), or (None, why the lookup failed) for a timeout, SERVFAIL or no
        reachable nameserver. NXDOMAIN and no TXT data are answers: ``[]``."""
        try:
            answer = await self._resolver.resolve(name, dns.rdatatype.TXT, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [], None
        except (dns.exception.Timeout, dns.resolver.LifetimeTimeout):
            why = "timeout"
        except dns.resolver.NoNameservers:
            why = "no nameserver answered (SERVFAIL or refused)"
        except dns.exception.DNSException as exc:
            why = type(exc).__name__
        else:
            return [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer], None
        logger.info("TXT lookup of %s failed: %s", name, why)
        return None, why

    async def lookup(self, names: Sequence[str]) -> dict[str, list[str] | None]:
        return (await self.lookup_with_errors(names))[0]

    async def lookup_with_errors(
        self, names: Sequence[str],
    ) -> tuple[dict[str, list[str] | None], dict[str, str]]:
        """(name -> answers or None, name -> why its lookup failed)."""
        results = await asyncio.gather(*(self.txt_with_error(n) for n in names))
        observed = {n: r[0] for n, r in zip(names, results, strict=True)}
        errors = {n: r[1] for n, r in zip(names, results, strict=True) if r[1] is not None}
        return observed, errors
