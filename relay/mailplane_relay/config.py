"""The relay configuration: the versioned contract between the operator and the relay.

The relay owns this module; the operator imports it to render configuration. It imports neither
side (enforced by import-linter), only pydantic and the standard library.

A configuration is a set of YAML documents, read from one file or from every ``*.yaml``/``*.yml``
file of a directory (hidden files and folders, such as the ``..data`` links Kubernetes makes when
it mounts a Secret, are skipped). Exactly one document has ``kind: RelayConfig`` and holds the
settings; any number of ``kind: RelayCredentials`` and ``kind: RelayDomains`` documents add
credentials and sending domains, so that a pool with thousands of them can be spread over several
Secrets, each under the 1 MiB limit. All documents carry ``apiVersion: mailplane.io/v1alpha1``.

Every default lives here, in the field declarations. ``docs/relay-config.md`` documents each field.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

# libyaml's loader when the platform has it (about 4x faster on a config with thousands of
# credentials); same safe subset of YAML either way.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

API_VERSION = "mailplane.io/v1alpha1"
KIND_CONFIG = "RelayConfig"
KIND_CREDENTIALS = "RelayCredentials"
KIND_DOMAINS = "RelayDomains"
KINDS = (KIND_CONFIG, KIND_CREDENTIALS, KIND_DOMAINS)

_DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))+$"
)
_USERNAME_RE = re.compile(r"^[A-Za-z0-9._@+-]{1,128}$")
_SELECTOR_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the field and the fix."""


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``90s``, ``15m``, ``6h``, ``5d``, ``250ms``."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like '15m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value.strip())
        if not match:
            raise ValueError(
                f"{value!r} is not a duration: use a number of seconds or a number with a "
                "unit ms, s, m, h or d, e.g. '90s', '15m', '5d'"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError("a duration must be a number of seconds or a string like '15m'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def domain_of(address: str) -> str:
    """The domain of an address, lower-cased (the whole string when it has no '@')."""
    return address.rpartition("@")[2].lower()


def is_domain(name: str) -> bool:
    return bool(_DOMAIN_RE.match(name))


Duration = Annotated[float, Field(ge=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _as_seconds(_cls: type, value: object) -> float:
    return parse_duration(value)


def _durations(*names: str) -> Any:
    """A validator that accepts '90s', '15m', '5d' or a number of seconds for these fields."""
    return field_validator(*names, mode="before")(classmethod(_as_seconds))


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


class Listener(_Model):
    """One SMTP listener. ``starttls``: plain connect, STARTTLS required before AUTH/MAIL
    (production port 587); ``implicit``: TLS from the first byte (production port 465)."""

    name: str = Field(pattern=r"^[a-z0-9-]{1,32}$")
    address: str = "0.0.0.0"
    port: int = Field(ge=0, le=65535)
    tls: Literal["starttls", "implicit"]


def _default_listeners() -> tuple[Listener, ...]:
    return (
        Listener(name="submission", port=587, tls="starttls"),
        Listener(name="submissions", port=465, tls="implicit"),
    )


class TLSSettings(_Model):
    """Certificate and key files (PEM). Re-read when they change: cert-manager renews in place."""

    cert_file: str = Field(alias="certFile")
    key_file: str = Field(alias="keyFile")
    min_version: Literal["1.2", "1.3"] = Field("1.2", alias="minVersion")
    reload_interval: Duration = Field(10.0, alias="reloadInterval")

    _d = _durations("reload_interval")


class HTTPSettings(_Model):
    """The operations port: ``/metrics``, ``/livez``, ``/readyz``."""

    address: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)


class AdminSettings(_Model):
    """The authenticated administration endpoints (``/admin/...``), served over HTTPS on their
    own port with the relay's serving certificate (``tls``): drain (hand the queue to other
    pods of the pool), hand-off (take a message from a draining pod) and status. Callers
    present a bearer token whose SHA-256 (hex) is ``tokenSHA256``; the token itself is never in
    the configuration. A draining relay hands messages only to peers whose certificate chains
    to ``caFile`` and names ``serverName``. Absent: no ``/admin`` endpoint."""

    token_sha256: str = Field(alias="tokenSHA256", pattern=r"^[0-9a-f]{64}$")
    address: str = "0.0.0.0"
    port: int = Field(8443, ge=0, le=65535)
    ca_file: str | None = Field(None, alias="caFile")
    server_name: str | None = Field(None, alias="serverName", min_length=1, max_length=253)

    @model_validator(mode="after")
    def _verify_pair(self) -> AdminSettings:
        if (self.ca_file is None) != (self.server_name is None):
            raise ValueError(
                "admin.caFile and admin.serverName go together: a draining relay verifies the "
                "peers it hands messages to against caFile and expects serverName in their "
                "certificate; set both (or neither: then this relay hands nothing off)")
        return self


class SpoolSettings(_Model):
    """The durable queue. A message is fsynced (file and directory) before the 250 reply;
    messages that arrive while a sync runs share the next one (group commit, no waiting)."""

    directory: str = "/var/lib/mailplane/spool"
    fsync: bool = True
    # Unreadable files set aside in <directory>/corrupt/ are deleted after this long.
    corrupt_retention: Duration = Field(86400.0, alias="corruptRetention")

    _d = _durations("corrupt_retention")


class SmarthostSettings(_Model):
    host: str
    port: int = Field(587, ge=1, le=65535)
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    username: str | None = None
    password_file: str | None = Field(None, alias="passwordFile")
    verify_tls: bool = Field(True, alias="verifyTls")
    ca_file: str | None = Field(None, alias="caFile")
    # AUTH over a connection without TLS sends the password readable by anyone on the path:
    # refused unless asked for by name (a smarthost on the same host or a private link).
    allow_plaintext_auth: bool = Field(False, alias="allowPlaintextAuth")

    @model_validator(mode="after")
    def _auth_pair(self) -> SmarthostSettings:
        if (self.username is None) != (self.password_file is None):
            raise ValueError(
                "delivery.smarthost.username and delivery.smarthost.passwordFile go together: "
                "set both for AUTH to the smarthost, or neither"
            )
        if self.username is not None and self.tls == "none" and not self.allow_plaintext_auth:
            raise ValueError(
                "delivery.smarthost.tls is 'none' but delivery.smarthost.username is set: the "
                "password would cross the network in clear text; use tls 'starttls' or "
                "'implicit', or set delivery.smarthost.allowPlaintextAuth: true if the path "
                "to the smarthost is private"
            )
        return self


TLSLevel = Literal["none", "may", "encrypt", "verify"]


class TLSPolicyRule(_Model):
    """A TLS level for the MX hosts of some recipient domains (shell-style patterns:
    ``example.com``, ``*.example.com``); the first rule that matches wins."""

    domains: tuple[str, ...] = Field(min_length=1)
    level: TLSLevel

    @field_validator("domains", mode="after")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        patterns = tuple(v.lower().rstrip(".") for v in value)
        for pattern in patterns:
            if not pattern.isascii():
                # Recipient domains are matched as DNS has them (A-labels), whatever the
                # address's spelling: a U-label pattern would never match.
                a_labels = ".".join(
                    label if label.isascii() else "xn--" + label.encode("punycode").decode()
                    for label in pattern.split("."))
                raise ValueError(
                    f"delivery.mxTls.policies: domain {pattern!r} is not ASCII; write "
                    f"internationalised domains in A-labels: {a_labels!r}")
        return patterns


class MXTLSSettings(_Model):
    """TLS toward MX hosts, per destination like Postfix's smtp_tls_policy_maps: ``none`` (no
    STARTTLS), ``may`` (STARTTLS when offered, unverified, clear text when it fails),
    ``encrypt`` (STARTTLS required, unverified: never in clear text), ``verify`` (STARTTLS
    required and the certificate valid for the MX host name)."""

    # Unset: "may", or "none" when delivery.opportunisticTls is false.
    level: TLSLevel | None = None
    # CA bundle for "verify" (default: the system's).
    ca_file: str | None = Field(None, alias="caFile")
    policies: tuple[TLSPolicyRule, ...] = ()


class MTASTSSettings(_Model):
    """MTA-STS (RFC 8461) toward MX hosts: a recipient domain that publishes a policy in
    ``enforce`` mode gets mail only over TLS verified for an MX host its policy names; one in
    ``testing`` mode gets it as usual, with failures counted. A ``delivery.mxTls.policies``
    rule that names the domain wins over its MTA-STS policy."""

    enabled: bool = True
    # CA bundle for the policy fetch (HTTPS) and for MX certificates under an enforce policy.
    ca_file: str | None = Field(None, alias="caFile")
    fetch_timeout: Duration = Field(10.0, alias="fetchTimeout")
    # A policy's max_age is cut to this (RFC 8461 allows up to 31557600 s, a year).
    max_age: Duration = Field(31557600.0, alias="maxAge")
    # Where policies persist across restarts (default: mta-sts-policies.json in the spool).
    cache_file: str | None = Field(None, alias="cacheFile")
    # Policy domains that get a label of their own in the TLS metrics; later ones count
    # as "other".
    report_domains: int = Field(100, alias="reportDomains", ge=0, le=10000)

    _d = _durations("fetch_timeout", "max_age")


class ResolverSettings(_Model):
    """DNS used for MX lookups. Empty ``nameservers``: the system resolver."""

    nameservers: tuple[str, ...] = ()
    port: int = Field(53, ge=1, le=65535)
    timeout: Duration = 5.0

    _d = _durations("timeout")


class ShapingRule(_Model):
    """Limits for the destinations of some recipient domains or MX hosts (shell-style
    patterns: ``example.com``, ``*.example.com``, ``*.mx.example-provider.net``). The first
    rule that matches wins; unset limits fall back to the delivery defaults."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    domains: tuple[str, ...] = ()
    mx_hosts: tuple[str, ...] = Field((), alias="mxHosts")
    max_connections: int | None = Field(None, alias="maxConnections", ge=1)
    messages_per_connection: int | None = Field(None, alias="messagesPerConnection", ge=1)
    per_minute: int | None = Field(None, alias="perMinute", ge=1)
    per_hour: int | None = Field(None, alias="perHour", ge=1)

    @field_validator("domains", "mx_hosts", mode="after")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.lower().rstrip(".") for v in value)

    @model_validator(mode="after")
    def _matches_something(self) -> ShapingRule:
        if not self.domains and not self.mx_hosts:
            raise ValueError(
                f"delivery.shaping rule {self.name!r} matches nothing: give it domains "
                "(recipient domains) or mxHosts (MX host names), e.g. domains: [example.com]"
            )
        return self


class DeliverySettings(_Model):
    mode: Literal["mx", "smarthost"] = "mx"
    smarthost: SmarthostSettings | None = None
    mx_port: int = Field(25, alias="mxPort", ge=1, le=65535)
    resolver: ResolverSettings = ResolverSettings()
    opportunistic_tls: bool = Field(True, alias="opportunisticTls")
    mx_tls: MXTLSSettings = Field(MXTLSSettings(), alias="mxTls")
    mta_sts: MTASTSSettings = Field(MTASTSSettings(), alias="mtaSts")
    # Timeouts: RFC 5321 section 4.5.3.2 gives the minimum for each step.
    connect_timeout: Duration = Field(30.0, alias="connectTimeout")
    greeting_timeout: Duration = Field(300.0, alias="greetingTimeout")
    command_timeout: Duration = Field(60.0, alias="commandTimeout")
    mail_timeout: Duration = Field(300.0, alias="mailTimeout")
    rcpt_timeout: Duration = Field(300.0, alias="rcptTimeout")
    data_timeout: Duration = Field(120.0, alias="dataTimeout")
    data_block_timeout: Duration = Field(180.0, alias="dataBlockTimeout")
    data_done_timeout: Duration = Field(600.0, alias="dataDoneTimeout")
    message_deadline: Duration = Field(600.0, alias="messageDeadline")
    concurrency_per_destination: int = Field(20, alias="concurrencyPerDestination", ge=1)
    max_concurrency: int = Field(200, alias="maxConcurrency", ge=1)
    max_messages_per_connection: int = Field(100, alias="maxMessagesPerConnection", ge=1)
    max_mx_addresses: int = Field(5, alias="maxMxAddresses", ge=1, le=20)
    idle_connection_timeout: Duration = Field(30.0, alias="idleConnectionTimeout")
    helo_name: str | None = Field(None, alias="heloName")
    shaping: tuple[ShapingRule, ...] = ()

    _d = _durations("connect_timeout", "greeting_timeout", "command_timeout", "mail_timeout",
                    "rcpt_timeout", "data_timeout", "data_block_timeout", "data_done_timeout",
                    "message_deadline", "idle_connection_timeout")

    @model_validator(mode="after")
    def _unique_shaping_names(self) -> DeliverySettings:
        names = [rule.name for rule in self.shaping]
        for name in names:
            if name == "default" or names.count(name) > 1:
                raise ValueError(
                    f"delivery.shaping: the rule name {name!r} is "
                    + ("reserved for the defaults" if name == "default" else "used twice")
                    + ": give every rule its own name"
                )
        return self

    def tls_rule(self, domain: str) -> TLSPolicyRule | None:
        """The first ``delivery.mxTls.policies`` rule that names a recipient domain (given in
        A-labels: rules name internationalised domains so)."""
        domain = domain.lower().rstrip(".")
        for rule in self.mx_tls.policies:
            if any(fnmatch.fnmatchcase(domain, pattern) for pattern in rule.domains):
                return rule
        return None

    def tls_level(self, domain: str) -> TLSLevel:
        """The TLS level toward the MX hosts of a recipient domain."""
        rule = self.tls_rule(domain)
        if rule is not None:
            return rule.level
        if self.mx_tls.level is not None:
            return self.mx_tls.level
        return "may" if self.opportunistic_tls else "none"

    @model_validator(mode="after")
    def _smarthost_needed(self) -> DeliverySettings:
        if self.mode == "smarthost" and self.smarthost is None:
            raise ValueError(
                "delivery.mode is 'smarthost' but delivery.smarthost is missing: add "
                "delivery.smarthost.host (and port), or use mode 'mx'"
            )
        return self


class QueueSettings(_Model):
    """Retry policy: attempt ``n`` (from 1) waits ``min(retryInitial * retryFactor**(n-1),
    retryMax)`` scaled by a random factor in ``[1 - retryJitter, 1 + retryJitter]``; a message
    older than ``maxLifetime`` expires instead of being retried."""

    retry_initial: Duration = Field(60.0, alias="retryInitial")
    retry_factor: float = Field(2.0, alias="retryFactor", ge=1.0)
    retry_max: Duration = Field(3600.0, alias="retryMax")
    retry_jitter: float = Field(0.2, alias="retryJitter", ge=0.0, le=1.0)
    max_lifetime: Duration = Field(5 * 86400.0, alias="maxLifetime")
    dsn: bool = True
    # A message still queued this long gets one delay warning DSN (RFC 3464 Action: delayed)
    # for its recipients whose NOTIFY allows it; 0 (or null) sends none.
    delay_warning: Duration = Field(4 * 3600.0, alias="delayWarning")

    _d = _durations("retry_initial", "retry_max", "max_lifetime")

    @field_validator("delay_warning", mode="before")
    @classmethod
    def _delay_warning(cls, value: object) -> float:
        return 0.0 if value is None else parse_duration(value)

    @model_validator(mode="after")
    def _order(self) -> QueueSettings:
        if self.retry_max < self.retry_initial:
            raise ValueError(
                f"queue.retryMax ({self.retry_max}s) is shorter than queue.retryInitial "
                f"({self.retry_initial}s): raise retryMax or lower retryInitial"
            )
        return self


class LimitSettings(_Model):
    max_message_size: int = Field(25 * 1024 * 1024, alias="maxMessageSize", ge=1024)
    max_recipients: int = Field(100, alias="maxRecipients", ge=1)
    max_line_length: int = Field(998, alias="maxLineLength", ge=78)
    default_rate_per_minute: int | None = Field(None, alias="defaultRatePerMinute", ge=1)
    default_daily_quota: int | None = Field(None, alias="defaultDailyQuota", ge=1)
    max_sessions: int = Field(1000, alias="maxSessions", ge=1)
    session_timeout: Duration = Field(300.0, alias="sessionTimeout")
    auth_failure_delay: Duration = Field(1.0, alias="authFailureDelay")
    auth_failure_limit: int = Field(5, alias="authFailureLimit", ge=1)
    auth_failure_window: Duration = Field(300.0, alias="authFailureWindow")
    auth_failure_limit_per_address: int = Field(20, alias="authFailureLimitPerAddress", ge=1)
    max_sessions_per_address: int = Field(50, alias="maxSessionsPerAddress", ge=1)
    auth_deadline: Duration = Field(30.0, alias="authDeadline", gt=0)
    max_session_lifetime: Duration = Field(3600.0, alias="maxSessionLifetime", gt=0)
    max_refused_commands: int = Field(20, alias="maxRefusedCommands", ge=1)
    bare_newline: Literal["normalize", "reject"] = Field("normalize", alias="bareNewline")

    _d = _durations("session_timeout", "auth_failure_delay", "auth_failure_window",
                    "auth_deadline", "max_session_lifetime")


class AbuseSettings(_Model):
    """Automatic pausing of senders whose bounce or complaint rate crosses a threshold
    (acceptable use). Complaints come from feedback-loop reports on the intake listener."""

    pause_senders: bool = Field(True, alias="pauseSenders")
    bounce_rate: float = Field(0.05, alias="bounceRate", gt=0.0, le=1.0)
    # A share of the recipients delivered in the window; 0.1 % as SES pauses at.
    complaint_rate: float = Field(0.001, alias="complaintRate", gt=0.0, le=1.0)
    min_recipients: int = Field(50, alias="minRecipients", ge=1)
    # Complaints needed in the window before the complaint rate pauses: one recipient (whose
    # complaint counts once) cannot pause a small sender alone.
    min_complaints: int = Field(2, alias="minComplaints", ge=1)
    window: Duration = Field(3600.0, ge=60.0)

    _d = _durations("window")


class IntakeSettings(_Model):
    """The bounce and complaint intake: a VERP return path on ``domain`` for every message
    delivered, and an SMTP listener that takes DSNs (RFC 3464) and ARF reports (RFC 5965) for
    that domain only. ``keyFile`` holds the secret that authenticates the return paths."""

    domain: str
    local_part: str = Field("bounces", alias="localPart", pattern=r"^[a-z0-9][a-z0-9.-]{0,19}$")
    key_file: str = Field(alias="keyFile")
    address: str = "0.0.0.0"
    port: int = Field(25, ge=0, le=65535)
    max_message_size: int = Field(256 * 1024, alias="maxMessageSize", ge=4096,
                                  le=10 * 1024 * 1024)
    max_sessions: int = Field(50, alias="maxSessions", ge=1)
    max_sessions_per_address: int = Field(5, alias="maxSessionsPerAddress", ge=1)
    reports_per_minute: int = Field(600, alias="reportsPerMinute", ge=1)
    session_timeout: Duration = Field(60.0, alias="sessionTimeout")

    _d = _durations("session_timeout")

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        v = v.strip().lower().rstrip(".")
        if not re.fullmatch(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]*", v):
            raise ValueError(f"intake.domain {v!r} must be a DNS name such as "
                             "'bounces.example.com' (an internationalised name in its xn-- form)")
        return v


# The privacy policy (section 5) retains delivery logs 90 days: no configuration keeps longer.
MAX_MESSAGE_LOG_RETENTION = 90 * 86400.0
# Suppression entries are not delivery logs (docs/store.md, Retention): an address is kept to
# stop mail to it (a bounce, a complaint, an unsubscribe), the privacy policy's abuse prevention
# and protection of recipients (sections 2 and 4). The policy names no period for them: one year
# is the ceiling the documentation promises, and no configuration keeps an address longer.
MAX_SUPPRESSION_RETENTION = 365 * 86400.0


class RetentionSettings(_Model):
    message_log: Duration = Field(90 * 86400.0, alias="messageLog")
    suppression: Duration = Field(365 * 86400.0, alias="suppression")
    purge_interval: Duration = Field(3600.0, alias="purgeInterval")

    _d = _durations("message_log", "suppression", "purge_interval")

    @field_validator("message_log")
    @classmethod
    def _at_most_policy(cls, v: float) -> float:
        if not 0 < v <= MAX_MESSAGE_LOG_RETENTION:
            raise ValueError(f"{v / 86400:g} days is outside (0, 90d]: the privacy policy "
                             "keeps delivery logs at most 90 days; use 90d or less")
        return v

    @field_validator("suppression")
    @classmethod
    def _suppression_at_most_a_year(cls, v: float) -> float:
        if not 0 < v <= MAX_SUPPRESSION_RETENTION:
            raise ValueError(f"{v / 86400:g} days is outside (0, 365d]: suppression entries "
                             "(complaints' keyed hashes included) are kept at most 365 days "
                             "(docs/store.md, Retention); use 365d or less")
        return v


class MessageLogSettings(_Model):
    """Metadata-only log of every state change, SQLite in WAL mode, written in batches."""

    path: str = "/var/lib/mailplane/messagelog.sqlite3"
    flush_interval: Duration = Field(0.2, alias="flushInterval")

    _d = _durations("flush_interval")


class StoreSettings(_Model):
    """Where the message log, suppression list and shared sending state live (docs/store.md).

    ``sqlite`` (default): the file ``messageLog.path``, one per pod. ``postgresql``: one
    database for every pod of the pool; the libpq connection string is read from ``dsnFile``
    (mounted from a Secret), so no password is ever part of this configuration."""

    backend: Literal["sqlite", "postgresql"] = "sqlite"
    dsn_file: str | None = Field(None, alias="dsnFile")
    # Local directory for log records the database did not take (replayed when it answers)
    # and the suppression cache; default: beside messageLog.path.
    buffer_directory: str | None = Field(None, alias="bufferDirectory")
    # Messages of quota/rate leased from the shared counters at a time, per worker.
    lease_size: int = Field(10, alias="leaseSize", ge=1, le=1000)
    # Files (from a Secret) holding the key erased complaint addresses are hashed with, newest
    # first (two during a rotation); none: a key kept in the store itself (docs/store.md).
    erasure_key_files: tuple[str, ...] = Field((), alias="erasureKeyFiles", max_length=2)

    @model_validator(mode="after")
    def _dsn(self) -> StoreSettings:
        if self.backend == "postgresql" and not self.dsn_file:
            raise ValueError("store.backend is postgresql but store.dsnFile is not set: point "
                             "it at a file holding the connection string (from a Secret)")
        return self


# Delivery event webhooks (docs/webhooks.md). The types a webhook can receive; each names a
# message-log status except ``complained`` (a complaint recorded on the suppression list).
WebhookEventType = Literal["delivered", "deferred", "bounced", "expired", "suppressed",
                           "complained"]
WEBHOOK_EVENT_TYPES: tuple[WebhookEventType, ...] = (
    "delivered", "deferred", "bounced", "expired", "suppressed", "complained")
# A signing secret shorter than this is refused: HMAC-SHA256 wants at least 128 bits.
MIN_WEBHOOK_SECRET_BYTES = 16
_LOOPBACK_HOSTS = ("localhost",)


def _is_loopback_host(host: str) -> bool:
    if host.lower() in _LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """A webhook URL as it may be shown in an error, a log line or a status message:
    ``scheme://host[:port]/path``. The query, the #fragment and any ``user:password@`` go:
    a receiver's URL often carries a token in them."""
    from urllib.parse import urlsplit  # noqa: PLC0415 - only when webhooks are configured

    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(not a URL)"
    if not parts.scheme or not host:
        return "(not a URL)"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme}://{netloc}{parts.path}"


class WebhookEndpoint(_Model):
    """Where delivery events are posted, signed with HMAC-SHA256. One or two signing secrets:
    two during a rotation (each event then carries a signature by each). The secrets are inline
    (``secrets``, as the operator renders them from the referenced Secret into the relay's
    configuration Secret) or in files (``secretFiles``, one secret per file)."""

    url: str = Field(repr=False)
    secrets: tuple[str, ...] | None = Field(None, repr=False, min_length=1, max_length=2)
    secret_files: tuple[str, ...] | None = Field(None, alias="secretFiles", min_length=1,
                                                 max_length=2)
    events: tuple[WebhookEventType, ...] = WEBHOOK_EVENT_TYPES

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        # Every message names the URL redacted (redact_url): its query or user:password@ may
        # hold a token, and these messages reach logs, Events and status conditions.
        from urllib.parse import urlsplit  # noqa: PLC0415 - only when webhooks are configured

        shown = redact_url(v)
        try:
            parts = urlsplit(v)
            host = parts.hostname or ""
            _ = parts.port
        except ValueError:
            raise ValueError(f"webhook url {shown} is not a URL (a bad port or bracketed "
                             "address): use https://HOST/PATH") from None
        if parts.scheme not in ("https", "http") or not host:
            raise ValueError(f"webhook url {shown} must be https://HOST/PATH")
        if parts.scheme == "http" and not _is_loopback_host(host):
            raise ValueError(f"webhook url {shown}: plain http is allowed only to a loopback "
                             "address (a local test receiver); use https://")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"webhook url {shown} holds credentials: the events "
                             "are authenticated by their signature; remove user:password@")
        if parts.fragment:
            raise ValueError(f"webhook url {shown}: remove the #fragment")
        return v

    @field_validator("secrets")
    @classmethod
    def _secret_length(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for secret in v or ():
            if len(secret.strip().encode()) < MIN_WEBHOOK_SECRET_BYTES:
                raise ValueError(f"a webhook signing secret is shorter than "
                                 f"{MIN_WEBHOOK_SECRET_BYTES} bytes; use at least 32 random "
                                 "bytes (e.g. `openssl rand -hex 32`)")
        return v

    @field_validator("events")
    @classmethod
    def _some_events(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("webhook events is empty: list the event types to post, or "
                             "leave it out for all of them")
        return tuple(dict.fromkeys(v))

    @model_validator(mode="after")
    def _one_source(self) -> WebhookEndpoint:
        if (self.secrets is None) == (self.secret_files is None):
            raise ValueError("webhook: set exactly one of secrets and secretFiles (the signing "
                             "secret, or the file holding it)")
        return self

    def load_secrets(self) -> list[bytes]:
        """The signing secrets, newest first. Raises OSError/ValueError naming the file."""
        if self.secrets is not None:
            return [s.strip().encode() for s in self.secrets]
        out = []
        for name in self.secret_files or ():
            raw = Path(name).read_bytes().strip()
            if len(raw) < MIN_WEBHOOK_SECRET_BYTES:
                raise ValueError(f"webhook secret file {name} holds fewer than "
                                 f"{MIN_WEBHOOK_SECRET_BYTES} bytes")
            out.append(raw)
        return out


def _networks_field(v: tuple[str, ...]) -> tuple[str, ...]:
    for net in v:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ValueError(f"network {net!r} is not a network such as '10.0.0.0/8'") from None
    return v


class WebhookSettings(_Model):
    """How delivery events are posted: the platform's endpoint (every event of this relay),
    and the rules for every endpoint, including the credentials' own (``credentials[].webhook``).

    Endpoints must resolve to public addresses; ``allowPrivateNetworks`` (the platform's
    endpoint) and ``credentialPrivateNetworks`` (the tenants' endpoints) open named private
    ranges, such as the cluster's Service network for an in-cluster receiver."""

    endpoint: WebhookEndpoint | None = None
    ca_file: str | None = Field(None, alias="caFile")
    allow_private_networks: tuple[str, ...] = Field((), alias="allowPrivateNetworks")
    credential_private_networks: tuple[str, ...] = Field((), alias="credentialPrivateNetworks")
    timeout: Duration = Field(10.0, gt=0, le=60.0)
    concurrency: int = Field(8, ge=1, le=256)
    retry_initial: Duration = Field(30.0, alias="retryInitial", gt=0)
    retry_max: Duration = Field(3600.0, alias="retryMax", gt=0)
    max_age: Duration = Field(86400.0, alias="maxAge", gt=0, le=7 * 86400.0)
    poll_interval: Duration = Field(1.0, alias="pollInterval", gt=0, le=60.0)

    _d = _durations("timeout", "retry_initial", "retry_max", "max_age", "poll_interval")

    @field_validator("allow_private_networks", "credential_private_networks")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _networks_field(v)

    @model_validator(mode="after")
    def _order(self) -> WebhookSettings:
        if self.retry_max < self.retry_initial:
            raise ValueError("webhooks.retryMax is shorter than webhooks.retryInitial")
        return self


# --------------------------------------------------------------------------------------------
# Domains and credentials
# --------------------------------------------------------------------------------------------


class DKIMKey(_Model):
    selector: str
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"
    private_key: str | None = Field(None, alias="privateKey", repr=False)
    private_key_file: str | None = Field(None, alias="privateKeyFile")
    headers: tuple[str, ...] = (
        "from", "to", "cc", "subject", "date", "message-id", "reply-to", "mime-version",
        "content-type", "content-transfer-encoding", "list-unsubscribe", "list-unsubscribe-post",
    )

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str) -> str:
        if not _SELECTOR_RE.match(v):
            raise ValueError(f"DKIM selector {v!r} must be a DNS label (a-z, 0-9, '-')")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> DKIMKey:
        if (self.private_key is None) == (self.private_key_file is None):
            raise ValueError("set exactly one of dkim.privateKey (PEM) and dkim.privateKeyFile")
        return self

    def load_pem(self, base: Path | None = None) -> bytes:
        if self.private_key is not None:
            return self.private_key.encode()
        assert self.private_key_file is not None
        path = Path(self.private_key_file)
        if base is not None and not path.is_absolute():
            path = base / path
        return path.read_bytes()


class Domain(_Model):
    name: str
    dkim: DKIMKey | None = None
    # A second signature with another algorithm (RFC 8463 dual signing: RSA for the verifiers
    # that know only RSA, Ed25519 beside it). The message carries both.
    additional_dkim: tuple[DKIMKey, ...] = Field((), alias="additionalDkim", max_length=1)

    @model_validator(mode="after")
    def _dual(self) -> Domain:
        if self.additional_dkim:
            if self.dkim is None:
                raise ValueError("additionalDkim is set but dkim is not: set dkim (the first "
                                 "signature) too")
            extra = self.additional_dkim[0]
            if extra.algorithm == self.dkim.algorithm:
                raise ValueError(f"additionalDkim.0.algorithm is {extra.algorithm}, as "
                                 "dkim.algorithm: dual signing pairs two algorithms "
                                 "(rsa-sha256 and ed25519-sha256)")
            if extra.selector == self.dkim.selector:
                raise ValueError(f"additionalDkim.0.selector {extra.selector!r} is also "
                                 "dkim.selector: each key needs its own selector")
        return self

    @property
    def dkim_keys(self) -> tuple[DKIMKey, ...]:
        """Every key this domain signs with, in signing order."""
        return () if self.dkim is None else (self.dkim, *self.additional_dkim)

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip().lower().rstrip(".")
            if not is_domain(v):
                raise ValueError(f"{v!r} is not a domain name such as 'example.com'")
        return v


class PasswordHash(str):
    """``sha256$<salt-hex>$<digest-hex>`` or ``scrypt$<n>$<r>$<p>$<salt-hex>$<digest-hex>``."""


def hash_password(password: str, *, scheme: str = "sha256", salt: bytes | None = None) -> str:
    """Hash a password for the relay configuration.

    ``sha256`` is for the operator's generated 256-bit random passwords: a brute force of 2**256
    is out of reach whatever the hash, and a fast hash keeps AUTH from being a CPU denial of
    service. ``scrypt`` is for passwords a human chose.
    """
    salt = salt if salt is not None else os.urandom(16)
    if scheme == "sha256":
        digest = hashlib.sha256(salt + password.encode()).hexdigest()
        return f"sha256${salt.hex()}${digest}"
    if scheme == "scrypt":
        n, r, p = 2**14, 8, 1
        digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p).hex()
        return f"scrypt${n}${r}${p}${salt.hex()}${digest}"
    raise ValueError(f"unknown password hash scheme {scheme!r}: use 'sha256' or 'scrypt'")


def verify_password(password: str, encoded: str) -> bool:
    parts = encoded.split("$")
    try:
        if parts[0] == "sha256" and len(parts) == 3:
            salt = bytes.fromhex(parts[1])
            digest = hashlib.sha256(salt + password.encode()).hexdigest()
            return hmac.compare_digest(digest, parts[2])
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt = bytes.fromhex(parts[4])
            digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p).hex()
            return hmac.compare_digest(digest, parts[5])
    except ValueError:
        return False
    return False


def _check_hash(v: str) -> str:
    parts = v.split("$")
    ok = (parts[0] == "sha256" and len(parts) == 3) or (parts[0] == "scrypt" and len(parts) == 6)
    if not ok:
        raise ValueError(
            "a password hash looks like 'sha256$<salt>$<hex>' or "
            "'scrypt$<n>$<r>$<p>$<salt>$<hex>'; make one with `mailplane hash-password`"
        )
    return v


class Credential(_Model):
    username: str
    password_hash: str = Field(alias="passwordHash", repr=False)
    previous_password_hash: str | None = Field(None, alias="previousPasswordHash", repr=False)
    previous_expires: datetime | None = Field(None, alias="previousExpires")
    allowed_senders: tuple[str, ...] = Field(alias="allowedSenders", min_length=1)
    rate_per_minute: int | None = Field(None, alias="ratePerMinute", ge=1)
    daily_quota: int | None = Field(None, alias="dailyQuota", ge=1)
    suspended: bool = False
    suspended_reason: str | None = Field(None, alias="suspendedReason", max_length=200)
    owner: str | None = None  # "namespace/name" of the SmtpCredential, for humans
    owner_uid: str | None = Field(None, alias="ownerUid", min_length=1, max_length=128)
    """The SmtpCredential's ``metadata.uid``: one deleted and created again under the same name
    is another credential, whose passwords pushed ahead of the configuration (rotation.py)
    never mix with the deleted one's."""
    password_serial: int = Field(0, alias="passwordSerial", ge=0)
    """The number of the rotation that issued ``passwordHash`` (the operator counts them): a
    password pushed ahead of the mounted configuration (rotation.py) is in force until the
    mounted entry's serial reaches it."""
    # Delivery events of this credential's mail only (docs/webhooks.md).
    webhook: WebhookEndpoint | None = None

    @property
    def namespace(self) -> str | None:
        """The tenant: namespace of the SmtpCredential (None for one not from a namespace)."""
        if self.owner and "/" in self.owner:
            return self.owner.partition("/")[0]
        return None

    @field_validator("username")
    @classmethod
    def _username(cls, v: str) -> str:
        if not _USERNAME_RE.match(v):
            raise ValueError(f"username {v!r} may hold only A-Z a-z 0-9 . _ @ + - (1-128)")
        return v

    @field_validator("password_hash", "previous_password_hash")
    @classmethod
    def _hash(cls, v: str | None) -> str | None:
        return None if v is None else _check_hash(v)

    @field_validator("allowed_senders")
    @classmethod
    def _senders(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for item in v:
            s = item.strip().lower()
            domain = s.rpartition("@")[2]
            if not is_domain(domain):
                raise ValueError(
                    f"allowedSenders entry {item!r} is neither a domain ('example.com') nor an "
                    "address ('noreply@example.com')"
                )
            out.append(s)
        return tuple(out)

    @model_validator(mode="after")
    def _previous(self) -> Credential:
        if self.previous_password_hash is not None and self.previous_expires is None:
            raise ValueError(
                f"credential {self.username!r}: previousPasswordHash needs previousExpires "
                "(when the rotation overlap ends)"
            )
        if self.previous_expires is not None and self.previous_expires.tzinfo is None:
            raise ValueError(
                f"credential {self.username!r}: previousExpires needs a time zone, "
                "e.g. 2026-01-01T00:00:00Z"
            )
        return self

    def check_password(self, password: str, now: datetime | None = None) -> bool:
        if verify_password(password, self.password_hash):
            return True
        if self.previous_password_hash and self.previous_expires:
            now = now or datetime.now(UTC)
            if now < self.previous_expires:
                return verify_password(password, self.previous_password_hash)
        return False

    def may_send_as(self, address: str) -> bool:
        address = address.lower()
        domain = domain_of(address)
        return any(a == address if "@" in a else a == domain for a in self.allowed_senders)


class RelaySettings(_Model):
    hostname: str = "mailplane.local"
    listeners: tuple[Listener, ...] = Field(default_factory=_default_listeners, min_length=1)
    tls: TLSSettings | None = None
    http: HTTPSettings = HTTPSettings()
    admin: AdminSettings | None = None
    spool: SpoolSettings = SpoolSettings()
    delivery: DeliverySettings = DeliverySettings()
    queue: QueueSettings = QueueSettings()
    limits: LimitSettings = LimitSettings()
    retention: RetentionSettings = RetentionSettings()
    abuse: AbuseSettings = AbuseSettings()
    intake: IntakeSettings | None = None
    message_log: MessageLogSettings = Field(MessageLogSettings(), alias="messageLog")
    store: StoreSettings = StoreSettings()
    webhooks: WebhookSettings = WebhookSettings()
    trusted_networks: tuple[str, ...] = Field((), alias="trustedNetworks")
    # The submitting client's address in the Received: header each message carries to its
    # recipients; off: a pod address means nothing to them (docs/store.md, client addresses).
    trace_client_address: bool = Field(False, alias="traceClientAddress")
    workers: int = Field(1, ge=1, le=64)
    shutdown_grace: Duration = Field(25.0, alias="shutdownGrace")
    domains: tuple[Domain, ...] = ()
    credentials: tuple[Credential, ...] = ()

    _d = _durations("shutdown_grace")

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        # It goes into the greeting, Received: and generated Message-IDs: plain ASCII DNS.
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", v):
            raise ValueError(f"hostname {v!r} must be a DNS name (A-Z, a-z, 0-9, '.', '-'; "
                             "an internationalised name in its xn-- form)")
        return v

    @field_validator("trusted_networks")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(
                    f"trustedNetworks entry {net!r} is not a network such as '10.0.0.0/8'"
                ) from None
        return v

    @model_validator(mode="after")
    def _tls_needed(self) -> RelaySettings:
        if self.tls is None:
            raise ValueError(
                "tls is missing: every listener needs a certificate; set tls.certFile and "
                "tls.keyFile (a cert-manager Certificate Secret mounted as files works as is)"
            )
        names = [lst.name for lst in self.listeners]
        if len(set(names)) != len(names):
            raise ValueError(f"listener names must be unique, got {names}")
        if self.intake is not None and "intake" in names:
            raise ValueError("the listener name 'intake' is the intake listener's (its port is "
                             "intake.port): rename the listener")
        for taken, setting in (("http", "http.port"), ("admin", "admin.port")):
            if taken in names:
                raise ValueError(f"the listener name '{taken}' names the port {setting} sets "
                                 "(in the relay's 'listening:' log line): rename the listener")
        return self


# Peer addresses whose trustedNetworks verdict a configuration keeps.
_TRUST_CACHE_SIZE = 4096

class RelayConfig(_Model):
    """The whole, merged configuration, with lookup tables built once."""

    settings: RelaySettings
    source_hash: str = ""
    render_id: str = ""
    """The operator's id of the render (``metadata.render`` of the RelayConfig document): the
    same in every pod running that render, whatever the pod changed locally."""
    _domain_index: dict[str, Domain] = PrivateAttr(default_factory=dict)
    _credential_index: dict[str, Credential] = PrivateAttr(default_factory=dict)
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = PrivateAttr(())
    # Peer address -> trusted, for this configuration's networks (an address is parsed and
    # matched once, not at every session: about 8 us each).
    _trusted: dict[str, bool] = PrivateAttr(default_factory=dict)

    @property
    def domains(self) -> dict[str, Domain]:
        return self._domain_index

    @property
    def credentials(self) -> dict[str, Credential]:
        return self._credential_index

    def model_post_init(self, _context: Any) -> None:
        self._domain_index = {d.name: d for d in self.settings.domains}
        self._credential_index = {c.username: c for c in self.settings.credentials}
        self._networks = tuple(
            ipaddress.ip_network(n, strict=False) for n in self.settings.trusted_networks
        )

    def without_credentials(self, usernames: set[str]) -> RelayConfig:
        """A copy in which `usernames` are unknown (revocation.py): AUTH and sessions see them
        as absent; the settings document and its hashes stay as loaded."""
        copy = self.model_copy()
        copy._credential_index = {u: c for u, c in self._credential_index.items()
                                  if u not in usernames}
        return copy

    def with_credentials(self, replaced: Mapping[str, Credential]) -> RelayConfig:
        """A copy in which the credentials of `replaced` are the ones given (rotation.py); the
        settings document and its hashes stay as loaded."""
        copy = self.model_copy()
        copy._credential_index = {u: replaced.get(u, c)
                                  for u, c in self._credential_index.items()}
        return copy

    def is_trusted(self, peer_ip: str) -> bool:
        known = self._trusted.get(peer_ip)
        if known is not None:
            return known
        try:
            ip = ipaddress.ip_address(peer_ip)
        except ValueError:
            return False
        trusted = any(ip in net for net in self._networks)
        if len(self._trusted) >= _TRUST_CACHE_SIZE:
            self._trusted.clear()
        self._trusted[peer_ip] = trusted
        return trusted


# --------------------------------------------------------------------------------------------
# Loading and rendering
# --------------------------------------------------------------------------------------------


def format_validation_error(where: str, err: ValidationError) -> str:
    """One line per problem naming the field and the fix; never the offending value (it may be
    a password hash or a private key)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {loc or '(document)'}: {msg}")
    return "\n".join(lines)


def _iter_sources(path: Path) -> Iterable[tuple[str, str]]:
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir()
            if not p.name.startswith(".") and p.suffix in (".yaml", ".yml") and p.is_file()
        )
        if not files:
            raise ConfigError(f"{path}: no *.yaml files in the configuration directory")
        for p in files:
            yield str(p), p.read_text()
    elif path.is_file():
        yield str(path), path.read_text()
    else:
        raise ConfigError(f"{path}: no such configuration file or directory")


def parse_documents(sources: Iterable[tuple[str, str]]) -> RelayConfig:
    """Merge YAML sources (name, text) into one validated RelayConfig."""
    settings_doc: dict[str, Any] | None = None
    settings_where = ""
    parts: Any = None
    render_id: Any = None
    texts: dict[str, str] = {}
    domains: list[Any] = []
    credentials: list[Any] = []
    digest = hashlib.sha256()
    for where, text in sources:
        texts[where.rsplit("/", 1)[-1]] = text
        digest.update(where.rsplit("/", 1)[-1].encode() + b"\0" + text.encode() + b"\0")
        try:
            docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
        except yaml.YAMLError as exc:
            # Only the position: the YAML error's own text may quote the line, which may hold a
            # private key or a password hash.
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "syntax error"
            raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from None
        for i, doc in enumerate(docs):
            label = f"{where}[{i}]" if len(docs) > 1 else where
            if not isinstance(doc, Mapping):
                raise ConfigError(f"{label}: a document must be a mapping with apiVersion/kind")
            if doc.get("apiVersion") != API_VERSION:
                raise ConfigError(
                    f"{label}: apiVersion is {doc.get('apiVersion')!r}; this relay reads "
                    f"{API_VERSION!r}"
                )
            kind = doc.get("kind")
            extra = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
            if extra:
                raise ConfigError(f"{label}: unknown top-level keys {sorted(extra)}; "
                                  "settings go under 'spec'")
            spec = doc.get("spec") or {}
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{label}: spec must be a mapping")
            if kind == KIND_CONFIG:
                if settings_doc is not None:
                    raise ConfigError(
                        f"{label}: a second RelayConfig document (the first is in "
                        f"{settings_where}); keep exactly one"
                    )
                settings_doc, settings_where = dict(spec), label
                meta = doc.get("metadata")
                parts = meta.get("parts") if isinstance(meta, Mapping) else None
                render_id = meta.get("render") if isinstance(meta, Mapping) else None
                settings_file = where.rsplit("/", 1)[-1]
            elif kind in (KIND_CREDENTIALS, KIND_DOMAINS):
                key = "credentials" if kind == KIND_CREDENTIALS else "domains"
                if set(spec) - {key}:
                    raise ConfigError(f"{label}: a {kind} spec holds only '{key}'")
                items = spec.get(key) or []
                if not isinstance(items, list):
                    raise ConfigError(f"{label}: spec.{key} must be a list")
                (credentials if kind == KIND_CREDENTIALS else domains).extend(items)
            else:
                raise ConfigError(f"{label}: kind {kind!r} is not one of {list(KINDS)}")
    if settings_doc is None:
        raise ConfigError("no RelayConfig document found; exactly one is required")
    if parts is not None:
        _check_parts(parts, {n: t for n, t in texts.items() if n != settings_file})
    settings_doc.setdefault("domains", [])
    settings_doc.setdefault("credentials", [])
    settings_doc["domains"] = list(settings_doc["domains"]) + domains
    settings_doc["credentials"] = list(settings_doc["credentials"]) + credentials
    try:
        settings = RelaySettings.model_validate(settings_doc)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(settings_where, exc)) from None
    _check_unique("domain", [d.name for d in settings.domains])
    _check_unique("credential username", [c.username for c in settings.credentials])
    return RelayConfig(settings=settings, source_hash=digest.hexdigest()[:16],
                       render_id=render_id if isinstance(render_id, str) else "")


def part_digest(text: str) -> str:
    """What the RelayConfig document's ``metadata.parts`` lists for each other file."""
    return hashlib.sha256(text.encode()).hexdigest()


def _check_parts(parts: Any, others: Mapping[str, str]) -> None:
    """A configuration split over several files (several Secrets) is used only when every file
    is the one the RelayConfig document names (``metadata.parts``: file -> SHA-256): while a
    volume update has brought some parts of a new render and not the others, the relay keeps
    the configuration it runs. Names only in the message, never content."""
    if not isinstance(parts, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in parts.items()):
        raise ConfigError("metadata.parts of the RelayConfig document must map file names to "
                          "SHA-256 digests")
    missing = sorted(set(parts) - set(others))
    unknown = sorted(set(others) - set(parts))
    changed = sorted(n for n in set(parts) & set(others) if part_digest(others[n]) != parts[n])
    if missing or unknown or changed:
        detail = "; ".join(f"{what}: {', '.join(names)}" for what, names in (
            ("missing", missing), ("not listed", unknown), ("other version", changed)) if names)
        raise ConfigError(f"the configuration's parts are not all of one version ({detail}); "
                          "the relay keeps the configuration it runs until every part is "
                          "present at the version metadata.parts names")


def _check_unique(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ConfigError(f"{what} {n!r} appears twice; each must appear once")
        seen.add(n)


def load_config(path: str | os.PathLike[str]) -> RelayConfig:
    """Read and validate a configuration file or directory. Raises ConfigError."""
    p = Path(path)
    try:
        return parse_documents(_iter_sources(p))
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None


def config_fingerprint(path: str | os.PathLike[str]) -> tuple[tuple[str, int, int], ...]:
    """Cheap change detector for hot reload: names, sizes and mtimes of the sources."""
    p = Path(path)
    try:
        if p.is_dir():
            items = [q for q in p.iterdir() if q.suffix in (".yaml", ".yml")
                     and not q.name.startswith(".")]
        else:
            items = [p]
        return tuple(sorted((q.name, q.stat().st_size, q.stat().st_mtime_ns) for q in items))
    except OSError:
        return ()


def render_document(kind: str, spec: Mapping[str, Any], name: str | None = None,
                    parts: Mapping[str, str] | None = None, render: str | None = None) -> str:
    """One YAML document of this contract, for the operator and for `mailplane dev`.
    ``parts``: (RelayConfig) the other files of the configuration and their digests;
    ``render``: the operator's id of the render (reported by the relay as it runs it)."""
    doc: dict[str, Any] = {"apiVersion": API_VERSION, "kind": kind}
    if name or parts or render:
        doc["metadata"] = {**({"name": name} if name else {}),
                           **({"render": render} if render else {}),
                           **({"parts": dict(sorted(parts.items()))} if parts else {})}
    doc["spec"] = json.loads(json.dumps(spec, default=str))
    return yaml.safe_dump(doc, sort_keys=False)


def dump_settings(settings: RelaySettings) -> dict[str, Any]:
    """A settings object back into its document form (camelCase), for round trips."""
    return settings.model_dump(mode="json", by_alias=True, exclude_none=True)
