"""Alert rules and dashboard: promtool checks and unit tests, runbooks, metric names that exist,
the dashboard valid against its schema and every panel's PromQL parsed by promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from mailplane_operator.metrics import OperatorMetrics
from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.store import MessageLog, SqliteBackend
from mailplane_relay.store.health import StoreHealth
from mailplane_relay.webhooks import WebhookMetrics

from .conftest import ROOT

MONITORING = ROOT / "monitoring"
RULES = MONITORING / "rules.yaml"
DASHBOARD = MONITORING / "dashboard.json"
DOCS = ROOT / "docs" / "monitoring.md"
METRIC_NAME = re.compile(r"(?<![:\w])mailplane_[a-z0-9_]+")


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is not installed (apt-get install prometheus)"
    return path


def series_names(registry: CollectorRegistry) -> set[str]:
    """Every series name a registry can expose, from its metric definitions."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",)}
    return {family.name + suffix for family in registry.collect()
            for suffix in suffixes[family.type]}


def exported_metric_names() -> set[str]:
    metrics = RelayMetrics.create()
    # The store's metrics live with its components, on the same registry.
    StoreHealth.create(metrics.registry)
    MessageLog(SqliteBackend("unused.sqlite3"), flush_interval=1.0, metrics=metrics)
    WebhookMetrics(metrics.registry)
    relay = series_names(metrics.registry)
    operator = series_names(OperatorMetrics.create().registry)
    assert "mailplane_relay_recipients_total" in relay
    assert "mailplane_operator_reconcile_duration_seconds_bucket" in operator
    return relay | operator


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def dashboard_targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] if p["type"] != "row"
            for t in p["targets"]]


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends to Prometheus: its variables interpolated."""
    return (expr.replace("$__rate_interval", "1m").replace("$sender_domain", ".*")
            .replace("$credential", ".*"))


def test_rules_pass_promtool_check() -> None:
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_alert_unit_tests_pass() -> None:
    tests = sorted((MONITORING / "tests").glob("*.test.yaml"))
    assert tests
    r = subprocess.run([promtool(), "test", "rules", *map(str, tests)], capture_output=True,
                       text=True, timeout=60, cwd=MONITORING / "tests")
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in (MONITORING / "tests").glob("*.test.yaml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - firing == set()
    assert names - quiet == set()


def test_the_alerts_the_issue_asks_for_exist() -> None:
    names = {r["alert"] for r in alert_rules()}
    assert {"MailplaneHighBounceRate", "MailplaneHighComplaintRate",
            "MailplaneQueueMessageTooOld", "MailplaneDeliveryFailuresRising",
            "MailplaneAuthFailureSpike", "MailplaneRelayDown", "MailplaneRelayNotReady",
            "MailplaneConfigReloadFailed", "MailplaneCredentialRotationOverdue",
            "MailplaneDomainUnverified", "MailplaneDKIMKeyOverdue"} <= names


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    docs = DOCS.read_text()
    headings = {"#" + h.strip().lower() for h in re.findall(r"^#{2,4} (\w+)\s*$", docs, re.M)}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        ann = rule["annotations"]
        assert {"summary", "description", "runbook", "runbook_url"} <= set(ann), rule["alert"]
        url = ann["runbook_url"]
        assert url.startswith("https://github.com/mailplane/mailplane/blob/main/docs/monitoring.md#")
        assert "#" + url.rsplit("#", 1)[1] in headings, f"no heading in docs for {url}"
        assert "#" + rule["alert"].lower() == "#" + url.rsplit("#", 1)[1]


def test_rules_and_dashboard_use_only_metrics_that_exist() -> None:
    known = exported_metric_names()
    used = set(METRIC_NAME.findall(RULES.read_text()))
    for _title, expr in dashboard_targets():
        used |= set(METRIC_NAME.findall(expr))
    assert used - known == set()
    # The deliverability metrics really are used.
    assert {"mailplane_relay_recipients_total", "mailplane_relay_complaints_total",
            "mailplane_relay_auth_failures_total"} <= used


def test_dashboard_validates_against_the_grafana_schema() -> None:
    schema = json.loads((MONITORING / "dashboard.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    dashboard = json.loads(DASHBOARD.read_text())
    jsonschema.Draft202012Validator(schema).validate(dashboard)
    # The schema has teeth: a panel without gridPos is refused.
    broken = json.loads(DASHBOARD.read_text())
    del broken["panels"][1]["gridPos"]
    with pytest.raises(jsonschema.ValidationError, match="gridPos"):
        jsonschema.Draft202012Validator(schema).validate(broken)


def test_dashboard_variables_and_datasources() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("sender_domain", "credential"):
        assert variables[name]["type"] == "query"
        assert variables[name]["multi"] and variables[name]["includeAll"]
        assert f", {name})" in variables[name]["definition"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
    exprs = " ".join(e for _t, e in dashboard_targets())
    # Per-domain and per-credential panels honour the template variables.
    assert 'sender_domain=~"$sender_domain"' in exprs and 'credential=~"$credential"' in exprs


def test_dashboard_covers_what_sres_watch() -> None:
    titles = " | ".join(t for t, _e in dashboard_targets()).lower()
    exprs = " ".join(e for _t, e in dashboard_targets())
    for topic in ("messages accepted", "recipient outcomes", "bounce rate", "complaint rate",
                  "queue depth", "oldest queued", "delivery latency", "tls share",
                  "auth failures", "by sender domain", "by credential", "operator up",
                  "reconciles"):
        assert topic in titles, topic
    assert "histogram_quantile(0.99" in exprs


def test_every_panel_query_parses(tmp_path: Path) -> None:
    """promtool parses each query as the expression of a recording rule."""
    targets = dashboard_targets()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{i}", "expr": grafana_to_promql(expr)}
        for i, (_title, expr) in enumerate(targets)]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(targets)} rules found" in r.stdout
    # And a broken query would not slip through.
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y", "expr": "sum by (outcome (rate(x[1m]))"}]}]}))
    r = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0
