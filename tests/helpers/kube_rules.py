"""API-server rules the emulator enforces (tests/helpers/kube.py), as pure functions.

Each rule follows the Kubernetes API server's own validation (apimachinery's
``validation.IsDNS1123Subdomain``/``IsDNS1123Label``/``IsDNS1035Label``/``IsQualifiedName``/
``IsValidLabelValue``, ``ValidateStatefulSetUpdate``, immutable Secrets, label selectors), with
the same field paths and the same wording where a test or a user would read it. A rule breaks
with `Invalid` (answered as 422) naming the field, as a real API server does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

DNS1123_LABEL_MAX = 63
DNS1123_SUBDOMAIN_MAX = 253
LABEL_VALUE_MAX = 63
ANNOTATIONS_MAX_BYTES = 256 * 1024

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")

# Resources whose names are DNS labels (the name becomes a DNS name or a label value);
# every other name is a DNS-1123 subdomain.
DNS1035_NAMED = frozenset({"services"})
DNS1123_LABEL_NAMED = frozenset({"namespaces"})

# ValidateStatefulSetUpdate: everything in spec but these is immutable.
STATEFULSET_MUTABLE = frozenset({
    "replicas", "ordinals", "template", "updateStrategy", "revisionHistoryLimit",
    "persistentVolumeClaimRetentionPolicy", "minReadySeconds",
})


class Invalid(Exception):
    """One or more field errors, formatted like the API server's 422 message."""

    def __init__(self, kind: str, name: str, errors: list[str]) -> None:
        super().__init__(f'{kind} "{name}" is invalid: ' + ", ".join(errors))
        self.errors = errors


def _name_errors(value: str, max_length: int, pattern: re.Pattern[str],
                 message: str) -> list[str]:
    out = []
    if len(value) > max_length:
        out.append(f"must be no more than {max_length} characters")
    if not pattern.fullmatch(value):
        out.append(message)
    return out


def dns1123_label_errors(value: str) -> list[str]:
    return _name_errors(
        value, DNS1123_LABEL_MAX, _DNS1123_LABEL,
        "a lowercase RFC 1123 label must consist of lower case alphanumeric "
        "characters or '-', and must start and end with an alphanumeric character")


def dns1123_subdomain_errors(value: str) -> list[str]:
    return _name_errors(
        value, DNS1123_SUBDOMAIN_MAX, _DNS1123_SUBDOMAIN,
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
        "characters, '-' or '.', and must start and end with an alphanumeric character")


def dns1035_label_errors(value: str) -> list[str]:
    return _name_errors(
        value, DNS1123_LABEL_MAX, _DNS1035_LABEL,
        "a DNS-1035 label must consist of lower case alphanumeric characters or "
        "'-', start with an alphabetic character, and end with an alphanumeric character")


def qualified_name_errors(value: str) -> list[str]:
    """A label or annotation key: an optional DNS-subdomain prefix and '/', then a name."""
    prefix, _, name = value.rpartition("/")
    out = []
    if "/" in value and not prefix:
        out.append("prefix part must be non-empty")
    elif prefix:
        out.extend(f"prefix part {e}" for e in dns1123_subdomain_errors(prefix))
    if not name:
        out.append("name part must be non-empty")
    elif len(name) > LABEL_VALUE_MAX:
        out.append(f"name part must be no more than {LABEL_VALUE_MAX} characters")
    elif not _QUALIFIED_NAME.fullmatch(name):
        out.append("name part must consist of alphanumeric characters, '-', '_' or '.', and "
                   "must start and end with an alphanumeric character")
    return out


def label_value_errors(value: Any) -> list[str]:
    if not isinstance(value, str):
        return ["must be a string"]
    out = []
    if len(value) > LABEL_VALUE_MAX:
        out.append(f"must be no more than {LABEL_VALUE_MAX} characters")
    if not _LABEL_VALUE.fullmatch(value):
        out.append("a valid label must be an empty string or consist of alphanumeric "
                   "characters, '-', '_' or '.', and must start and end with an alphanumeric "
                   "character")
    return out


def name_errors(plural: str, name: str) -> list[str]:
    if plural in DNS1035_NAMED:
        return dns1035_label_errors(name)
    if plural in DNS1123_LABEL_NAMED:
        return dns1123_label_errors(name)
    return dns1123_subdomain_errors(name)


def _invalid(field: str, value: Any, errors: list[str]) -> list[str]:
    return [f"{field}: Invalid value: {json.dumps(value)}: {e}" for e in errors]


def _labels_errors(field: str, labels: Any) -> list[str]:
    if labels is None:
        return []
    if not isinstance(labels, Mapping):
        return [f"{field}: Invalid value: must be an object"]
    out = []
    for key, value in labels.items():
        out.extend(_invalid(field, key, qualified_name_errors(str(key))))
        out.extend(_invalid(f"{field}[{key}]", value, label_value_errors(value)))
    return out


def _annotations_errors(field: str, annotations: Any) -> list[str]:
    if annotations is None:
        return []
    if not isinstance(annotations, Mapping):
        return [f"{field}: Invalid value: must be an object"]
    out = []
    size = 0
    for key, value in annotations.items():
        out.extend(_invalid(field, key, qualified_name_errors(str(key).lower())))
        if not isinstance(value, str):
            out.append(f"{field}[{key}]: Invalid value: must be a string")
        size += len(str(key)) + len(str(value))
    if size > ANNOTATIONS_MAX_BYTES:
        out.append(f"{field}: Too long: must have at most {ANNOTATIONS_MAX_BYTES} bytes")
    return out


def object_errors(plural: str, obj: Mapping[str, Any]) -> list[str]:
    """Field errors of an object about to be stored (on create and after every update)."""
    meta = obj.get("metadata") or {}
    out = _invalid("metadata.name", meta.get("name"), name_errors(plural, str(meta.get("name"))))
    out += _labels_errors("metadata.labels", meta.get("labels"))
    out += _annotations_errors("metadata.annotations", meta.get("annotations"))
    spec = obj.get("spec") or {}
    if plural in ("statefulsets", "deployments", "replicasets", "daemonsets", "jobs"):
        template_meta = ((spec.get("template") or {}).get("metadata") or {})
        out += _labels_errors("spec.template.metadata.labels", template_meta.get("labels"))
        out += _annotations_errors("spec.template.metadata.annotations",
                                   template_meta.get("annotations"))
    selector = spec.get("selector") if isinstance(spec, Mapping) else None
    if isinstance(selector, Mapping) and "matchLabels" in selector:
        out += _labels_errors("spec.selector.matchLabels", selector.get("matchLabels"))
    elif isinstance(selector, Mapping) and plural == "services":
        out += _labels_errors("spec.selector", selector)
    if plural == "statefulsets":
        labels = (((spec.get("template") or {}).get("metadata") or {}).get("labels") or {})
        match = (spec.get("selector") or {}).get("matchLabels") or {}
        if any(labels.get(k) != v for k, v in match.items()):
            out.append("spec.template.metadata.labels: Invalid value: `selector` does not "
                       "match template `labels`")
        for i, claim in enumerate(spec.get("volumeClaimTemplates") or []):
            claim_name = str((claim.get("metadata") or {}).get("name"))
            out += _invalid(f"spec.volumeClaimTemplates[{i}].metadata.name", claim_name,
                            dns1123_subdomain_errors(claim_name))
    return out


def update_errors(plural: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Field errors of an update from `old` to `new` (immutable fields), on top of
    `object_errors(new)`."""
    out = []
    old_meta, new_meta = old.get("metadata") or {}, new.get("metadata") or {}
    for key in ("name", "namespace", "uid", "creationTimestamp"):
        if old_meta.get(key) != new_meta.get(key):
            out.append(f"metadata.{key}: Invalid value: {json.dumps(new_meta.get(key))}: "
                       "field is immutable")
    if plural == "statefulsets":
        old_spec = {k: v for k, v in (old.get("spec") or {}).items()
                    if k not in STATEFULSET_MUTABLE}
        new_spec = {k: v for k, v in (new.get("spec") or {}).items()
                    if k not in STATEFULSET_MUTABLE}
        if old_spec != new_spec:
            out.append("spec: Forbidden: updates to statefulset spec for fields other than "
                       "'replicas', 'ordinals', 'template', 'updateStrategy', "
                       "'revisionHistoryLimit', 'persistentVolumeClaimRetentionPolicy' and "
                       "'minReadySeconds' are forbidden")
    if plural == "persistentvolumeclaims":
        old_spec, new_spec = dict(old.get("spec") or {}), dict(new.get("spec") or {})
        old_size = ((old_spec.pop("resources", None) or {}).get("requests") or {}).get("storage")
        new_size = ((new_spec.pop("resources", None) or {}).get("requests") or {}).get("storage")
        if old_spec != new_spec:
            out.append("spec: Forbidden: spec is immutable after creation except "
                       "resources.requests and volumeAttributesClassName for bound claims")
        if old_size and new_size and quantity(new_size) < quantity(old_size):
            out.append("spec.resources.requests.storage: Forbidden: field can not be less "
                       "than status.capacity")
    if plural == "services":
        old_ip = (old.get("spec") or {}).get("clusterIP")
        new_ip = (new.get("spec") or {}).get("clusterIP")
        if old_ip and old_ip != new_ip:
            out.append(f"spec.clusterIP: Invalid value: {json.dumps(new_ip)}: field is "
                       "immutable")
    if plural in ("secrets", "configmaps") and old.get("immutable"):
        for key in ("data", "stringData", "binaryData"):
            if old.get(key) != new.get(key):
                out.append(f"{key}: Forbidden: field is immutable when `immutable` is set")
        if new.get("immutable") is not True:
            out.append("immutable: Forbidden: field is immutable when `immutable` is set")
    return out


_QUANTITY = re.compile(r"^([0-9.]+)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(value: Any) -> float:
    match = _QUANTITY.match(str(value))
    if match is None:
        raise ValueError(f"not a quantity: {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


# -- label selectors (list and watch ?labelSelector=) -------------------------------------------

_REQUIREMENT = re.compile(
    r"^\s*(?P<not>!)?\s*(?P<key>[A-Za-z0-9./_-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9._-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$")


def parse_selector(text: str) -> list[tuple[str, str, frozenset[str]]]:
    """`a=b,c!=d,e in (f,g),h notin (i),j,!k` -> [(key, op, values)]; ValueError if malformed."""
    parts: list[str] = []
    depth, start = 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    out = []
    for part in parts:
        if not part.strip():
            continue
        match = _REQUIREMENT.match(part)
        if match is None:
            raise ValueError(f"unable to parse requirement: {part!r}")
        key = match["key"]
        if match["not"]:
            if match["op"] or match["setop"]:
                raise ValueError(f"unable to parse requirement: {part!r}")
            out.append((key, "!exists", frozenset()))
        elif match["op"]:
            out.append((key, "!=" if match["op"] == "!=" else "=",
                        frozenset({match["value"]})))
        elif match["setop"]:
            values = frozenset(v.strip() for v in match["values"].split(",") if v.strip())
            out.append((key, match["setop"], values))
        else:
            out.append((key, "exists", frozenset()))
    return out


def selector_matches(selector: list[tuple[str, str, frozenset[str]]],
                     obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for key, op, values in selector:
        have = labels.get(key)
        ok = {
            "=": have in values,
            "in": have in values,
            "!=": have not in values,
            "notin": have not in values,
            "exists": key in labels,
            "!exists": key not in labels,
        }[op]
        if not ok:
            return False
    return True
