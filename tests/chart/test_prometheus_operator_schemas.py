"""kubernetes-validate knows no ServiceMonitor or PrometheusRule: the chart's are validated against
the prometheus-operator CRD schemas instead, as compiled by the npm package
@kubernetes-models/prometheus-operator (run with node; see the `node_tools` fixture)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import CHART_DIR, NODE_DIR, ROOT, load_values, render_install


@pytest.fixture(scope="module")
def validator(node_tools: Path) -> Path:
    return node_tools / "validate.mjs"


def check(validator: Path, objects: list[dict[str, Any]]) -> tuple[int, str]:
    r = subprocess.run(["node", str(validator)], input=json.dumps(objects), capture_output=True,
                       text=True, timeout=60, cwd=NODE_DIR)
    return r.returncode, r.stdout + r.stderr


def test_service_monitor_and_prometheus_rule_match_their_crds(validator: Path) -> None:
    objects = render_install(load_values(CHART_DIR / "ci" / "monitoring-values.yaml")).objects
    rc, out = check(validator, objects)
    assert rc == 0, out
    assert "checked 2" in out


def test_the_schema_check_has_teeth(validator: Path) -> None:
    objects = render_install(load_values(CHART_DIR / "ci" / "monitoring-values.yaml")).objects
    [monitor] = [o for o in objects if o["kind"] == "ServiceMonitor"]
    monitor["spec"]["endpoints"][0]["interval"] = "every minute"
    rc, out = check(validator, objects)
    assert rc == 1
    assert "ServiceMonitor/mailplane-operator: data/spec/endpoints/0/interval" in out


def test_relay_service_monitor_is_valid_and_scrapes_as_the_alerts_expect(validator: Path) -> None:
    """The ServiceMonitor the operator makes for the relay of examples/relay.yaml: valid for the
    Prometheus Operator, and its jobLabel resolves to the job the relay alerts select."""
    from mailplane_operator.reconcile import relay as relay_mod
    from mailplane_operator.reconcile.models import parse_smtp_relay

    body = yaml.safe_load((ROOT / "examples" / "relay.yaml").read_text())
    relay = parse_smtp_relay(body)
    children = relay_mod.relay_children(relay, service_monitor_available=True)
    [monitor] = [c for c in children if c["kind"] == "ServiceMonitor"]
    rc, out = check(validator, [monitor])
    assert rc == 0, out
    selected = [c for c in children if c["kind"] == "Service" and
                monitor["spec"]["selector"]["matchLabels"].items()
                <= c["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == [f"{relay.meta.name}-metrics"]
    labels = selected[0]["metadata"]["labels"]
    assert labels[monitor["spec"]["jobLabel"]] == "mailplane-relay"
    rules = (ROOT / "monitoring" / "rules.yaml").read_text()
    assert 'up{job="mailplane-relay"}' in rules
