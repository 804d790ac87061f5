"""MTA-STS (RFC 8461): which MX hosts of a recipient domain may receive its mail, and whether
TLS to them must verify.

A domain announces a policy with a TXT record at ``_mta-sts.<domain>`` (``v=STSv1; id=...``)
and serves it at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``. :class:`MTASTS` looks the
record up for every delivery attempt (the resolver caches it for its TTL), fetches the policy
when the ``id`` changed or half its lifetime has passed (then also when the TXT lookup fails or
finds no record: section 5.1), and keeps policies in memory and in a JSON file, so that after a
restart an ``enforce`` policy holds even while its web server is down.

The fetch follows section 3.3: HTTPS with a certificate valid for ``mta-sts.<domain>``, no
redirects, status 200, ``text/plain``, at most 64 KiB, within ``fetchTimeout``. A failed fetch
leaves a cached policy in force until it expires; a domain without a usable cached policy is
treated as having none (section 5). Fetches for one domain are not repeated more often than
every :data:`FETCH_RETRY` seconds after a failure. A delivery waits at most ``fetchTimeout``
for one of the :data:`FETCH_CONCURRENCY` fetch slots; a domain whose fetch got none keeps its
cached policy, or without one has its mail deferred.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiohttp

from ..config import MTASTSSettings
from ..files import replace_durably
from ..mx import DNSFailure, MXResolver, ascii_domain

log = logging.getLogger(__name__)

MAX_POLICY_BYTES = 64 * 1024
FETCH_RETRY = 300.0  # seconds between fetch attempts for a domain whose fetch failed
MAX_CACHED = 50_000  # policies kept; the soonest to expire go first
FETCH_CONCURRENCY = 16  # policy fetches running at once (a slow web server holds one)
RFC_MAX_AGE = 31557600

Mode = Literal["enforce", "testing", "none"]
_MODES: dict[str, Mode] = {"enforce": "enforce", "testing": "testing", "none": "none"}
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")
_STS_RECORD = re.compile(r"v=STSv1[ \t]*;")  # "v=STSv1" and a field delimiter (section 3.1)


class PolicyError(Exception):
    """``result`` is the RFC 8460 result type: sts-policy-fetch-error or sts-policy-invalid."""

    def __init__(self, message: str, result: str = "sts-policy-invalid") -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True, slots=True)
class Policy:
    domain: str
    policy_id: str  # the TXT record's id when this policy was fetched
    mode: Mode
    mx: tuple[str, ...]
    max_age: int
    fetched_at: float  # epoch seconds
    expires_at: float

    def matches(self, host: str) -> bool:
        """Whether an MX host name is one the policy allows (section 4.1): an exact name, or
        ``*.example.com`` for exactly one more label on the left."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                head, dot, rest = host.partition(".")
                if head and dot and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    def to_json(self) -> dict[str, object]:
        return {"id": self.policy_id, "mode": self.mode, "mx": list(self.mx),
                "maxAge": self.max_age, "fetchedAt": self.fetched_at,
                "expiresAt": self.expires_at}

    @classmethod
    def from_json(cls, domain: str, raw: dict[str, object]) -> Policy:
        mode = _MODES[str(raw["mode"])]
        mx = raw["mx"]
        if not isinstance(mx, list) or not all(isinstance(m, str) for m in mx):
            raise ValueError("mx")
        return cls(domain, str(raw["id"]), mode, tuple(mx), int(str(raw["maxAge"])),
                   float(str(raw["fetchedAt"])), float(str(raw["expiresAt"])))


# ------------------------------------------------------------------------------ parsing


def parse_txt(records: list[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records, or None when the domain announces no
    (valid) policy: records not starting with ``v=STSv1;`` are ignored, and anything but exactly
    one remaining valid record means no policy (section 3.1)."""
    found = [r for r in records if _STS_RECORD.match(r)]
    if len(found) != 1:
        return None
    fields: dict[str, str] = {}
    for raw in found[0].split(";"):
        part = raw.strip(" \t")
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            return None
        fields.setdefault(key, value)
    if fields.get("v") != "STSv1":
        return None
    policy_id = fields.get("id", "")
    return policy_id if _ID.match(policy_id) else None


def parse_policy(text: str, *, domain: str, policy_id: str, now: float, max_age_cap: float
                 ) -> Policy:
    """A policy file (section 3.2): ``key: value`` lines. The first instance of a key counts
    (``mx`` may repeat); unknown keys are ignored. Raises PolicyError naming what is wrong."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        key, value = key.strip(), value.strip(" \t")
        if not colon or not _KEY.match(key):
            raise PolicyError(f"line {line[:40]!r} is not 'key: value'")
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    raw_mode = fields.get("mode", "")
    mode = _MODES.get(raw_mode)
    if mode is None:
        raise PolicyError(f"mode {raw_mode[:20]!r} is not enforce, testing or none")
    raw_age = fields.get("max_age", "")
    if not raw_age.isdigit() or len(raw_age) > 10:
        raise PolicyError(f"max_age {raw_age[:20]!r} is not a number of seconds")
    if mode != "none" and not mx:
        raise PolicyError("no mx pattern")
    for pattern in mx:
        name = pattern[2:] if pattern.startswith("*.") else pattern
        if not name or "*" in name or not all(
                label and len(label) < 64 for label in name.split(".")):
            raise PolicyError(f"mx {pattern[:80]!r} is not a host name or *.domain pattern")
    max_age = min(int(raw_age), RFC_MAX_AGE)
    lifetime = min(float(max_age), max_age_cap)
    return Policy(domain, policy_id, mode, tuple(mx), max_age, now, now + lifetime)


# ------------------------------------------------------------------------------ fetching


def _host_in_url(address: str) -> str:
    return f"[{address}]" if ":" in address else address


async def fetch_policy_text(domain: str, addresses: list[str], ctx: ssl.SSLContext,
                            limit: float) -> str:
    """GET the policy from the first address that answers; the certificate must be valid for
    ``mta-sts.<domain>``. Raises PolicyError (``sts-policy-fetch-error`` or, for a body that is
    not a policy file, ``sts-policy-invalid``)."""
    host = f"mta-sts.{domain}"
    error = PolicyError(f"no address for {host}", "sts-policy-fetch-error")
    client_timeout = aiohttp.ClientTimeout(total=limit)
    for address in addresses[:2]:
        url = f"https://{_host_in_url(address)}/.well-known/mta-sts.txt"
        try:
            async with asyncio.timeout(limit), aiohttp.ClientSession(
                    timeout=client_timeout, auto_decompress=False) as session, session.get(
                    url, headers={"Host": host, "Accept": "text/plain",
                                  "Accept-Encoding": "identity"}, ssl=ctx,
                    server_hostname=host, allow_redirects=False) as resp:
                if resp.status != 200:
                    # Section 3.3: redirects are not followed; anything but 200 is a failure.
                    raise PolicyError(f"{host} answered HTTP {resp.status}",
                                      "sts-policy-fetch-error")
                if resp.content_type != "text/plain":
                    raise PolicyError(f"{host} served {resp.content_type[:60]!r}, "
                                      "not text/plain", "sts-policy-invalid")
                if (resp.content_length or 0) > MAX_POLICY_BYTES:
                    raise PolicyError(f"{host}: policy larger than {MAX_POLICY_BYTES} bytes")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(8192):
                    body += chunk
                    if len(body) > MAX_POLICY_BYTES:
                        raise PolicyError(
                            f"{host}: policy larger than {MAX_POLICY_BYTES} bytes")
            try:
                return body.decode("utf-8")
            except UnicodeDecodeError:
                raise PolicyError(f"{host}: policy is not UTF-8 text") from None
        except PolicyError:
            raise
        except TimeoutError:
            error = PolicyError(f"{host}: no policy within {limit:g}s",
                                "sts-policy-fetch-error")
        except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            text = " ".join(str(exc).split())[:160]
            error = PolicyError(f"{host}: {type(exc).__name__}: {text}",
                                "sts-policy-fetch-error")
    raise error


# ------------------------------------------------------------------------------ the cache


@dataclass(frozen=True, slots=True)
class Lookup:
    """What delivery does for a domain: ``policy`` in force (None: no policy), the RFC 8460
    result type of a failed refresh (a cached policy may still be in force), and ``defer``,
    a reply to defer the mail with when whether a policy is in force is not known."""

    policy: Policy | None
    failure: str | None = None
    failure_reason: str = ""
    defer: str | None = None  # an SMTP reply: defer the mail, the policy is not known


def _refresh_due(policy: Policy, now: float) -> bool:
    """Half the policy's lifetime has passed: time to fetch it again."""
    return now >= policy.fetched_at + (policy.expires_at - policy.fetched_at) / 2


class MTASTS:
    """Policies of recipient domains, per relay worker; persisted to ``cache_file``."""

    def __init__(self, cache_file: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.cache_file = cache_file
        self._clock = clock
        self._policies: dict[str, Policy] = {}
        self._failed_until: dict[str, float] = {}  # no new fetch before this
        self._fetching: dict[str, asyncio.Future[Lookup]] = {}
        self._contexts: dict[str | None, ssl.SSLContext] = {}
        self._loading: asyncio.Future[None] | None = None
        self._dirty = False
        self._saver: asyncio.Task[None] | None = None
        self._fetch_slots = asyncio.Semaphore(FETCH_CONCURRENCY)
        self.fetches = 0  # for tests

    def cached(self, domain: str) -> Policy | None:
        policy = self._policies.get(domain)
        if policy is not None and self._clock() >= policy.expires_at:
            del self._policies[domain]
            return None
        return policy

    def context(self, ca_file: str | None) -> ssl.SSLContext:
        """The verifying context for policy fetches and MX hosts under an enforce policy."""
        ctx = self._contexts.get(ca_file)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=ca_file)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._contexts[ca_file] = ctx
        return ctx

    def reset_contexts(self) -> None:
        self._contexts.clear()

    async def lookup(self, domain: str, resolver: MXResolver, settings: MTASTSSettings, *,
                     dns_slots: asyncio.Semaphore) -> Lookup:
        """The policy in force for ``domain``; the TXT lookup takes one of ``dns_slots`` (the
        queue's routing slots), a fetch one of this object's own. ``domain`` is cached, looked
        up and fetched under its A-label name (see :func:`ascii_domain`)."""
        name = ascii_domain(domain)
        if name is None:
            return Lookup(None)
        domain = name
        if self._loading is None:
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load))
        # Every lookup waits for the file: one that went ahead with an empty cache could
        # miss an enforce policy whose web server is down.
        await asyncio.shield(self._loading)
        cached = self.cached(domain)
        try:
            async with dns_slots:
                records = await resolver.txt(f"_mta-sts.{domain}")
            policy_id = parse_txt(records)
        except DNSFailure:
            policy_id = None
        now = self._clock()
        if policy_id is None:
            # No (valid) record, or its lookup failed: the cached policy stays in force
            # (section 5), and is refreshed over HTTPS all the same once half its lifetime has
            # passed (section 5.1), so that an attacker who blocks the TXT lookup for longer
            # than max_age cannot make an enforce policy lapse.
            if cached is None or not _refresh_due(cached, now):
                return Lookup(cached)
            policy_id = cached.policy_id
        elif cached is not None and cached.policy_id == policy_id and \
                not _refresh_due(cached, now):
            return Lookup(cached)
        if now < self._failed_until.get(domain, 0.0):
            return Lookup(cached)
        running = self._fetching.get(domain)
        if running is not None:
            # Wait for the fetch another delivery started, without taking on its failure.
            await asyncio.wait([running])
            if running.cancelled() or running.exception() is not None:
                return Lookup(self.cached(domain))
            return running.result()
        future: asyncio.Future[Lookup] = asyncio.get_running_loop().create_future()
        self._fetching[domain] = future
        try:
            result = await self._refresh_in_slot(domain, policy_id, cached, resolver, settings)
            future.set_result(result)
            return result
        except BaseException:
            future.cancel()  # waiters fall back to the cached policy
            raise
        finally:
            del self._fetching[domain]

    async def _refresh_in_slot(self, domain: str, policy_id: str, cached: Policy | None,
                               resolver: MXResolver, settings: MTASTSSettings) -> Lookup:
        """The fetch, in one of the fetch slots. The wait for a slot is bounded by
        ``fetchTimeout``: slow policy web servers that hold every slot must not hold up
        deliveries to other domains without limit. A domain whose fetch got no slot in time
        keeps its cached policy; one without a cached policy is deferred (it might publish
        enforce), never delivered as without a policy."""
        try:
            async with asyncio.timeout(settings.fetch_timeout):
                await self._fetch_slots.acquire()
        except TimeoutError:
            if cached is not None:
                log.info("mta-sts: no fetch slot for %s within %gs; the cached policy stays "
                         "in force", domain, settings.fetch_timeout)
                return Lookup(cached)
            log.warning("mta-sts: no fetch slot for %s within %gs (%d policy fetches busy); "
                        "deferring its mail", domain, settings.fetch_timeout,
                        FETCH_CONCURRENCY)
            return Lookup(None, defer=(
                f"451 4.4.3 MTA-STS policy of {domain} not fetched: all {FETCH_CONCURRENCY} "
                f"policy fetches busy for {settings.fetch_timeout:g}s; deferred, not sent "
                "without its policy"))
        try:
            return await self._refresh(domain, policy_id, cached, resolver, settings)
        finally:
            self._fetch_slots.release()

    async def _refresh(self, domain: str, policy_id: str, cached: Policy | None,
                       resolver: MXResolver, settings: MTASTSSettings) -> Lookup:
        self.fetches += 1
        host = f"mta-sts.{domain}"
        try:
            try:
                addresses = await resolver.addresses(host)
            except DNSFailure as exc:
                raise PolicyError(f"{host}: {exc.reply[10:]}", "sts-policy-fetch-error") \
                    from None
            text = await fetch_policy_text(domain, addresses, self.context(settings.ca_file),
                                           settings.fetch_timeout)
            policy = parse_policy(text, domain=domain, policy_id=policy_id,
                                  now=self._clock(), max_age_cap=settings.max_age)
        except PolicyError as exc:
            now = self._clock()
            if len(self._failed_until) >= MAX_CACHED:
                self._failed_until = {d: t for d, t in self._failed_until.items() if t > now}
            self._failed_until[domain] = now + FETCH_RETRY
            log.warning("mta-sts: policy of %s not refreshed (%s); %s", domain, exc,
                        "the cached policy stays in force" if cached else
                        "delivering as without a policy")
            return Lookup(cached, exc.result, str(exc))
        self._failed_until.pop(domain, None)
        self._policies[domain] = policy
        if len(self._policies) > MAX_CACHED:
            for name, _ in sorted(self._policies.items(), key=lambda kv: kv[1].expires_at)[
                    :len(self._policies) - MAX_CACHED]:
                del self._policies[name]
        if cached is None or cached.mode != policy.mode or cached.mx != policy.mx:
            log.info("mta-sts: %s has policy id %s: mode %s, mx %s", domain, policy_id,
                     policy.mode, ",".join(policy.mx[:10])[:300])
        self._schedule_save()
        return Lookup(policy)

    # ---------------------------------------------------------------- persistence

    def _load(self) -> None:
        try:
            raw = json.loads(self.cache_file.read_text())
            entries = raw["policies"]
            assert isinstance(entries, dict)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
            log.warning("mta-sts: cache %s not read (%s); starting without cached policies",
                        self.cache_file, type(exc).__name__)
            return
        now = self._clock()
        for domain, entry in entries.items():
            try:
                policy = Policy.from_json(str(domain), entry)
            except (KeyError, ValueError, TypeError):
                continue
            if policy.expires_at > now and domain not in self._policies:
                self._policies[domain] = policy
        log.info("mta-sts: %d cached policies loaded from %s", len(self._policies),
                 self.cache_file)

    def _schedule_save(self) -> None:
        """Write the cache in the background, one write at a time: a burst of new policies
        (the first hours after a deployment) makes a few writes, and no delivery waits."""
        self._dirty = True
        if self._saver is None or self._saver.done():
            self._saver = asyncio.get_running_loop().create_task(
                self._save_while_dirty(), name="mta-sts-save")

    async def _save_while_dirty(self) -> None:
        while self._dirty:
            self._dirty = False
            mine = dict(self._policies)
            try:
                await asyncio.to_thread(self._merge_and_write, mine)
            except OSError as exc:
                log.error("mta-sts: cannot write the policy cache %s: %s", self.cache_file,
                          exc.strerror)
            except Exception:
                log.exception("mta-sts: writing the policy cache %s failed", self.cache_file)

    async def flush(self) -> None:
        """Wait for the cache file to hold every policy fetched so far (at shutdown)."""
        if self._saver is not None:
            await asyncio.shield(self._saver)

    def _merge_and_write(self, mine: dict[str, Policy]) -> None:
        """Worker processes share the file: keep the other workers' policies, the most
        recently fetched one per domain, and drop the expired ones. The read, merge and write
        hold an exclusive lock on a file beside it: two workers writing at once would each
        write what it read before the other's write, and one's policies would be lost."""
        lock = self.cache_file.with_name(f".{self.cache_file.name}.lock")
        with open(lock, "a") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            self._merge_and_write_locked(mine)

    def _merge_and_write_locked(self, mine: dict[str, Policy]) -> None:
        now = self._clock()
        merged: dict[str, Policy] = {}
        try:
            entries = json.loads(self.cache_file.read_text()).get("policies", {})
        except (OSError, ValueError, AttributeError):
            entries = {}
        if isinstance(entries, dict):
            for domain, entry in entries.items():
                with contextlib.suppress(KeyError, ValueError, TypeError):
                    merged[str(domain)] = Policy.from_json(str(domain), entry)
        for domain, policy in mine.items():
            other = merged.get(domain)
            if other is None or other.fetched_at <= policy.fetched_at:
                merged[domain] = policy
        live = sorted((p for p in merged.values() if p.expires_at > now),
                      key=lambda p: p.expires_at, reverse=True)[:MAX_CACHED]
        data = {"version": 1, "policies": {p.domain: p.to_json() for p in live}}
        replace_durably(self.cache_file, json.dumps(data, sort_keys=True).encode())


