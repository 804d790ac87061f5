"""RetentionPolicy: how long a relay keeps its message log and suppression entries.

A policy selects SmtpRelays of its own namespace by label (``spec.relaySelector``; empty: all of
them). A relay that no policy selects keeps the product default (90 days of message log, as the
privacy policy promises). When several policies select one relay, each setting takes the shortest
value among them: the most protective promise wins, and the relay status says which policies
apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .conditions import READY, set_condition
from .models import RetentionPolicy, RetentionPolicySpec, SmtpRelay

DEFAULT = RetentionPolicySpec()


@dataclass(frozen=True)
class Retention:
    message_log: float
    suppression: float
    purge_interval: float
    policies: tuple[str, ...]
    """``namespace/name`` of the policies that apply; empty: the defaults."""

    def to_config(self) -> dict[str, Any]:
        """The ``retention`` section of the relay configuration (seconds)."""
        return {"messageLog": self.message_log, "suppression": self.suppression,
                "purgeInterval": self.purge_interval}


def selects(policy: RetentionPolicy, relay: SmtpRelay) -> bool:
    return (policy.meta.namespace == relay.meta.namespace
            and policy.spec.relay_selector.matches(relay.meta.labels))


def retention_for_relay(relay: SmtpRelay, policies: Sequence[RetentionPolicy]) -> Retention:
    """The retention settings rendered into this relay's configuration."""
    chosen = sorted((p for p in policies if selects(p, relay)), key=lambda p: p.meta.key)
    if not chosen:
        return Retention(DEFAULT.message_log, DEFAULT.suppression, DEFAULT.purge_interval, ())
    return Retention(
        message_log=min(p.spec.message_log for p in chosen),
        suppression=min(p.spec.suppression for p in chosen),
        purge_interval=min(p.spec.purge_interval for p in chosen),
        policies=tuple(p.meta.key for p in chosen),
    )


def retention_status(policy: RetentionPolicy, relays: Sequence[SmtpRelay],
                     now: datetime) -> dict[str, Any]:
    """The status patch: the relays the policy applies to, and Ready."""
    applies = sorted(r.meta.name for r in relays if selects(policy, r))
    if applies:
        ready = (True, "Applied", f"applies to {len(applies)} SmtpRelay(s)")
    else:
        ready = (False, "NoRelaySelected",
                 f"spec.relaySelector matches no SmtpRelay in namespace {policy.meta.namespace}")
    return {
        "observedGeneration": policy.meta.generation,
        "conditions": set_condition(policy.status.get("conditions"), READY, *ready,
                                    policy.meta.generation, now),
        "relays": applies,
    }
