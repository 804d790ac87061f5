"""`mailplane operator`: run the operator against the current cluster.

Inside a pod it uses the service account (in-cluster config); elsewhere the current kubeconfig
context (``--kubeconfig``/``--context`` to choose). Metrics on ``--metrics-port``; kopf's liveness
endpoint on ``--liveness-port``. SIGTERM/SIGINT stop it (kopf's own signal handling).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from .logs import LOG_FORMATS, setup_logging
from .reconcile.models import RelayDefaults, SpecError, parse_relay_defaults
from .reconcile.relay import DEFAULT_IMAGE

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "operator",
        help="run the Kubernetes operator (SmtpRelay, SendingDomain, SmtpCredential, "
             "RetentionPolicy)",
        description="Reconcile Mailplane's custom resources in the cluster of the current "
                    "kubeconfig, or of the service account inside a pod.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable; kopf patterns like 'team-*' "
                            "work); default: all namespaces")
    scope.add_argument("--all-namespaces", "-A", action="store_true",
                       help="watch every namespace (the default)")
    parser.add_argument("--metrics-port", type=int, default=9090, metavar="N",
                        help="serve Prometheus metrics on this port (0: off; default 9090)")
    parser.add_argument("--liveness-port", type=int, default=0, metavar="N",
                        help="serve kopf's liveness probe on http://0.0.0.0:N/healthz (0: off)")
    parser.add_argument("--dns-resolver", metavar="IP[:PORT]",
                        help="DNS server for SendingDomain verification (default: the system "
                             "resolver)")
    parser.add_argument("--kubeconfig", metavar="FILE",
                        help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config; ignored "
                             "inside a pod unless given)")
    parser.add_argument("--context", metavar="NAME", help="kubeconfig context to use")
    parser.add_argument("--image", default=os.environ.get("MAILPLANE_RELAY_IMAGE",
                                                          DEFAULT_IMAGE),
                        help="relay image for SmtpRelays that do not set spec.image "
                             "(default: $MAILPLANE_RELAY_IMAGE or %(default)s)")
    parser.add_argument("--cluster-domain", default="cluster.local", metavar="DOMAIN",
                        help="DNS suffix of Services, for the host in application Secrets "
                             "(default %(default)s)")
    parser.add_argument("--relay-defaults", type=_relay_defaults, default=RelayDefaults(),
                        metavar="JSON",
                        help='pod and Service shape of relays whose SmtpRelay does not set it: '
                             '{"pod": {labels, annotations, imagePullSecrets, nodeSelector, '
                             'tolerations, affinity, topologySpreadConstraints, '
                             'priorityClassName}, "service": {type, annotations}}')
    parser.add_argument("--dns-endpoints", action="store_true",
                        help="publish the DNS records of SendingDomains that leave "
                             "spec.dnsEndpoint.enabled unset through external-dns DNSEndpoint "
                             "objects (where the cluster serves that CRD and the relay's "
                             "spec.tenancy.dnsPublishNamespaces allows it)")
    parser.add_argument("--cache-size", type=int, default=20_000, metavar="N",
                        help="entries kept per cache (parsed resources, Secrets read by name; "
                             "least recently used dropped). Keep it above the number of "
                             "SmtpCredentials plus SendingDomains, or renders re-read Secrets "
                             "(default %(default)s)")
    election = parser.add_argument_group(
        "leader election", "several replicas: only the holder of a coordination.k8s.io Lease "
        "works; the others take over when it stops renewing")
    election.add_argument("--leader-election", action="store_true",
                          help="run only while holding the Lease (identity: $POD_NAME, else "
                               "host name and process id)")
    election.add_argument("--leader-election-namespace", metavar="NS",
                          help="namespace of the Lease (default: the pod's own namespace)")
    election.add_argument("--lease-name", default="mailplane-operator", metavar="NAME",
                          help="name of the Lease (default %(default)s)")
    election.add_argument("--lease-duration", type=_seconds, default=15.0, metavar="SECONDS",
                          help="a leader that stops renewing is replaced after this long "
                               "(default 15)")
    election.add_argument("--renew-deadline", type=_seconds, default=10.0, metavar="SECONDS",
                          help="a leader that cannot renew for this long steps down "
                               "(default 10; below --lease-duration)")
    election.add_argument("--retry-period", type=_seconds, default=2.0, metavar="SECONDS",
                          help="how often the Lease is renewed or tried (default 2)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="text (default) or json: one JSON object per line with ts, "
                             "level, logger, msg and the object a record is about")
    parser.set_defaults(func=main)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} must be between 0 and 3600 seconds")
    return value


def _relay_defaults(text: str) -> RelayDefaults:
    try:
        return parse_relay_defaults(text)
    except SpecError as exc:  # argparse reports it as "argument --relay-defaults: ..."
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--relay-defaults: ")) from None


def main(args: argparse.Namespace) -> int:
    setup_logging(args.log_format, verbose=args.verbose)

    from prometheus_client import start_http_server  # noqa: PLC0415 - lazy: see main.py

    from .app import LeadershipLost, run  # noqa: PLC0415
    from .dnscheck import parse_resolver  # noqa: PLC0415
    from .kube import load_credentials  # noqa: PLC0415
    from .leader import LeaseSettings  # noqa: PLC0415
    from .metrics import OperatorMetrics  # noqa: PLC0415
    from .runtime import OperatorConfig  # noqa: PLC0415

    try:
        resolver = parse_resolver(args.dns_resolver) if args.dns_resolver else None
    except ValueError as exc:
        print(f"mailplane operator: --dns-resolver: {exc}", file=sys.stderr)
        return 2
    try:
        credentials = load_credentials(args.kubeconfig, args.context)
    except Exception as exc:  # the kubernetes client raises several unrelated types here
        print(f"mailplane operator: cannot find the cluster: {exc}\n"
              "Run inside a pod with a service account, or point --kubeconfig/$KUBECONFIG at "
              "a kubeconfig.", file=sys.stderr)
        return 2
    lease = None
    if args.leader_election:
        namespace = args.leader_election_namespace or credentials.default_namespace
        if not namespace:
            print("mailplane operator: --leader-election needs --leader-election-namespace "
                  "outside a pod (the namespace to keep the Lease in)", file=sys.stderr)
            return 2
        try:
            lease = LeaseSettings(namespace=namespace, name=args.lease_name,
                                  lease_duration=args.lease_duration,
                                  renew_deadline=args.renew_deadline,
                                  retry_period=args.retry_period)
        except ValueError as exc:
            print(f"mailplane operator: {exc}: set --retry-period, --renew-deadline and "
                  "--lease-duration in that increasing order", file=sys.stderr)
            return 2
    if args.cache_size < 100:
        print("mailplane operator: --cache-size must be at least 100", file=sys.stderr)
        return 2
    config = OperatorConfig(
        leader_election=lease,
        cache_size=args.cache_size,
        credentials=credentials,
        namespaces=tuple(args.namespace),
        dns_resolver=resolver,
        image=args.image,
        cluster_domain=args.cluster_domain,
        relay_defaults=args.relay_defaults,
        dns_endpoints=args.dns_endpoints,
        operator_namespace=credentials.default_namespace,
    )
    metrics = OperatorMetrics.create()
    if args.metrics_port:
        start_http_server(args.metrics_port, registry=metrics.registry)
    logger.info("Mailplane operator starting against %s, watching %s", credentials.server,
                ", ".join(config.namespaces) or "all namespaces")
    options: dict[str, Any] = {}
    if args.liveness_port:
        options["liveness_endpoint"] = f"http://0.0.0.0:{args.liveness_port}/healthz"
    try:
        asyncio.run(run(config, metrics=metrics, **options))
    except LeadershipLost as exc:
        logger.error("Stopping: %s; a restart makes this replica a candidate again", exc)
        return 1
    return 0
