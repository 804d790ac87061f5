"""Status conditions, following the Kubernetes API conventions as cert-manager does.

A condition is a plain dict as it appears in ``status.conditions``::

    {"type": "Ready", "status": "True", "reason": "Rendered", "message": "...",
     "observedGeneration": 3, "lastTransitionTime": "2026-11-27T14:00:00Z"}

``lastTransitionTime`` changes only when ``status`` flips; reason, message and
observedGeneration are refreshed on every reconcile. Functions never mutate their input.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]

READY = "Ready"


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the reconciled object. Never carries a secret value."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def format_time(now: datetime) -> str:
    """RFC 3339 in UTC with second precision, as the API server writes it."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: object) -> datetime | None:
    """A timestamp written by ``format_time`` (or any ISO 8601 with zone); None if absent/bad."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _status_text(status: bool | str) -> ConditionStatus:
    if isinstance(status, bool):
        return "True" if status else "False"
    if status not in ("True", "False", "Unknown"):
        raise ValueError(f"condition status must be True, False or Unknown, not {status!r}")
    return status  # type: ignore[return-value]


def get_condition(conditions: Iterable[Mapping[str, Any]] | None,
                  type_: str) -> Mapping[str, Any] | None:
    for cond in conditions or ():
        if cond.get("type") == type_:
            return cond
    return None


def set_condition(  # noqa: PLR0917 - the shape the design fixes for both operator halves
    conditions: Sequence[Mapping[str, Any]] | None,
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    observed_generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """A new condition list with ``type_`` set; other conditions keep their order and values.

    ``lastTransitionTime`` is kept from the previous condition of that type unless the status
    changes (or there was none).
    """
    text = _status_text(status)
    previous = get_condition(conditions, type_)
    if previous is not None and previous.get("status") == text and previous.get(
        "lastTransitionTime"
    ):
        transition = str(previous["lastTransitionTime"])
    else:
        transition = format_time(now)
    new = {
        "type": type_,
        "status": text,
        "reason": reason,
        "message": message,
        "observedGeneration": observed_generation,
        "lastTransitionTime": transition,
    }
    out: list[dict[str, Any]] = []
    replaced = False
    for cond in conditions or ():
        if cond.get("type") == type_:
            out.append(new)
            replaced = True
        else:
            out.append(dict(cond))
    if not replaced:
        out.append(new)
    return out


def ready_summary(
    conditions: Sequence[Mapping[str, Any]] | None, required: Sequence[str]
) -> tuple[bool, str, str]:
    """(ready, reason, message) from the ``required`` condition types: ready when all are True;
    otherwise the reason and message of the first one that is not."""
    for type_ in required:
        cond = get_condition(conditions, type_)
        if cond is None:
            return False, f"{type_}Unknown", f"{type_} has not been evaluated yet"
        if cond.get("status") != "True":
            return False, str(cond.get("reason") or f"Not{type_}"), str(cond.get("message") or "")
    return True, "AllChecksPassed", "all of " + ", ".join(required) + " are True"
