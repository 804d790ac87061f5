"""The command lines the chart and the operator give their containers are ones the CLI accepts,
for the defaults and for every values file in the chart's ci/ directory as it is."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest

from mailplane_cli.main import build_parser

from .conftest import CI_VALUES, load_values, render_install

VALUES = [pytest.param({}, id="defaults")] + [
    pytest.param(load_values(p), id=p.stem) for p in CI_VALUES]


def parse(argv: list[str]) -> Any:
    """argparse exits 2 on an argument it does not know; say which instead."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"mailplane rejects {argv}: {err.getvalue()}") from exc


@pytest.mark.parametrize("values", VALUES)
def test_the_operator_parses_the_chart_arguments(values: dict[str, Any]) -> None:
    [deployment] = [d for d in render_install(values).of_kind("Deployment")
                    if d["metadata"]["name"].endswith("-operator")]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = parse(container["args"])
    assert args.command == "operator"
    operator = values.get("operator", {})
    assert args.cluster_domain == operator.get("clusterDomain", "cluster.local")
    assert args.namespace == operator.get("watchNamespaces", [])
    assert args.verbose is operator.get("verbose", False)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.metrics_port == ports["metrics"]
    assert args.liveness_port == ports["healthz"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    # Relays whose SmtpRelay leaves their pod or Service shape unset get the chart's values;
    # the chart's imagePullSecrets serve relay pods too unless relay.pod sets its own.
    relay_values = values.get("relay", {})
    pod_values = relay_values.get("pod", {})
    defaults = json.loads(args.relay_defaults.model_dump_json(by_alias=True, exclude_none=True))
    assert defaults["pod"].get("imagePullSecrets", []) == (
        pod_values.get("imagePullSecrets") or values.get("imagePullSecrets", []))
    for key in ("labels", "nodeSelector", "tolerations", "topologySpreadConstraints",
                "priorityClassName"):
        assert defaults["pod"].get(key) == pod_values.get(key), key
    assert defaults["service"]["type"] == relay_values.get("service", {}).get("type",
                                                                              "ClusterIP")
    # Relays without spec.image run the chart's image.
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MAILPLANE_RELAY_IMAGE"] == container["image"]
    # Leader election (on by default): the Lease in the release namespace, the pod's name as
    # the holder identity.
    election = operator.get("leaderElection", {})
    assert args.leader_election is election.get("enabled", True)
    if args.leader_election:
        assert args.leader_election_namespace == deployment["metadata"]["namespace"]
        assert args.retry_period < args.renew_deadline < args.lease_duration
        assert "POD_NAME" in env


def test_the_ci_values_use_the_json_log_format() -> None:
    """ci/namespaced-values.yaml passes --log-format=json through extraArgs: it takes effect."""
    [path] = [p for p in CI_VALUES if p.stem == "namespaced-values"]
    [deployment] = [d for d in render_install(load_values(path)).of_kind("Deployment")
                    if d["metadata"]["name"].endswith("-operator")]
    args = parse(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args.log_format == "json"
    assert parse(["operator"]).log_format == "text"
    with pytest.raises(AssertionError, match="invalid choice"):
        parse(["operator", "--log-format=yaml"])


def test_the_relay_parses_the_command_the_operator_gives_its_pods() -> None:
    from mailplane_operator.reconcile import relay as relay_mod
    from tests.operator.reconcile_builders import relay

    pod = relay_mod.pod_template(relay(), relay_mod.DEFAULT_IMAGE)["spec"]
    [container] = pod["containers"]
    command = container["command"]
    assert command[0] == "mailplane"
    args = parse(command[1:])
    assert args.command == "relay"
