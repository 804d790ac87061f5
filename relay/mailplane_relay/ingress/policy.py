"""Sender policy: who may send what, checked at ``MAIL FROM`` and again on the header ``From:``.

A sender must use a configured sending domain its credential may use (``allowedSenders``), the
credential must exist and not be suspended or paused (bounce rate), and its rate and daily quota
must have room. Trusted-network senders (no AUTH) skip the credential checks. Each check answers
a :class:`Refusal` (the metrics reason and the reply) or ``None``; counting and the message log
are the session's business.
"""

from __future__ import annotations

import email.utils

from ..config import Credential, RelayConfig, domain_of
from ..ratelimit import Limiter, LimitExceeded
from ..reputation import Reputation
from .replies import R, Refusal


class SenderPolicy:
    def __init__(self, limiter: Limiter, reputation: Reputation | None) -> None:
        self.limiter = limiter
        self.reputation = reputation

    def mail_from(self, cfg: RelayConfig, username: str | None, trusted: bool,
                  address: str) -> Refusal | str:
        """The refusal for this envelope sender, or the sending domain to label the message
        with (``other`` for a trusted-network sender outside the configured domains, and for
        the null reverse-path ``<>`` until the header From: names the domain).

        The null reverse-path is for mail that must never cause a bounce (notifications,
        auto-replies): it passes every check of the credential, and its header From: is held
        to the same rules as any other at the end of DATA."""
        domain = domain_of(address) if address else "other"
        if username is None:
            if not trusted:
                return Refusal("auth_required", R.AUTH_REQUIRED)
            return domain if domain in cfg.domains else "other"
        credential = cfg.credentials.get(username)
        if credential is None:
            return Refusal("suspended", R.CREDENTIAL_GONE.format(user=username))
        if credential.suspended:
            why = credential.suspended_reason or "no reason given"
            return Refusal("suspended", R.SUSPENDED.format(user=username, reason=why))
        pause = self.reputation.paused(username) if self.reputation is not None else None
        if pause is not None:
            return Refusal("paused", pause.reply(username))
        if address and domain not in cfg.domains:
            return Refusal("domain_not_enabled", R.SENDER_DOMAIN.format(domain=domain))
        if address and not credential.may_send_as(address):
            return Refusal("sender_not_allowed",
                           R.SENDER_NOT_ALLOWED.format(user=username, domain=domain))
        over = self.limiter.check_message(credential)
        if over is not None:
            return limit_refusal(over, username)
        return domain

    def message(self, cfg: RelayConfig, username: str | None,
                from_values: list[str]) -> Refusal | None:
        """At the end of DATA, for an authenticated session: the credential is still valid, the
        header ``From:`` passes the same checks as the envelope sender, and the limits still
        have room (other sessions of the credential may have used it meanwhile)."""
        if username is None:
            return None
        credential = cfg.credentials.get(username)
        if credential is None:
            return Refusal("suspended", R.CREDENTIAL_GONE.format(user=username))
        refusal = header_from(cfg, credential, from_values)
        if refusal is not None:
            return refusal
        over = self.limiter.check_message(credential)
        return limit_refusal(over, username) if over is not None else None


def header_from(cfg: RelayConfig, credential: Credential, values: list[str]) -> Refusal | None:
    addresses = [a for _, a in email.utils.getaddresses(values) if a]
    if not addresses:
        return Refusal("sender_not_allowed", R.HEADER_FROM_MISSING)
    for address in addresses:
        local, at, domain = address.rpartition("@")
        if not (local and at and domain):
            # What the parser made of text it could not read (``a@other.org\@example.com``
            # reads as ``@example.com``): a reader may see another address in it.
            return Refusal("sender_not_allowed", R.HEADER_FROM_MALFORMED)
        domain = domain_of(address)
        if domain not in cfg.domains:
            return Refusal("domain_not_enabled", R.HEADER_FROM_DOMAIN.format(domain=domain))
        if not credential.may_send_as(address):
            return Refusal("sender_not_allowed", R.HEADER_FROM_NOT_ALLOWED.format(
                user=credential.username, domain=domain))
    return None


def limit_refusal(over: LimitExceeded, user: str) -> Refusal:
    if over.kind == "quota":
        return Refusal("quota_exceeded", R.QUOTA.format(limit=over.limit, user=user))
    return Refusal("rate_limited", R.RATE.format(limit=over.limit, user=user))


def header_from_domain(cfg: RelayConfig, from_values: list[str]) -> str:
    """The configured domain of the first header From: address, or ``other``."""
    for _, address in email.utils.getaddresses(from_values):
        if address:
            domain = domain_of(address)
            return domain if domain in cfg.domains else "other"
    return "other"
