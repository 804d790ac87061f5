"""A small, strict OpenID Connect issuer on loopback (aiohttp, real TLS from a trustme CA), in
its own thread and event loop.

It serves discovery (``/.well-known/openid-configuration``), a JWKS (an RSA key for RS256 and a
P-256 key for ES256), an authorization endpoint that approves ``issuer.user`` at once and
redirects back with a code, and a token endpoint that checks what a real one checks: the client
secret (HTTP Basic), the grant type, a code used once, the same ``redirect_uri``, and the PKCE
verifier against the S256 challenge. Every request it refuses is recorded in ``issuer.refusals``.

``issuer.forge`` changes the next ID tokens, for negative tests: ``{"nonce": "x"}``,
``{"aud": "other"}``, ``{"exp": -3600}`` (relative to now), ``{"alg": "none"}``,
``{"bad_signature": True}``, ``{"iss": "..."}``; ``issuer.alg`` picks RS256 or ES256;
``issuer.rotate()`` signs with a new key from then on (the old one leaves the JWKS);
``issuer.withdrawn`` leaves key ids out of the JWKS while still signing with them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.helpers.loopthread import serving_in_thread


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _uint(n: int) -> str:
    return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


@dataclass
class Client:
    client_id: str
    secret: str
    redirect_uri: str


@dataclass
class Issuer:
    url: str = ""
    ca_file: Path | None = None
    client: Client = field(default_factory=lambda: Client("mailplane-portal", "s3cret", ""))
    user: dict[str, Any] = field(default_factory=dict)  # the claims of who "logs in"
    alg: str = "RS256"
    forge: dict[str, Any] = field(default_factory=dict)
    refusals: list[str] = field(default_factory=list)
    jwks_fetches: int = 0
    withdrawn: set[str] = field(default_factory=set)  # key ids left out of the JWKS
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    rsa_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048))
    ec_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    rsa_kid: str = "rsa-1"
    ec_kid: str = "ec-1"

    def rotate(self) -> None:
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa_kid = f"rsa-{secrets.token_hex(4)}"
        self.ec_key = ec.generate_private_key(ec.SECP256R1())
        self.ec_kid = f"ec-{secrets.token_hex(4)}"

    def jwks(self) -> dict[str, Any]:
        rn = self.rsa_key.public_key().public_numbers()
        en = self.ec_key.public_key().public_numbers()
        keys = [
            {"kty": "RSA", "kid": self.rsa_kid, "use": "sig", "alg": "RS256",
             "n": _uint(rn.n), "e": _uint(rn.e)},
            {"kty": "EC", "kid": self.ec_kid, "use": "sig", "alg": "ES256", "crv": "P-256",
             "x": b64(en.x.to_bytes(32, "big")), "y": b64(en.y.to_bytes(32, "big"))},
        ]
        return {"keys": [k for k in keys if k["kid"] not in self.withdrawn]}

    def id_token(self, nonce: str) -> str:
        now = int(time.time())
        forge = dict(self.forge)
        alg = forge.pop("alg", self.alg)
        claims: dict[str, Any] = {
            "iss": self.url, "aud": self.client.client_id, "iat": now,
            "exp": now + 300, "nonce": nonce, **self.user}
        if "exp" in forge:
            claims["exp"] = now + int(forge.pop("exp"))
        bad_signature = forge.pop("bad_signature", False)
        claims.update(forge)
        kid = self.ec_kid if alg == "ES256" else self.rsa_kid
        header = {"alg": alg, "typ": "JWT", "kid": kid}
        signing = (b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode()))
        if alg == "none":
            return signing + "."
        if alg == "ES256":
            der = self.ec_key.sign(signing.encode(), ec.ECDSA(hashes.SHA256()))
            r, s = decode_dss_signature(der)
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        else:
            sig = self.rsa_key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        if bad_signature:
            sig = bytes([sig[0] ^ 1]) + sig[1:]
        return signing + "." + b64(sig)

    # ---- HTTP

    def _refuse(self, status: int, error: str, description: str) -> web.Response:
        self.refusals.append(f"{error}: {description}")
        return web.json_response({"error": error, "error_description": description},
                                 status=status)

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response({
            "issuer": self.url, "authorization_endpoint": self.url + "/authorize",
            "token_endpoint": self.url + "/token", "jwks_uri": self.url + "/keys",
            "response_types_supported": ["code"], "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            "scopes_supported": ["openid", "email", "profile", "groups"]})

    async def keys(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        return web.json_response(self.jwks())

    async def authorize(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        c = self.client
        if q.get("client_id") != c.client_id:
            return self._refuse(400, "unauthorized_client", "unknown client_id")
        if q.get("redirect_uri") != c.redirect_uri:
            return self._refuse(400, "invalid_request", "redirect_uri is not registered")
        problems = []
        if q.get("response_type") != "code":
            problems.append("response_type must be code")
        if "openid" not in q.get("scope", "").split():
            problems.append("scope lacks openid")
        if q.get("code_challenge_method") != "S256" or len(q.get("code_challenge", "")) != 43:
            problems.append("PKCE with S256 is required")
        if not q.get("state") or not q.get("nonce"):
            problems.append("state and nonce are required")
        if problems:
            self.refusals.append("; ".join(problems))
            back = {"error": "invalid_request", "error_description": "; ".join(problems),
                    "state": q.get("state", "")}
            raise web.HTTPFound(c.redirect_uri + "?" + urllib.parse.urlencode(back))
        code = secrets.token_urlsafe(24)
        self.codes[code] = {"challenge": q["code_challenge"], "nonce": q["nonce"],
                            "redirect_uri": q["redirect_uri"], "issued": time.time()}
        raise web.HTTPFound(c.redirect_uri + "?" + urllib.parse.urlencode(
            {"code": code, "state": q["state"]}))

    async def token(self, request: web.Request) -> web.Response:
        c = self.client
        auth = request.headers.get("Authorization", "")
        expected = "Basic " + base64.b64encode(
            f"{urllib.parse.quote(c.client_id, safe='')}:"
            f"{urllib.parse.quote(c.secret, safe='')}".encode()).decode()
        if not secrets.compare_digest(auth.encode(), expected.encode()):
            return self._refuse(401, "invalid_client", "client authentication failed")
        form = await request.post()
        if form.get("grant_type") != "authorization_code":
            return self._refuse(400, "unsupported_grant_type", "authorization_code only")
        grant = self.codes.pop(str(form.get("code") or ""), None)  # used once
        if grant is None or time.time() - grant["issued"] > 60:
            return self._refuse(400, "invalid_grant", "unknown, used or expired code")
        if form.get("redirect_uri") != grant["redirect_uri"]:
            return self._refuse(400, "invalid_grant", "redirect_uri differs")
        verifier = str(form.get("code_verifier") or "")
        if b64(hashlib.sha256(verifier.encode()).digest()) != grant["challenge"]:
            return self._refuse(400, "invalid_grant", "PKCE verification failed")
        return web.json_response({"access_token": secrets.token_urlsafe(16),
                                  "token_type": "Bearer", "expires_in": 300,
                                  "id_token": self.id_token(grant["nonce"])},
                                 headers={"Cache-Control": "no-store"})


@contextmanager
def running_issuer(ca: trustme.CA, directory: Path, host: str = "127.0.0.2"
                   ) -> Iterator[Issuer]:
    """The issuer on ``https://HOST:PORT`` (a certificate for HOST from ``ca``)."""
    issuer = Issuer()
    leaf = ca.issue_cert(host)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    directory.mkdir(parents=True, exist_ok=True)
    issuer.ca_file = directory / "issuer-ca.pem"
    ca.cert_pem.write_to_path(str(issuer.ca_file))
    @asynccontextmanager
    async def serve() -> AsyncIterator[None]:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", issuer.discovery)
        app.router.add_get("/keys", issuer.keys)
        app.router.add_get("/authorize", issuer.authorize)
        app.router.add_post("/token", issuer.token)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, 0, ssl_context=ctx)
            await site.start()
            port = runner.addresses[0][1]
            issuer.url = f"https://{host}:{port}"
            yield
        finally:
            await runner.cleanup()

    with serving_in_thread(serve, name="oidc-issuer"):
        yield issuer
