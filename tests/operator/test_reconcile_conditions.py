"""Conditions: lastTransitionTime changes only on a flip; observedGeneration follows the spec."""

from __future__ import annotations

from datetime import timedelta

import pytest

from mailplane_operator.reconcile.conditions import (
    format_time,
    get_condition,
    parse_time,
    ready_summary,
    set_condition,
)
from tests.operator.reconcile_builders import NOW


def test_a_new_condition_gets_every_field() -> None:
    conds = set_condition(None, "Ready", True, "Rendered", "ok", 3, NOW)
    assert conds == [{"type": "Ready", "status": "True", "reason": "Rendered", "message": "ok",
                      "observedGeneration": 3, "lastTransitionTime": "2026-11-27T12:00:00Z"}]


def test_transition_time_is_kept_while_the_status_holds_and_moves_on_a_flip() -> None:
    first = set_condition(None, "Ready", False, "Pending", "waiting", 1, NOW)
    later = NOW + timedelta(minutes=5)
    same = set_condition(first, "Ready", False, "StillPending", "still waiting", 2, later)
    assert same[0]["lastTransitionTime"] == format_time(NOW)
    assert same[0]["reason"] == "StillPending" and same[0]["observedGeneration"] == 2
    flipped = set_condition(same, "Ready", True, "Done", "ok", 2, later)
    assert flipped[0]["lastTransitionTime"] == format_time(later)
    assert first[0]["status"] == "False"  # the input was not mutated


def test_other_conditions_keep_their_order_and_values() -> None:
    conds = set_condition(None, "DKIMVerified", True, "Verified", "", 1, NOW)
    conds = set_condition(conds, "Ready", False, "SPFNotVerified", "", 1, NOW)
    conds = set_condition(conds, "DKIMVerified", False, "RecordNotFound", "", 1, NOW)
    assert [c["type"] for c in conds] == ["DKIMVerified", "Ready"]
    assert get_condition(conds, "Ready") == conds[1]


def test_ready_summary_names_the_first_failing_condition() -> None:
    conds = set_condition(None, "DKIMVerified", True, "Verified", "", 1, NOW)
    conds = set_condition(conds, "SPFVerified", False, "RecordNotFound", "no SPF", 1, NOW)
    assert ready_summary(conds, ["DKIMVerified", "SPFVerified"]) == (
        False, "RecordNotFound", "no SPF")
    assert ready_summary(conds, ["DKIMVerified"])[0] is True
    assert ready_summary(conds, ["Missing"])[1] == "MissingUnknown"


def test_status_must_be_a_kubernetes_condition_status() -> None:
    with pytest.raises(ValueError, match="True, False or Unknown"):
        set_condition(None, "Ready", "yes", "R", "", 1, NOW)
    assert set_condition(None, "Ready", "Unknown", "R", "", 1, NOW)[0]["status"] == "Unknown"


def test_times_round_trip() -> None:
    assert parse_time(format_time(NOW)) == NOW
    assert parse_time("not a time") is None
    assert parse_time(None) is None
