"""The operator's credentials: kopf's login functions, one `kopf.ConnectionInfo` for kopf and
for `KubeClient`, and a rotated token picked up when the API server refuses the old one.

The API server here is a small real HTTP server that checks the bearer token (the emulator
checks none): it accepts one token at a time, as a cluster does once an old token expired."""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys
from collections.abc import AsyncIterator

import kopf
import pytest
import yaml
from aiohttp import web

from mailplane_operator import kube as k


def _kubeconfig(path: pathlib.Path, server: str, token: str) -> pathlib.Path:
    """A kubeconfig whose current context logs in with `token`; the context "other" with
    "other-token"."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server}}],
        "users": [{"name": "op", "user": {"token": token}},
                  {"name": "other", "user": {"token": "other-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "op"}},
                     {"name": "other", "context": {"cluster": "test", "user": "other"}}],
    }))
    return path


class TokenApi:
    def __init__(self) -> None:
        self.accepted = "one"
        self.seen: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != f"Bearer {self.accepted}":
            return web.json_response({"kind": "Status", "reason": "Unauthorized",
                                      "message": "Unauthorized", "code": 401}, status=401)
        return web.json_response({"apiVersion": "v1", "kind": "Secret",
                                  "metadata": {"name": "s", "namespace": "ns"}})


@pytest.fixture
async def token_api() -> AsyncIterator[tuple[TokenApi, str]]:
    api = TokenApi()
    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ns/secrets/s", api.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield api, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_a_rotated_token_is_used_once_the_old_one_is_refused(
        token_api: tuple[TokenApi, str], tmp_path: pathlib.Path) -> None:
    api, url = token_api
    config = _kubeconfig(tmp_path / "kubeconfig", url, "one")
    credentials = await asyncio.to_thread(k.load_credentials, str(config))
    async with k.KubeClient(credentials) as client:
        assert await client.get(k.SECRETS, "ns", "s") is not None
        # The token is rotated: the file has the new one, the old one is refused from now on.
        _kubeconfig(config, url, "two")
        api.accepted = "two"
        assert await client.get(k.SECRETS, "ns", "s") is not None
    assert api.seen == ["Bearer one", "Bearer one", "Bearer two"]
    # kopf's login handler returns the same credentials (handlers/__init__.py).
    assert credentials.info().token == "two"
    assert credentials.info().as_http_headers() == {"Authorization": "Bearer two"}


async def test_credentials_still_refused_after_logging_in_again_are_an_error(
        token_api: tuple[TokenApi, str], tmp_path: pathlib.Path) -> None:
    api, url = token_api
    config = _kubeconfig(tmp_path / "kubeconfig", url, "one")
    credentials = await asyncio.to_thread(k.load_credentials, str(config))
    api.accepted = "never"
    async with k.KubeClient(credentials) as client:
        with pytest.raises(k.ApiError) as err:
            await client.get(k.SECRETS, "ns", "s")
    assert err.value.status == 401
    assert api.seen == ["Bearer one", "Bearer one"]  # one login again, one retry


async def test_a_named_context_is_used(token_api: tuple[TokenApi, str],
                                       tmp_path: pathlib.Path) -> None:
    api, url = token_api
    config = _kubeconfig(tmp_path / "kubeconfig", url, "one")
    credentials = await asyncio.to_thread(k.load_credentials, str(config), "other")
    api.accepted = "other-token"
    async with k.KubeClient(credentials) as client:
        assert await client.get(k.SECRETS, "ns", "s") is not None


def test_without_a_named_file_kopfs_own_login_finds_the_kubeconfig(
        tmp_path: pathlib.Path) -> None:
    # $KUBECONFIG is read when the kubernetes library is imported: another process.
    config = _kubeconfig(tmp_path / "kubeconfig", "https://api.example.test:6443", "one")
    code = ("import json; from mailplane_operator.kube import load_credentials; "
            "c = load_credentials(); i = c.info(); "
            "print(json.dumps([c.server, i.token, i.as_http_headers()]))")
    out = subprocess.run([sys.executable, "-c", code], env={"KUBECONFIG": str(config),
                                                            "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [
        "https://api.example.test:6443", "one", {"Authorization": "Bearer one"}]


def test_a_fixed_connection_info_never_changes() -> None:
    info = kopf.ConnectionInfo(server="http://127.0.0.1:1")
    credentials = k.Credentials(info)
    assert credentials.info() is info and credentials.login() is info
