"""The CRDs are valid apiextensions.k8s.io/v1 objects, the examples fit them, the invalid examples
do not (with the message a user would read), and the CEL rules hold what they promise.

No API server here: the CRDs are validated with kubernetes-validate (the official OpenAPI
schemas of each supported Kubernetes version); custom resources are validated the way the API
server would, in three steps: structural defaulting, the openAPIV3Schema (with jsonschema; an
object without ``x-kubernetes-preserve-unknown-fields`` rejects unknown fields, as kubectl's
strict field validation does) and each ``x-kubernetes-validations`` CEL rule (with cel-python).
The operator's pydantic models must agree: they accept every example and reject every invalid one.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from mailplane_operator.reconcile import models

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"
EXAMPLES = ROOT / "examples"
INVALID = EXAMPLES / "invalid"

KINDS = {
    "SmtpRelay": ("smtprelays", "smr"),
    "SendingDomain": ("sendingdomains", "sd"),
    "SmtpCredential": ("smtpcredentials", "smc"),
    "RetentionPolicy": ("retentionpolicies", "rp"),
}


def load_crds() -> dict[str, dict[str, Any]]:
    crds = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        crds[crd["spec"]["names"]["kind"]] = crd
    return crds


CRDS = load_crds()


def schema_of(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = CRDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def manifests(directory: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(directory.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                yield f"{path.name}[{i}]", doc


# --------------------------------------------------------------------------------------------
# An offline stand-in for the API server's validation of custom resources
# --------------------------------------------------------------------------------------------


def to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """Structural schema -> JSON schema: closed objects, nullable, no Kubernetes extensions."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")
           and k not in ("nullable", "default", "format")}
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if "properties" in node:
        out["properties"] = {k: to_jsonschema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        # ObjectMeta is the API server's: a CRD may only constrain name and generateName.
        if "metadata" in out["properties"]:
            out["properties"]["metadata"].pop("additionalProperties", None)
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_jsonschema(node["additionalProperties"])
    if "items" in node:
        out["items"] = to_jsonschema(node["items"])
    return out


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Structural defaulting: missing fields with a default get it, recursively (defaults are
    themselves defaulted, as the API server does)."""
    if isinstance(value, dict) and "properties" in node:
        for name, sub in node["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, list) and "items" in node:
        return [apply_defaults(node["items"], v) for v in value]
    return value


_cel_env = celpy.Environment()


def cel_rules(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    for rule in node.get("x-kubernetes-validations", []):
        yield path or "<root>", rule
    for name, sub in node.get("properties", {}).items():
        yield from cel_rules(sub, f"{path}.{name}")
    if "items" in node:
        yield from cel_rules(node["items"], f"{path}[]")


def cel_errors(node: dict[str, Any], value: Any, path: str) -> list[str]:
    errors = []
    for rule in node.get("x-kubernetes-validations", []):
        program = _cel_env.program(_cel_env.compile(rule["rule"]))
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        if isinstance(result, Exception) or not bool(result):
            errors.append(f"{path}: Invalid value: {rule['message']}")
    if isinstance(value, dict):
        for name, sub in node.get("properties", {}).items():
            if name in value:
                errors += cel_errors(sub, value[name], f"{path}.{name}")
    elif isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            errors += cel_errors(node["items"], item, f"{path}[{i}]")
    return errors


def admission_errors(manifest: dict[str, Any]) -> list[str]:
    """What the API server would answer for this custom resource: [] when it is accepted."""
    kind = manifest.get("kind")
    if kind not in CRDS:
        return [f"no CRD for kind {kind!r}"]
    schema = schema_of(kind)
    obj = apply_defaults(schema, copy.deepcopy(manifest))
    validator = jsonschema.Draft7Validator(to_jsonschema(schema))
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))]
    if errors:  # the API server runs CEL only on a schema-valid object
        return errors
    return cel_errors(schema, obj, "<root>")


# --------------------------------------------------------------------------------------------
# The CRDs themselves
# --------------------------------------------------------------------------------------------


def test_there_is_one_crd_per_kind() -> None:
    assert sorted(CRDS) == sorted(KINDS)
    for kind, (plural, _short) in KINDS.items():
        assert (CRD_DIR / f"mailplane.io_{plural}.yaml").exists(), kind


@pytest.mark.parametrize("version", all_versions())
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_crd_is_valid_for_each_supported_kubernetes_version(kind: str, version: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning (e.g. unknown kind) fails the test
        kubernetes_validate.validate(CRDS[kind], version, strict=True)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_crd_follows_the_api_conventions(kind: str) -> None:
    crd = CRDS[kind]
    plural, short = KINDS[kind]
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{plural}.mailplane.io"
    assert spec["group"] == "mailplane.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["plural"] == plural
    assert spec["names"]["shortNames"] == [short]
    assert spec["names"]["categories"] == ["mailplane"]
    [version] = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    columns = version["additionalPrinterColumns"]
    assert columns[0]["name"] == "Ready"
    assert columns[0]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns[-1] == {"name": "Age", "type": "date",
                           "jsonPath": ".metadata.creationTimestamp"}
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    cond = status["conditions"]
    assert cond["x-kubernetes-list-type"] == "map"
    assert set(cond["items"]["properties"]) == {
        "type", "status", "reason", "message", "observedGeneration", "lastTransitionTime"}
    assert "observedGeneration" in status


def _walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_schema_is_structural_and_its_defaults_and_patterns_are_valid(kind: str) -> None:
    for path, node in _walk(schema_of(kind)):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        if "pattern" in node:
            re.compile(node["pattern"])  # RE2 patterns are a subset of Python's
            assert "(?=" not in node["pattern"] and "(?<" not in node["pattern"], (
                f"{path}: look-arounds are not RE2")
        if "default" in node:
            jsonschema.validate(apply_defaults(node, copy.deepcopy(node["default"])),
                                to_jsonschema(node))
        if "description" in node:
            assert node["description"].strip(), path


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_cel_rule_compiles_and_has_a_message(kind: str) -> None:
    rules = list(cel_rules(schema_of(kind)))
    assert rules, f"{kind} has no CEL rule"
    for path, rule in rules:
        _cel_env.compile(rule["rule"])
        assert rule["message"].strip(), path


# --------------------------------------------------------------------------------------------
# Examples and invalid examples
# --------------------------------------------------------------------------------------------

EXAMPLE_DOCS = list(manifests(EXAMPLES))
INVALID_DOCS = list(manifests(INVALID))


def test_the_examples_cover_every_kind() -> None:
    kinds = [doc["kind"] for _, doc in EXAMPLE_DOCS]
    assert kinds.count("SmtpRelay") >= 1
    assert kinds.count("SendingDomain") >= 2
    assert kinds.count("SmtpCredential") >= 2
    assert kinds.count("RetentionPolicy") >= 1
    assert {doc["kind"] for _, doc in INVALID_DOCS} == set(KINDS)


@pytest.mark.parametrize(("where", "doc"), EXAMPLE_DOCS, ids=[w for w, _ in EXAMPLE_DOCS])
def test_example_is_accepted(where: str, doc: dict[str, Any]) -> None:
    if doc["kind"] in CRDS:
        assert admission_errors(doc) == []
        models.PARSERS[doc["kind"]](doc)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _expected(where: str) -> str:
    path = INVALID / where.split("[")[0]
    match = re.search(r"^# expect: (.+)$", path.read_text(), re.MULTILINE)
    assert match, f"{path.name} lacks an '# expect: <message>' line"
    return match.group(1).strip()


@pytest.mark.parametrize(("where", "doc"), INVALID_DOCS, ids=[w for w, _ in INVALID_DOCS])
def test_invalid_example_is_rejected_with_a_readable_message(where: str,
                                                            doc: dict[str, Any]) -> None:
    errors = admission_errors(doc)
    assert errors, "accepted"
    expected = _expected(where)
    assert any(expected in e for e in errors), errors
    # The operator does not trust the installed CRD to be current: its models refuse it too,
    # naming the kind, the object and a spec field.
    with pytest.raises(models.SpecError) as info:
        models.PARSERS[doc["kind"]](doc)
    message = str(info.value)
    assert message.startswith(f"{doc['kind']} {doc['metadata']['namespace']}/broken: spec")


def test_defaults_fill_the_product_promises() -> None:
    policy = apply_defaults(schema_of("RetentionPolicy"), {"spec": {}})
    assert policy["spec"]["messageLog"] == "2160h"  # 90 days
    relay = apply_defaults(schema_of("SmtpRelay"), {"spec": {"tls": {"secretName": "t"}}})
    assert relay["spec"]["listeners"] == {"submission": {"enabled": True, "port": 587},
                                          "submissions": {"enabled": True, "port": 465}}
    assert relay["spec"]["delivery"] == {"mode": "mx"}
    # The models' defaults are the CRD's defaults.
    parsed = models.parse_smtp_relay({"metadata": {"name": "r"}, **relay})
    assert parsed.spec == models.parse_smtp_relay(
        {"metadata": {"name": "r"}, "spec": {"tls": {"secretName": "t"}}}).spec
    assert models.parse_retention_policy({"metadata": {"name": "p"}, **policy}).spec == (
        models.RetentionPolicySpec())


CEL_CASES = [
    # (kind, spec, error expected or None): each CEL rule, on both sides of its boundary.
    ("SmtpRelay", {"tls": {"secretName": "t"}, "delivery": {"mode": "smarthost",
                                                             "smarthost": {"host": "up"}}}, None),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "delivery": {"smarthost": {"host": "up"}}},
     "delivery.smarthost is set but delivery.mode is not smarthost"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "delivery": {
        "mode": "smarthost", "smarthost": {"host": "up", "username": "u"}}},
     "smarthost.username and smarthost.passwordSecretRef go together"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "listeners": {"submission": {"port": 465}}},
     "listeners.submission.port and listeners.submissions.port must differ"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "listeners": {"submission": {"enabled": False}}},
     None),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "shutdownGrace": "2h"},
     "shutdownGrace must be between 1s and 1h"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "queue": {"retryInitial": "10m",
                                                          "maxLifetime": "5m"}},
     "queue.maxLifetime must not be shorter than queue.retryInitial"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "allowedNamespaces": {"matchExpressions": [
        {"key": "team", "operator": "In"}]}}, "In and NotIn need values"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "allowedNamespaces": {"matchExpressions": [
        {"key": "team", "operator": "Exists"}]}}, None),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "limits": {
        "defaultDailyQuota": 1001, "maxDailyQuota": 1000}},
     "limits.defaultDailyQuota must not exceed limits.maxDailyQuota"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "limits": {
        "defaultRatePerMinute": 60, "maxRatePerMinute": 60, "maxDailyQuota": 5}}, None),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "tenancy": {"suspensions": [
        {"namespace": "shop", "reason": "unpaid"},
        {"namespace": "web", "name": "app", "reason": "complaints"}]}}, None),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "tenancy": {"suspensions": [
        {"namespace": "shop", "reason": "x\r\n250 OK"}]}}, "does not match"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "pod": {"labels": {
        "app.kubernetes.io/instance": "other"}}}, "pod.labels may not set app.kubernetes.io/name"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "pod": {"labels": {"team": "mail"}}}, None),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "networkPolicy": {
        "smtpFromCIDRs": ["203.0.113.0/24", "2001:db8::/32"]}}, None),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "networkPolicy": {
        "smtpFromCIDRs": ["mail.example.com"]}}, "does not match"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "networkPolicy": {
        "smtpFromCIDRs": ["203.0.113.7"]}}, "does not match"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "autoscaling": {
        "enabled": True, "minReplicas": 5, "maxReplicas": 2}},
     "minReplicas must not exceed maxReplicas"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "autoscaling": {
        "enabled": True, "minReplicas": 2, "maxReplicas": 2}}, None),
    ("SmtpCredential", {"relayRef": {"name": "r"}, "allowedSenders": ["example.com"],
                        "rotation": {"interval": "2h"}}, None),
    ("SmtpCredential", {"relayRef": {"name": "r"}, "allowedSenders": ["example.com"],
                        "rotation": {"interval": "1h"}},  # the 1h default overlap is too long
     "rotation.overlap must be shorter than rotation.interval"),
    ("SmtpCredential", {"relayRef": {"name": "r"}, "allowedSenders": ["example.com"],
                        "rotation": {"interval": "30m", "overlap": "1m"}},
     "rotation.interval must be at least 1h"),
    ("SmtpCredential", {"relayRef": {"name": "r"}, "allowedSenders": ["example.com"],
                        "suspended": True, "suspendedReason": "abuse report"}, None),
    ("SendingDomain", {"domain": "example.com", "relayRef": {"name": "r"},
                       "spf": {"record": "v=spf1 -all", "include": ["x.example.net"]}},
     "spf.record replaces the suggestion"),
    ("SendingDomain", {"domain": "example.com", "relayRef": {"name": "r"},
                       "dkim": {"rotationInterval": "2160h"}}, None),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "delivery": {"mode": "smarthost", "smarthost": {
        "host": "h", "tls": "none", "username": "u", "passwordSecretRef": {"name": "s"}}}},
     "smarthost.tls is none but smarthost.username is set"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "delivery": {"mode": "smarthost", "smarthost": {
        "host": "h", "tls": "none", "username": "u", "passwordSecretRef": {"name": "s"},
        "allowPlaintextAuth": True}}}, None),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "delivery": {"mode": "smarthost", "smarthost": {
        "host": "h", "username": "u", "passwordSecretRef": {"name": "s"}}}}, None),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "delivery": {"mxTls": {
        "level": "encrypt", "policies": [{"domains": ["*.bank.example"], "level": "verify"}]}}},
     None),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "delivery": {"mxTls": {
        "policies": [{"domains": ["x.example"], "level": "dane"}]}}}, "dane"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "delivery": {"mtaSts": {"enabled": False}}},
     None),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "delivery": {"mtaSts": {"enabled": 5}}},
     "enabled"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "webhooks": {"url": "https://h.example/x"}},
     "webhooks.url and webhooks.secretRef go together"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "webhooks": {
        "url": "https://h.example/x", "secretRef": {"name": "s"}, "maxAge": "200h"}},
     "webhooks.maxAge must be between 1m and 168h"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "webhooks": {
        "url": "https://h.example/x", "secretRef": {"name": "s"}, "timeout": "90s"}},
     "webhooks.timeout must be between 100ms and 60s"),
    ("SmtpRelay", {"tls": {"secretName": "t"}, "webhooks": {
        "url": "https://h.example/x", "secretRef": {"name": "s", "previousKey": "old"},
        "allowPrivateNetworks": ["10.96.0.0/12"], "maxAge": "24h"}}, None),
    ("RetentionPolicy", {"messageLog": "30m"}, "messageLog must be between 1h and 2160h"),
    ("RetentionPolicy", {"purgeInterval": "25h"}, "purgeInterval must be between 1m and 24h"),
    ("RetentionPolicy", {"suppression": "8761h"}, "suppression must be between 1h and 8760h"),
    ("RetentionPolicy", {"suppression": "8760h"}, None),
    ("RetentionPolicy", {"messageLog": "24h", "purgeInterval": "24h"}, None),
]


@pytest.mark.parametrize(("kind", "spec", "expected"), CEL_CASES)
def test_cel_rules_and_models_agree(kind: str, spec: dict[str, Any],
                                    expected: str | None) -> None:
    doc = {"apiVersion": "mailplane.io/v1alpha1", "kind": kind,
           "metadata": {"name": "x", "namespace": "ns"}, "spec": spec}
    errors = admission_errors(doc)
    if expected is None:
        assert errors == []
        models.PARSERS[kind](doc)
    else:
        assert any(expected in e for e in errors), errors
        with pytest.raises(models.SpecError):
            models.PARSERS[kind](doc)


def _spec_paths(node: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted paths of the leaf fields (objects are described through their fields)."""
    for name, sub in node.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        inner = sub.get("items", sub)
        if "properties" in inner:
            yield from _spec_paths(inner, path)
        else:
            yield path


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_docs_describe_every_spec_field(kind: str) -> None:
    """docs/api.md names each spec field (or the parent that it documents as a whole)."""
    doc = (ROOT / "docs" / "api.md").read_text()
    section = doc.split(f"\n## {kind}\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([A-Za-z0-9.]+)`", section))
    spec = schema_of(kind)["properties"]["spec"]
    missing = [p for p in _spec_paths(spec)
               if not any(p == n or p.startswith(n + ".") for n in named)]
    assert missing == [], f"docs/api.md does not describe {kind} spec fields {missing}"
