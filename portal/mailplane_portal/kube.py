"""The portal's Kubernetes client: who a bearer token belongs to, what they may do, and the
Mailplane resources of a namespace (read with the portal's own identity)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

GROUP = "mailplane.io"
VERSION = "v1alpha1"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TIMEOUT = aiohttp.ClientTimeout(total=10)


class KubeUnavailable(Exception):
    """The API server did not answer, or answered with an error (not a denial)."""


@dataclass(frozen=True)
class Identity:
    """A user as the API server's TokenReview names them; what a SubjectAccessReview needs."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"username": self.username, "uid": self.uid, "groups": list(self.groups),
                "extra": self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Identity:
        return cls(username=str(data["username"]), uid=str(data.get("uid") or ""),
                   groups=tuple(str(g) for g in data.get("groups") or ()),
                   extra={str(k): [str(v) for v in vs]
                          for k, vs in (data.get("extra") or {}).items()})


class KubeClient:
    """HTTP calls to the API server with the portal's own credentials."""

    def __init__(self, server: str, *, token: str | None = None, token_file: str | None = None,
                 ca_file: str | None = None, audiences: tuple[str, ...] = ()) -> None:
        self.server = server.rstrip("/")
        self._token = token
        self._token_file = token_file
        self._ssl: ssl.SSLContext | bool = True
        if self.server.startswith("https://"):
            self._ssl = ssl.create_default_context(cafile=ca_file)
        self.audiences = audiences
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def in_cluster(cls) -> KubeClient:
        import os  # noqa: PLC0415

        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeUnavailable("not in a cluster (KUBERNETES_SERVICE_HOST is not set): give "
                                  "--kube-api URL")
        return cls(f"https://{host}:{port}", token_file=str(SA_DIR / "token"),
                   ca_file=str(SA_DIR / "ca.crt"))

    def _headers(self) -> dict[str, str]:
        token = self._token
        if self._token_file:  # re-read: projected tokens are rotated
            token = Path(self._token_file).read_text(encoding="utf-8").strip()
        headers = {"Accept": "application/json", "User-Agent": "mailplane-portal"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=TIMEOUT)
        try:
            async with self._session.request(method, self.server + path, json=body,
                                             headers=self._headers(), ssl=self._ssl) as resp:
                if resp.status >= 400:
                    text = (await resp.text())[:200]
                    raise KubeUnavailable(f"{method} {path}: HTTP {resp.status} {text}")
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise KubeUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from None

    async def review_token(self, token: str) -> Identity | None:
        """Who the token belongs to (TokenReview); None when the API server rejects it."""
        spec: dict[str, Any] = {"token": token}
        if self.audiences:
            spec["audiences"] = list(self.audiences)
        result = await self._call("POST", "/apis/authentication.k8s.io/v1/tokenreviews", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec})
        status = (result or {}).get("status") or {}
        user = status.get("user") or {}
        if status.get("authenticated") is not True or not user.get("username"):
            return None
        return Identity.from_json(user)

    async def allowed(self, who: Identity, verb: str, resource: str, namespace: str) -> bool:
        """A SubjectAccessReview: may ``who`` do ``verb`` on ``resource`` in ``namespace``?"""
        spec: dict[str, Any] = {
            "user": who.username, "groups": list(who.groups),
            "resourceAttributes": {"namespace": namespace, "verb": verb, "group": GROUP,
                                   "resource": resource},
        }
        if who.uid:
            spec["uid"] = who.uid
        if who.extra:
            spec["extra"] = who.extra
        result = await self._call("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": spec})
        status = (result or {}).get("status") or {}
        return status.get("allowed") is True and status.get("denied") is not True

    async def list(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Mailplane resources (cluster-wide when ``namespace`` is None)."""
        path = f"/apis/{GROUP}/{VERSION}/"
        path += f"namespaces/{namespace}/{plural}" if namespace else plural
        result = await self._call("GET", path)
        return list((result or {}).get("items") or [])
