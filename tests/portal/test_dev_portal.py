"""`mailplane dev` starts the portal beside the relay, with a dev login."""

from __future__ import annotations

import re
from pathlib import Path

import requests

from tests.test_dev import DevProcess


def test_dev_prints_the_portal_and_its_login(tmp_path: Path) -> None:
    state = tmp_path / "state"
    dev = DevProcess(state, tmp_path / "dev.log")
    try:
        line = dev.wait_for(r"portal +http://localhost:\d+/", timeout=60)
        url = re.search(r"http://localhost:\d+", line).group(0)  # type: ignore[union-attr]
        token_file = state / "portal-token"
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        token = token_file.read_text().strip()
        s = requests.Session()
        assert s.post(url + "/login", data={"token": "wrong"},
                      headers={"Origin": url}).status_code == 401
        r = s.post(url + "/login", data={"token": token}, headers={"Origin": url},
                   allow_redirects=False)
        assert r.status_code == 303
        sid = r.cookies["mailplane_session"]
        namespaces = requests.get(url + "/api/v1/namespaces",
                                  cookies={"mailplane_session": sid}).json()["namespaces"]
        assert namespaces  # the example manifests' namespaces
        ns = namespaces[0]
        body = requests.get(f"{url}/api/v1/namespaces/{ns}/resources",
                            cookies={"mailplane_session": sid}).json()
        assert body["credentials"] or body["domains"]
        assert requests.get(f"{url}/api/v1/namespaces/{ns}/logs",
                            cookies={"mailplane_session": sid}).status_code == 200
    finally:
        assert dev.stop() == 0
