"""The kopf side of the operator: thin handlers around the pure reconcile layer.

Each handler parses the custom resource (``reconcile.models``), reads what the pure function
needs (Secrets, the relay, namespace labels, DNS answers), calls it, writes its result through
``kube.KubeClient`` (skipping writes that change nothing), patches the status and posts the
Events it returns. Nothing here decides policy. One module per resource, each with a
``register(registry, rt, resource)``:

- `relay`: the worker that renders a relay's config Secrets, children and status;
- `domain`: DKIM keys, DNS verification, the domain's deletion;
- `credential`: admission, the application Secret, rotation, the credential's deletion;
- `retention`: retention policies;
- `namespace`: namespace label changes re-render the relays (access and grants follow labels);
- `common`: what they share (keys, diffs, status patches, inputs of the pure functions).

How a change reaches a relay's configuration
--------------------------------------------
kopf indexes keep every SmtpRelay, and every SendingDomain and SmtpCredential grouped by the relay
they reference. One worker per SmtpRelay (a kopf daemon) renders that relay's configuration
Secrets, children and status. Handlers *poke* the worker; pokes that arrive together are rendered
once. A deleted credential holds its finalizer until a render without it has been written, so it
loses access within the same reconcile. A credential's rotation state lives in an operator-owned
Secret in the relay's namespace (``reconcile.credential_state``) and DKIM keys in the domain's
Secret, so a restart loses nothing: the indexes are complete before any handler runs, and the
first render re-reads the Secrets.
"""

from __future__ import annotations

from typing import Any

import kopf

from ..reconcile.models import GROUP, VERSION
from ..runtime import Runtime
from . import credential, domain, namespace, relay, retention
from .common import index_by_relay

RELAYS = (GROUP, VERSION, "smtprelays")
DOMAINS = (GROUP, VERSION, "sendingdomains")
CREDENTIALS = (GROUP, VERSION, "smtpcredentials")
POLICIES = (GROUP, VERSION, "retentionpolicies")


def build_registry(rt: Runtime) -> kopf.OperatorRegistry:
    """Every handler, bound to one Runtime."""
    registry = kopf.OperatorRegistry()
    _register_login(registry, rt)
    _register_indexes(registry)
    relay.register(registry, rt, RELAYS)
    domain.register(registry, rt, DOMAINS)
    credential.register(registry, rt, CREDENTIALS)
    retention.register(registry, rt, POLICIES)
    namespace.register(registry, rt)
    return registry


def _register_login(registry: kopf.OperatorRegistry, rt: Runtime) -> None:
    credentials = rt.config.credentials

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # kopf calls this at start and whenever the API refuses its credentials (401): log in
        # again, for kopf and for the operator's own client (kube.Credentials).
        return credentials.login()


def _register_indexes(registry: kopf.OperatorRegistry) -> None:
    """The in-memory indexes every handler reads (complete before any handler runs):
    relays by key, domains and credentials by the relay they refer to, policies by namespace."""

    @kopf.index(*RELAYS, id="relays_idx", registry=registry)
    def relays_idx(**kwargs: Any) -> Any:
        return {(kwargs["namespace"], kwargs["name"]): dict(kwargs["body"])}

    kopf.index(*DOMAINS, id="domains_idx", registry=registry)(index_by_relay)
    kopf.index(*CREDENTIALS, id="credentials_idx", registry=registry)(index_by_relay)

    @kopf.index(*POLICIES, id="retention_idx", registry=registry)
    def retention_idx(**kwargs: Any) -> Any:
        return {kwargs["namespace"]: dict(kwargs["body"])}
