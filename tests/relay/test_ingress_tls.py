"""ReloadingTLS: a renewed certificate reaches new handshakes on both listeners without a restart;
a broken pair is refused and the one in force stays; the minimum version holds."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import pytest
import trustme

from tests.helpers.pki import peer_serial, write_server_pair
from tests.relay import test_ingress_support as support
from tests.relay.test_ingress_support import RawSMTP, Relay, ready_session

relay = support.relay


async def _serial_implicit(relay: Relay) -> int:
    c = await RawSMTP.connect(relay.implicit_port, relay.client_tls())
    try:
        ssl_object = c.writer.get_extra_info("ssl_object")
        return peer_serial(ssl_object)
    finally:
        await c.close()


async def _serial_starttls(relay: Relay) -> int:
    c = await RawSMTP.connect(relay.starttls_port)
    try:
        await c.reply()
        await c.cmd("EHLO client.test")
        await c.starttls(relay.client_tls())
        return peer_serial(c.writer.get_extra_info("ssl_object"))
    finally:
        await c.close()


async def _until(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_renewed_certificate_is_served_to_new_handshakes(relay: Relay) -> None:
    old = relay.pair.serial
    assert await _serial_implicit(relay) == old
    assert await _serial_starttls(relay) == old
    open_session = await ready_session(relay)  # survives the renewal
    try:
        new_pair = write_server_pair(relay.ca, relay.pair.cert_file.parent)  # same paths
        assert new_pair.serial != old
        # The background check (reloadInterval 50 ms in the test config) picks it up.
        await _until(lambda: relay.tls.reloads == 1)
        assert await _serial_implicit(relay) == new_pair.serial
        assert await _serial_starttls(relay) == new_pair.serial
        assert (await open_session.cmd("NOOP"))[0] == 250
    finally:
        await open_session.close()


async def test_broken_pair_is_refused_and_the_old_one_stays(
    relay: Relay, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = relay.pair.serial
    other = write_server_pair(relay.ca, tmp_path / "other")
    # A renewal caught half-written: a new certificate next to the old key.
    relay.pair.cert_file.write_bytes(other.cert_file.read_bytes())
    assert relay.tls.check() is False
    assert "not loaded" in caplog.text
    key_text = relay.pair.key_file.read_text()
    assert key_text.splitlines()[1] not in caplog.text
    assert await _serial_implicit(relay) == old
    # The key arrives: now the pair is whole and loads.
    relay.pair.key_file.write_bytes(other.key_file.read_bytes())
    assert relay.tls.check() is True
    assert await _serial_implicit(relay) == other.serial


async def test_garbage_files_keep_the_old_certificate(relay: Relay) -> None:
    old = relay.pair.serial
    relay.pair.cert_file.write_text("not a certificate")
    relay.pair.key_file.write_text("not a key")
    assert relay.tls.check() is False
    assert await _serial_implicit(relay) == old
    relay.pair.cert_file.unlink()
    assert relay.tls.check() is False
    assert await _serial_implicit(relay) == old


async def test_minimum_version_1_3_refuses_tls_1_2_clients(relay: Relay) -> None:
    tls12 = relay.client_tls()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    c = await RawSMTP.connect(relay.implicit_port, tls12)  # accepted under the default "1.2"
    assert c.writer.get_extra_info("ssl_object").version() == "TLSv1.2"
    await c.close()
    relay.reconfigure(lambda d: d["tls"].update(minVersion="1.3"))
    assert relay.tls.check() is True  # a settings change counts as a change
    ctx = relay.client_tls()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await RawSMTP.connect(relay.implicit_port, ctx)
    assert await _serial_implicit(relay) == relay.pair.serial


async def test_start_fails_clearly_without_a_usable_pair(tmp_path: Path,
                                                         tls_ca: trustme.CA) -> None:
    from mailplane_relay.tlsctx import ReloadingTLS, TLSError

    pair = write_server_pair(tls_ca, tmp_path / "tls")
    pair.key_file.write_text("broken")
    doc = support.settings_doc(pair, tmp_path / "spool")
    tls = ReloadingTLS(support.ConfigBox(support.build_config(doc)))
    with pytest.raises(TLSError, match=r"tls\.certFile"):
        await tls.start()
