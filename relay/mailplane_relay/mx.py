"""Where mail for a domain goes: MX lookup (RFC 5321 section 5) with dnspython's async resolver.

Outcomes are typed so the delivery queue can act on them without knowing DNS:
:class:`MXRoute` (hosts in preference order), :class:`PermanentDNSFailure` (bounce: no such
domain, null MX, no address at all) and :class:`TemporaryDNSFailure` (defer: SERVFAIL, timeout,
no answer from any server).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from .config import ResolverSettings

# Cached answers spare a DNS round trip per message to the same domain; dnspython honours
# each record's TTL.
_CACHE_SIZE = 10_000


class DNSFailure(Exception):
    """``reply`` is an SMTP-style reply that goes to the message log and into a DSN."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class PermanentDNSFailure(DNSFailure):
    pass


class TemporaryDNSFailure(DNSFailure):
    pass


@dataclass(frozen=True, slots=True)
class MXRoute:
    domain: str
    hosts: tuple[str, ...]  # preference order; equal preferences shuffled
    implicit: bool = False  # no MX record: the domain's own address (RFC 5321 5.1)

    @property
    def destination(self) -> str:
        """Domains served by the same hosts share connections and concurrency limits."""
        return "mx:" + ",".join(sorted(self.hosts))


def build_resolver(settings: ResolverSettings) -> dns.asyncresolver.Resolver:
    if settings.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = list(settings.nameservers)
        resolver.port = settings.port
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.timeout = settings.timeout
    resolver.lifetime = settings.timeout
    resolver.cache = dns.resolver.LRUCache(_CACHE_SIZE)
    return resolver


def ascii_domain(domain: str) -> str | None:
    """The name a recipient domain has in DNS, in certificates and in an HTTP Host header:
    lower case, internationalised labels as A-labels (IDNA 2008, as the resolver encodes them),
    no trailing dot. None for a name that cannot be encoded."""
    try:
        name = dns.name.from_text(domain.rstrip("."))
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None
    return name.to_text(omit_final_dot=True).lower()


class MXResolver:
    def __init__(self, settings: ResolverSettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._resolver = build_resolver(settings)
        self._rng = rng or random.Random()

    async def route(self, domain: str) -> MXRoute:
        domain = domain.lower().rstrip(".")
        if not domain or domain.startswith("["):
            raise PermanentDNSFailure(f"550 5.1.2 Address literal or empty domain {domain!r} "
                                      "is not accepted for delivery")
        # The name DNS, certificates and MTA-STS policies know: an implicit MX host (the
        # domain itself) is verified and matched under it.
        domain = ascii_domain(domain) or domain
        try:
            answer = await self._resolver.resolve(domain, "MX", search=False)
        except dns.resolver.NXDOMAIN:
            raise PermanentDNSFailure(f"550 5.1.2 Domain {domain} does not exist (NXDOMAIN)") \
                from None
        except dns.resolver.NoAnswer:
            return MXRoute(domain, (domain,), implicit=True)
        except dns.exception.DNSException as exc:  # SERVFAIL, timeouts: try again later
            raise TemporaryDNSFailure(
                f"451 4.4.3 MX lookup for {domain} failed: {type(exc).__name__}") from None
        records = [(int(r.preference), r.exchange) for r in answer]
        if any(exchange == dns.name.root for _, exchange in records):
            # RFC 7505: a null MX says the domain accepts no mail at all.
            raise PermanentDNSFailure(f"556 5.1.10 Domain {domain} accepts no mail (null MX)")
        records.sort(key=lambda r: (r[0], self._rng.random()))
        hosts = tuple(exchange.to_text(omit_final_dot=True).lower() for _, exchange in records)
        return MXRoute(domain, hosts)

    async def addresses(self, host: str) -> list[str]:
        """IPv4 addresses first, IPv6 when there is no IPv4. Raises TemporaryDNSFailure (a
        broken MX host name is more often a transient than a permanent fault) or
        PermanentDNSFailure when the name does not exist."""
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(host, rdtype, search=False)
            except dns.resolver.NXDOMAIN:
                raise PermanentDNSFailure(f"550 5.1.2 Host {host} does not exist") from None
            except dns.resolver.NoAnswer:
                continue
            except dns.exception.DNSException as exc:
                raise TemporaryDNSFailure(
                    f"451 4.4.3 Address lookup for {host} failed: {type(exc).__name__}"
                ) from None
            found.extend(r.to_text() for r in answer)
            if found:
                break
        if not found:
            raise PermanentDNSFailure(f"550 5.1.2 Host {host} has no address")
        return found

    async def txt(self, name: str) -> list[str]:
        """The TXT records of ``name``, each record's strings joined (RFC 7208 3.3 style);
        [] when the name or the record does not exist. Raises TemporaryDNSFailure."""
        try:
            answer = await self._resolver.resolve(name, "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            raise TemporaryDNSFailure(
                f"451 4.4.3 TXT lookup for {name} failed: {type(exc).__name__}") from None
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
