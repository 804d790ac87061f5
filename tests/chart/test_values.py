"""values.schema.json rejects unknown keys and wrong types with a message naming the key, and
every value is documented in the chart README."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import pytest
import yaml

from .conftest import CHART_DIR, render_install


def schema_error(values: dict[str, Any]) -> str:
    with helm.Chart.load(CHART_DIR) as chart, pytest.raises(helm.HelmValuesError) as info:
        chart.validate_schema(values)
    return str(info.value)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"replicaCount": 2}, "additional properties 'replicaCount' not allowed"),
        ({"operator": {"replicas": 0}}, "/operator/replicas"),
        ({"monitoring": {"dashboard": {"label": {}}}}, "additional properties 'label' not allowed"),
        ({"operator": {"metricsPort": "http"}}, "/operator/metricsPort"),
        ({"operator": {"metricsPort": 70000}}, "/operator/metricsPort"),
        ({"crds": {"enabled": "yes"}}, "/crds/enabled"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"operator": {"watchNamespaces": ["Not_A_Namespace"]}}, "/operator/watchNamespaces/0"),
        ({"sendingDomains": [{"name": "example-com"}]}, "missing property 'spec'"),
        ({"monitoring": {"serviceMonitor": {"interval": "often"}}},
         "/monitoring/serviceMonitor/interval"),
        ({"networkPolicy": {"metricsNamespaceSelector": {"matchLabel": {}}}},
         "additional properties 'matchLabel' not allowed"),
    ],
)
def test_bad_values_are_rejected_with_a_message_naming_the_key(
    values: dict[str, Any], expected: str
) -> None:
    assert expected in schema_error(values)


def test_install_refuses_bad_values() -> None:
    with pytest.raises(helm.HelmError, match="replicaCount"):
        render_install({"replicaCount": 2})


def test_defaults_and_ci_values_pass_the_schema() -> None:
    with helm.Chart.load(CHART_DIR) as chart:
        chart.validate_schema({})
        for path in sorted((CHART_DIR / "ci").glob("*.yaml")):
            chart.validate_schema(yaml.safe_load(path.read_text()))


def test_schema_closes_every_object() -> None:
    """additionalProperties is false wherever properties are listed; open objects are the
    documented pass-throughs (CR specs, affinity terms) or typed maps."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    open_objects: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            closed = node.get("additionalProperties") is False
            if node.get("type") == "object" and "properties" in node and not closed:
                open_objects.append(path)
            for key, child in node.items():
                walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{path}/{i}")

    walk(schema, "")
    assert open_objects == []


def leaf_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        out = []
        for key, child in node.items():
            path = f"{prefix}.{key}" if prefix else key
            # Free-form maps and CR specs are documented as a whole.
            if key in ("spec", "labels", "annotations", "podAnnotations", "podLabels",
                       "nodeSelector", "affinity", "resources", "requests", "limits",
                       "matchLabels", "metricsNamespaceSelector", "ingressNamespaceSelector",
                       "dnsNamespaceSelector", "storeNamespaceSelector"):
                out.append(path)
            else:
                out.extend(leaf_paths(child, path))
        return out
    return [prefix]


def test_every_value_is_documented_in_the_readme() -> None:
    readme = (CHART_DIR / "README.md").read_text()
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    paths = leaf_paths(values)
    assert len(paths) > 30
    missing = [p for p in paths if f"`{p}`" not in readme]
    assert missing == []
