"""VERP return paths and the reading of DSNs (RFC 3464) and ARF reports (RFC 5965): pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailplane_relay import verp
from mailplane_relay.intake import reports

REPORTS = Path(__file__).parent / "intake_reports"
KEY = b"k" * 32
QID = "0J8Z3K4M7QX2C9T4PB1R"


def fill(name: str, **values: str) -> bytes:
    text = (REPORTS / name).read_text()
    for k, v in values.items():
        text = text.replace("{" + k + "}", v)
    return text.replace("\n", "\r\n").encode()


def test_a_return_path_names_message_and_recipient_and_survives_lower_and_upper_case() -> None:
    rp = verp.return_path(KEY, "bounces", "bounces.example.com", QID, ["User@Dest.test"])
    local, _, domain = rp.partition("@")
    assert domain == "bounces.example.com" and len(local) <= 64
    assert rp == rp.lower()
    for seen in (rp, rp.upper(), f"<{rp}>"):
        token = verp.parse(seen, "bounces", "bounces.example.com")
        assert token is not None and token.queue_id == QID and token.kind == "r"
        assert verp.verify(KEY, token, "user@dest.test")
        assert verp.verify(KEY, token, "USER@dest.test")


def test_a_tag_does_not_verify_for_another_recipient_key_message_or_forgery() -> None:
    rp = verp.return_path(KEY, "bounces", "b.example", QID, ["a@dest.test"])
    token = verp.parse(rp, "bounces", "b.example")
    assert token is not None
    assert not verp.verify(KEY, token, "b@dest.test")
    assert not verp.verify(b"x" * 32, token, "a@dest.test")
    assert not verp.verify(KEY, token, None)
    other = verp.parse(rp.replace(QID.lower(), "0" * 20), "bounces", "b.example")
    assert other is not None and not verp.verify(KEY, other, "a@dest.test")
    tag = token.tag
    forged = rp.replace(tag, ("0" if tag[0] != "0" else "1") + tag[1:])
    forged_token = verp.parse(forged, "bounces", "b.example")
    assert forged_token is not None and not verp.verify(KEY, forged_token, "a@dest.test")


def test_a_message_token_covers_the_message_only() -> None:
    rp = verp.return_path(KEY, "bounces", "b.example", QID, ["a@dest.test", "b@dest.test"])
    token = verp.parse(rp, "bounces", "b.example")
    assert token is not None and token.kind == "m"
    assert verp.verify(KEY, token, "anyone@dest.test")  # the message log decides who
    assert not verp.verify(b"y" * 32, token, "a@dest.test")


@pytest.mark.parametrize("address", [
    "bounces@b.example", "other+0j8z3k4m7qx2c9t4pb1rr0123456789@b.example",
    "bounces+0j8z3k4m7qx2c9t4pb1rr0123456789@other.example", "bounces+short@b.example",
    "bounces+0j8z3k4m7qx2c9t4pb1rx0123456789@b.example", "",
])
def test_addresses_that_are_not_our_return_paths_are_not_tokens(address: str) -> None:
    assert verp.parse(address, "bounces", "b.example") is None


def test_a_short_or_missing_key_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(verp.VERPKeyError, match="mount the Secret"):
        verp.read_key(str(tmp_path / "absent"))
    (tmp_path / "short").write_bytes(b"abc\n")
    with pytest.raises(verp.VERPKeyError, match="at least 16"):
        verp.read_key(str(tmp_path / "short"))


def test_a_postfix_dsn_gives_the_failed_recipient_status_and_return_path() -> None:
    rp = verp.return_path(KEY, "bounces", "b.example", QID, ["nobody@dest.test"])
    report = reports.parse(fill("postfix-dsn.eml", RETURN_PATH=rp,
                                RECIPIENT="nobody@dest.test", LOCAL="nobody"))
    assert report.kind == "dsn"
    assert [(f.address, f.status) for f in report.failed] == [("nobody@dest.test", "5.1.1")]
    assert report.failed[0].diagnostic == 'unknown user: "nobody"'
    assert report.return_paths == [rp]


def test_a_dsn_of_delays_or_successes_names_no_failure() -> None:
    data = fill("postfix-dsn.eml", RETURN_PATH="x@y.test", RECIPIENT="a@dest.test", LOCAL="a")
    for action, status in ((b"delayed", b"4.4.1"), (b"delivered", b"2.0.0"),
                           (b"failed", b"4.0.0")):
        report = reports.parse(data.replace(b"Action: failed", b"Action: " + action)
                               .replace(b"Status: 5.1.1", b"Status: " + status))
        assert report.kind == "dsn" and report.failed == [] and report.other_actions == 1


def test_an_arf_abuse_report_gives_the_complainant_and_return_paths() -> None:
    rp = verp.return_path(KEY, "bounces", "b.example", QID, ["who@dest.test"])
    report = reports.parse(fill("arf-abuse.eml", TO="fbl@b.example", RETURN_PATH=rp,
                                RECIPIENT="who@dest.test"))
    assert report.kind == "arf" and report.feedback_type == "abuse"
    assert report.complainants == ["who@dest.test"]
    assert report.return_paths == [rp, rp]
    assert report.message_id == "<test-1@example.com>"


@pytest.mark.parametrize("data", [
    b"Subject: plain\r\n\r\nhello\r\n",
    b"Content-Type: multipart/report; report-type=disposition-notification; boundary=x\r\n"
    b"\r\n--x\r\nContent-Type: text/plain\r\n\r\nread\r\n--x--\r\n",
    b"Content-Type: multipart/report; boundary=x\r\n\r\ngarbage",
    b"\xff\xfe\x00garbage",
])
def test_other_mail_is_other(data: bytes) -> None:
    assert reports.parse(data).kind in ("other", "dsn", "arf")
    assert reports.parse(data).failed == [] and reports.parse(data).complainants == []
