"""The command line the chart gives the operator container is one `mailplane operator` accepts."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from .conftest import CHART_DIR, load_values, render_install

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mailplane_operator.cli") is None,
                                reason="mailplane_operator.cli not written yet")


@pytest.mark.parametrize("values", [
    pytest.param({}, id="defaults"),
    pytest.param({k: v for k, v in load_values(CHART_DIR / "ci" / "namespaced-values.yaml").items()
                  if k != "operator"} | {"operator": {
                      "watchNamespaces": ["mail", "shop"], "metricsPort": 9090,
                      "dnsResolver": "10.0.0.10:53", "clusterDomain": "corp.internal",
                      "verbose": True}},
                 id="namespaced"),
])
def test_the_operator_parses_the_chart_arguments(values: dict[str, Any]) -> None:
    from mailplane_cli.main import build_parser

    [deployment] = render_install(values).of_kind("Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "operator"
    assert args.cluster_domain == values.get("operator", {}).get("clusterDomain", "cluster.local")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.metrics_port == ports["metrics"]
    assert args.liveness_port == ports["healthz"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    # Relays without spec.image run the chart's image.
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MAILPLANE_RELAY_IMAGE"] == container["image"]
