"""A real DNS server on loopback (UDP and TCP on one free port), built on dnslib.

Tests set the records it serves (MX, A, AAAA, TXT) and faults per name (SERVFAIL, no answer),
then point dnspython or dkimpy at it::

    def test_x(dns_server):
        dns_server.add_txt("sel._domainkey.example.com", "v=DKIM1; k=rsa; p=...")
        dkim.verify(message, dnsfunc=dns_server.dkim_dnsfunc)

Plain use outside pytest: ``with running_dns_server() as server: ...``.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dns.asyncresolver
import dns.resolver
import pytest
from dnslib import AAAA, MX, QTYPE, RCODE, RR, TXT, A, DNSRecord
from dnslib.server import DNSError, DNSHandler, DNSServer, TCPServer, UDPServer


def _norm(name: str) -> str:
    return name.lower().rstrip(".") + "."


class _QuietLogger:
    """dnslib's default logger prints every packet to stdout."""

    def __getattr__(self, _name: str) -> Callable[..., None]:
        return lambda *args: None


@dataclass
class _Zone:
    records: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    servfail: set[str] = field(default_factory=set)
    drop: set[str] = field(default_factory=set)
    queries: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, protocol)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Resolver:
    def __init__(self, zone: _Zone) -> None:
        self.zone = zone

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        qname = _norm(str(request.q.qname))
        qtype = QTYPE[request.q.qtype]
        with self.zone.lock:
            self.zone.queries.append((qname, qtype, handler.protocol))
            if qname in self.zone.drop:
                # No reply at all: the client times out, like a dead authoritative server.
                raise DNSError(f"dropping query for {qname}")
            if qname in self.zone.servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            answers = list(self.zone.records.get((qname, qtype), ()))
            name_exists = any(name == qname for name, _ in self.zone.records)
        if not answers and not name_exists:
            reply.header.rcode = RCODE.NXDOMAIN
        for rdata in answers:
            reply.add_answer(RR(qname, QTYPE.reverse[qtype], rdata=rdata, ttl=60))
        return reply


class LoopbackDNS:
    """A started DNS server; records and faults may change while it runs."""

    def __init__(self, *, standard_port: bool = False) -> None:
        """``standard_port``: listen on port 53 of an address of its own in 127.0.0.0/8, for
        clients that take only a nameserver address from resolv.conf (libopendkim)."""
        self.zone = _Zone()
        resolver = _Resolver(self.zone)
        logger = _QuietLogger()
        for _ in range(20):
            address = "127.0.0.1"
            if standard_port:
                address = f"127.53.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
            try:
                udp = DNSServer(resolver, address=address, port=53 if standard_port else 0,
                                logger=logger, server=UDPServer)
            except OSError:
                continue
            port = int(udp.server.server_address[1])
            try:
                tcp = DNSServer(resolver, address=address, port=port, tcp=True,
                                logger=logger, server=TCPServer)
            except OSError:
                udp.server.server_close()
                continue
            break
        else:
            raise RuntimeError("no free address and port for both UDP and TCP DNS")
        self.address = address
        self.port = port
        self._servers = (udp, tcp)
        self._threads = [
            # A short poll interval keeps shutdown (which waits for one poll) fast.
            threading.Thread(target=s.server.serve_forever, kwargs={"poll_interval": 0.02},
                             name=f"dns-{kind}", daemon=True)
            for s, kind in ((udp, "udp"), (tcp, "tcp"))
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        for server in self._servers:
            server.server.shutdown()
            server.server.server_close()
        for thread in self._threads:
            thread.join(5)

    # -- records -------------------------------------------------------------------------
    def _add(self, name: str, qtype: str, rdata: Any) -> None:
        with self.zone.lock:
            self.zone.records.setdefault((_norm(name), qtype), []).append(rdata)

    def add_mx(self, name: str, host: str, preference: int = 10) -> None:
        """``host="."`` with preference 0 is a null MX (RFC 7505)."""
        self._add(name, "MX", MX(host if host == "." else _norm(host), preference))

    def add_a(self, name: str, address: str = "127.0.0.1") -> None:
        self._add(name, "A", A(address))

    def add_aaaa(self, name: str, address: str = "::1") -> None:
        self._add(name, "AAAA", AAAA(address))

    def add_txt(self, name: str, text: str) -> None:
        """Long values (DKIM keys) are split into 255-byte strings of one record."""
        raw = text.encode()
        chunks = [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
        self._add(name, "TXT", TXT(chunks))

    def set_servfail(self, name: str, on: bool = True) -> None:
        with self.zone.lock:
            (self.zone.servfail.add if on else self.zone.servfail.discard)(_norm(name))

    def set_drop(self, name: str, on: bool = True) -> None:
        with self.zone.lock:
            (self.zone.drop.add if on else self.zone.drop.discard)(_norm(name))

    def clear(self) -> None:
        with self.zone.lock:
            self.zone.records.clear()
            self.zone.servfail.clear()
            self.zone.drop.clear()

    def queries(self) -> list[tuple[str, str, str]]:
        with self.zone.lock:
            return list(self.zone.queries)

    # -- clients -------------------------------------------------------------------------
    @property
    def nameservers(self) -> list[str]:
        return [self.address]

    def resolver_settings(self, timeout: float = 1.0) -> dict[str, Any]:
        """The relay's ``delivery.resolver`` config section pointing here."""
        return {"nameservers": self.nameservers, "port": self.port, "timeout": timeout}

    def sync_resolver(self, timeout: float = 2.0) -> dns.resolver.Resolver:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = self.nameservers
        r.port = self.port
        r.lifetime = timeout
        r.timeout = timeout
        return r

    def async_resolver(self, timeout: float = 2.0) -> dns.asyncresolver.Resolver:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = self.nameservers
        r.port = self.port
        r.lifetime = timeout
        r.timeout = timeout
        return r

    def dkim_dnsfunc(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """The ``dnsfunc`` argument of ``dkim.verify``: a real TXT query to this server."""
        qname = name.decode() if isinstance(name, bytes) else name
        try:
            answer = self.sync_resolver(timeout=min(timeout, 2.0)).resolve(qname, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
            return None
        for rr in answer:
            return b"".join(rr.strings)
        return None


@contextlib.contextmanager
def running_dns_server(*, standard_port: bool = False) -> Iterator[LoopbackDNS]:
    server = LoopbackDNS(standard_port=standard_port)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dns_server() -> Iterator[LoopbackDNS]:
    with running_dns_server() as server:
        yield server

