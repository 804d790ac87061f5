"""Relay metrics, built on an injected registry (one per process, made by the composition root).

Label values come from small closed sets or from the configuration (sending domains and
credential usernames the operator rendered): never a recipient, an address or a peer-supplied
string. ``sender_domain`` is ``other`` for a domain that is not configured (trusted-network mail).
"""

from __future__ import annotations

import glob
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.metrics_core import Metric

log = logging.getLogger("mailplane_relay.metrics")

NS = "mailplane_relay"

# prometheus_client's multiprocess mode (a worker of a relay with several workers) checks the
# process id on every increment, set and observation (one getpid system call each, about 30 per
# relayed message) so that a forked child does not write into its parent's file. The id is kept
# here instead and renewed in a forked child, which keeps that guarantee without the calls.
# Replaced before any metric exists: values made by the library's own class would map the same
# file a second time.
_pid = os.getpid()


def _renew_pid() -> None:
    global _pid
    _pid = os.getpid()


def process_id() -> int:
    """This process's id as of its start or its last fork (no system call)."""
    return _pid


os.register_at_fork(after_in_child=_renew_pid)
if getattr(values.ValueClass, "_multiprocess", False):
    values.ValueClass = values.MultiProcessValue(process_identifier=process_id)  # type: ignore[no-untyped-call]

class WorkerFilesCollector(multiprocess.MultiProcessCollector):
    """The supervisor's view of its workers' metric files (prometheus_client multiprocess
    mode), read so that a scrape never fails while workers start or stop.

    The library's collector reads every ``*.db`` file it lists and fails the whole scrape
    (``/metrics`` answers 500) when one of them is removed after the listing (the supervisor
    drops a dead worker's gauge files) or is still empty (a starting worker has created it
    and not yet sized it). Here such a file is left out of that one scrape: a removed file's
    values are gone anyway, an empty one has none yet."""

    def collect(self) -> Iterable[Metric]:
        metrics: dict[str, Metric] = {}
        for path in glob.glob(os.path.join(self._path, "*.db")):
            try:
                found: dict[str, Metric] = self._read_metrics([path])  # type: ignore[no-untyped-call]
            except FileNotFoundError:
                continue  # removed since the listing (a dead worker's gauges)
            except struct.error:
                continue  # created and not yet sized: no value in it yet
            except RuntimeError as exc:  # the library's word for a damaged file
                log.warning("metrics: %s skipped: %s", os.path.basename(path), exc)
                continue
            for name, metric in found.items():
                held = metrics.get(name)
                if held is None:
                    metrics[name] = metric
                else:
                    held.samples.extend(metric.samples)
        collected: Iterable[Metric] = self._accumulate_metrics(metrics, True)  # type: ignore[no-untyped-call]
        return collected


OUTCOMES = ("delivered", "deferred", "bounced", "expired", "suppressed")
REJECT_REASONS = (
    "auth_required", "tls_required", "sender_not_allowed", "domain_not_enabled", "size",
    "too_many_recipients", "suspended", "rate_limited", "quota_exceeded", "suppressed",
    "bad_syntax", "bare_lf", "smuggling", "line_too_long", "spool_error", "internal_error",
    "too_many_sessions", "shutting_down", "paused", "unknown_command", "too_many_refused",
    "too_many_sessions_per_address", "auth_deadline", "session_lifetime", "duplicate_header",
    "non_ascii_header", "nul",
)
AUTH_FAILURE_REASONS = ("bad_credentials", "throttled", "malformed", "suspended")


@dataclass(frozen=True)
class RelayMetrics:
    registry: CollectorRegistry
    messages_received: Counter
    recipients: Counter
    complaints: Counter
    rejected: Counter
    delivery_latency: Histogram
    delivery_attempts: Counter
    queue_messages: Gauge
    queue_oldest_age: Gauge
    sessions_active: Gauge
    sessions: Counter
    tls_sessions: Counter
    auth_success: Counter
    auth_failures: Counter
    dkim_signatures: Counter
    config_reloads: Counter
    config_last_reload_success: Gauge
    config_info: Gauge
    purged_records: Counter
    last_purge: Gauge
    suppression_entries: Gauge
    ready: Gauge
    credentials_paused: Gauge
    credentials_paused_complaints: Gauge
    intake_reports: Counter
    async_bounces: Counter
    spool_commit_latency: Histogram
    spool_corrupt_files: Gauge
    spool_corrupt_purged: Counter
    spool_torn_messages: Counter
    destinations: Gauge
    destination_suspensions: Counter
    connections_in_use: Gauge
    delivery_tls_sessions: Counter
    spool_orphaned_messages: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> RelayMetrics:
        r = registry if registry is not None else CollectorRegistry()
        return cls(
            registry=r,
            messages_received=Counter(
                f"{NS}_messages_received", "Messages accepted and spooled (250 sent).",
                ["listener", "sender_domain", "credential"], registry=r),
            recipients=Counter(
                f"{NS}_recipients", "Per-recipient delivery outcomes.",
                ["outcome", "sender_domain", "credential"], registry=r),
            complaints=Counter(
                f"{NS}_complaints", "Recipient complaints recorded (feedback loop).",
                ["sender_domain", "credential"], registry=r),
            rejected=Counter(
                f"{NS}_rejected", "SMTP commands or messages refused, by reason.",
                ["reason"], registry=r),
            delivery_latency=Histogram(
                f"{NS}_delivery_latency_seconds",
                "Time from acceptance to final delivery of a recipient.",
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
                         900, 3600, 14400, 86400),
                registry=r),
            delivery_attempts=Counter(
                f"{NS}_delivery_attempts", "Delivery attempts by result.",
                ["result"], registry=r),
            queue_messages=Gauge(
                f"{NS}_queue_messages", "Messages in the spool awaiting delivery.", registry=r),
            queue_oldest_age=Gauge(
                f"{NS}_queue_oldest_message_age_seconds",
                "Age of the oldest message in the spool (0 when empty).", registry=r),
            sessions_active=Gauge(
                f"{NS}_sessions_active", "Open SMTP sessions.", ["listener"], registry=r),
            sessions=Counter(
                f"{NS}_sessions", "SMTP sessions opened.", ["listener"], registry=r),
            tls_sessions=Counter(
                f"{NS}_tls_sessions", "Sessions that completed a TLS handshake.",
                ["listener", "version"], registry=r),
            auth_success=Counter(
                f"{NS}_auth_success", "Successful AUTH.", ["mechanism"], registry=r),
            auth_failures=Counter(
                f"{NS}_auth_failures", "Failed or refused AUTH attempts.", ["reason"],
                registry=r),
            dkim_signatures=Counter(
                f"{NS}_dkim_signatures", "DKIM signatures made.", ["algorithm", "result"],
                registry=r),
            config_reloads=Counter(
                f"{NS}_config_reloads", "Configuration (re)loads by result.", ["result"],
                registry=r),
            config_last_reload_success=Gauge(
                f"{NS}_config_last_reload_success_timestamp_seconds",
                "When the configuration in force was loaded.", registry=r),
            config_info=Gauge(
                f"{NS}_config_info", "The configuration in force (value 1).", ["hash"],
                registry=r),
            purged_records=Counter(
                f"{NS}_purged_records", "Records removed by the retention purge.", ["table"],
                registry=r),
            last_purge=Gauge(
                f"{NS}_last_purge_timestamp_seconds", "When the retention purge last ran.",
                registry=r),
            suppression_entries=Gauge(
                f"{NS}_suppression_entries", "Addresses on the suppression list.", registry=r),
            ready=Gauge(f"{NS}_ready", "1 when the relay accepts mail.", registry=r),
            credentials_paused=Gauge(
                f"{NS}_credentials_paused",
                "Credentials paused because their bounce or complaint rate crossed "
                "abuse.bounceRate or abuse.complaintRate.",
                multiprocess_mode="livemax", registry=r),
            credentials_paused_complaints=Gauge(
                f"{NS}_credentials_paused_complaints",
                "Credentials paused because their complaint rate crossed abuse.complaintRate.",
                multiprocess_mode="livemax", registry=r),
            intake_reports=Counter(
                f"{NS}_intake_reports",
                "Reports taken by the intake listener, by kind (dsn, arf, other) and result "
                "(matched, unmatched: no message or recipient of ours, forged: the return "
                "path did not verify, ignored: not a failure or complaint, malformed).",
                ["kind", "result"], registry=r),
            async_bounces=Counter(
                f"{NS}_async_bounces",
                "Recipients reported failed by a DSN after the relay had delivered to them.",
                ["sender_domain", "credential"], registry=r),
            spool_commit_latency=Histogram(
                f"{NS}_spool_commit_seconds", "Time to make a message durable (fsync).",
                buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
                registry=r),
            spool_corrupt_files=Gauge(
                f"{NS}_spool_corrupt_files",
                "Unreadable spool files set aside in corrupt/ (deleted after "
                "spool.corruptRetention).", multiprocess_mode="livesum", registry=r),
            spool_orphaned_messages=Gauge(
                f"{NS}_spool_orphaned_messages",
                "Messages in spool directories no worker of this relay owns (an old layout "
                "still locked by another process); adopted at the next start.",
                multiprocess_mode="livesum", registry=r),
            spool_corrupt_purged=Counter(
                f"{NS}_spool_corrupt_purged",
                "Quarantined spool files deleted once spool.corruptRetention passed.",
                registry=r),
            spool_torn_messages=Counter(
                f"{NS}_spool_torn_messages",
                "Messages whose spooled data failed its checksum at read (a write torn by a "
                "crash): lost, their undecided recipients failed and the sender told.",
                registry=r),
            destinations=Gauge(
                f"{NS}_delivery_destinations",
                "Delivery destinations (smarthost or MX site) known to the queue, by state "
                "(active, idle, suspended, probing).",
                ["state"], multiprocess_mode="livesum", registry=r),
            destination_suspensions=Counter(
                f"{NS}_delivery_destination_suspensions",
                "Destinations suspended (no connection for a while) by reason: connect "
                "(refused, timed out, no session) or throttled (421, 4.7.x before RCPT).",
                ["reason"], registry=r),
            connections_in_use=Gauge(
                f"{NS}_delivery_connections_in_use",
                "Outgoing SMTP connections carrying a transaction now (bounded by "
                "delivery.maxConcurrency; idle pooled connections are not counted).",
                multiprocess_mode="livesum", registry=r),
            delivery_tls_sessions=Counter(
                f"{NS}_delivery_tls_sessions",
                "TLS results of new connections to MX hosts and of MTA-STS policy fetches, "
                "after TLS-RPT (RFC 8460): policy_type sts or no-policy-found, policy_domain "
                "(only with a policy; capped by delivery.mtaSts.reportDomains, then other), "
                "mode of the policy in force (enforce, testing, none), result success or an "
                "RFC 8460 result type.",
                ["policy_type", "policy_domain", "mode", "result"], registry=r),
        )
