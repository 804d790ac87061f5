"""A webhook URL may carry a token (in its query, or as user:password@): no error, log line
or status message shows more of it than scheme://host/path (docs/webhooks.md)."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest
import yarl
from multidict import CIMultiDict, CIMultiDictProxy

from mailplane_relay.config import ConfigError, parse_documents, redact_url
from mailplane_relay.webhooks import _describe

TOKEN = "s3cr3t-t0ken-0f-the-receiver"


def config(url: str) -> str:
    return f"""
apiVersion: mailplane.io/v1alpha1
kind: RelayConfig
spec:
  tls: {{certFile: unused.crt, keyFile: unused.key}}
  credentials:
    - username: alice
      passwordHash: "sha256$00$00"
      allowedSenders: [alice.example]
      owner: team-a/alice
      webhook: {{url: "{url}", secrets: ["0123456789abcdef0123456789abcdef"]}}
"""


@pytest.mark.parametrize(("url", "problem"), [
    (f"http://hooks.example.net/in?token={TOKEN}", "plain http is allowed only to a loopback"),
    (f"https://user:{TOKEN}@hooks.example.net/in", "holds credentials"),
    (f"https://hooks.example.net/in?a=1#{TOKEN}", "remove the #fragment"),
    (f"ftp://hooks.example.net/in?token={TOKEN}", "must be https://HOST/PATH"),
    (f"https://hooks.example.net:99999/in?token={TOKEN}", "is not a URL"),
])
def test_a_refused_webhook_url_is_named_without_its_token(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_documents([("relay.yaml", config(url))])
    message = str(info.value)
    assert problem in message
    assert TOKEN not in message
    assert "credentials.0.webhook.url" in message


def test_redact_url_keeps_scheme_host_port_and_path_only() -> None:
    assert redact_url(f"https://u:{TOKEN}@Hooks.example.net:8443/a/b?t={TOKEN}#f") == \
        "https://hooks.example.net:8443/a/b"
    assert redact_url(f"https://[2001:db8::1]/in?t={TOKEN}") == "https://[2001:db8::1]/in"
    assert redact_url("not a url") == "(not a URL)"
    assert redact_url("https://h:99999/x") == "(not a URL)"


def _response_error(url: str) -> aiohttp.ClientResponseError:
    info = aiohttp.RequestInfo(yarl.URL(url), "POST", CIMultiDictProxy(CIMultiDict()),
                               yarl.URL(url))
    return aiohttp.ClientResponseError(info, (), status=500, message="Internal Server Error")


@pytest.mark.parametrize("url", [
    f"https://hooks.example.net/in?token={TOKEN}",
    f"https://hook:{TOKEN}@hooks.example.net/in",
    f"https://hooks.example.net/in?a=1&token={TOKEN}#frag",
])
@pytest.mark.parametrize("make", [aiohttp.InvalidURL, _response_error])
def test_a_failed_post_is_described_without_the_urls_token(url: str, make: Any) -> None:
    text = _describe(make(url), url)
    assert TOKEN not in text
    assert "hooks.example.net/in" in text


def test_the_configuration_repr_does_not_show_the_url(caplog: pytest.LogCaptureFixture) -> None:
    cfg = parse_documents([("relay.yaml", config(
        f"https://hooks.example.net/in?token={TOKEN}"))])
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("t").debug("%r", cfg.settings.credentials[0])
    assert TOKEN not in caplog.text
