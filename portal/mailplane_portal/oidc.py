"""OpenID Connect login: the authorization code flow with PKCE (RFC 6749, RFC 7636, OpenID
Connect Core 1.0), against the issuer the cluster trusts.

The portal sends the browser to the issuer with a fresh ``state``, ``nonce`` and PKCE challenge
(S256), exchanges the code it gets back (with the client secret and the PKCE verifier) for an ID
token, and verifies that token itself: its signature (RS256 or ES256) with a key of the issuer's
JWKS (fetched and cached for ten minutes; fetched again when a token names an unknown key id, so a
key the issuer withdraws is trusted ten minutes at most), ``iss``, ``aud``
(and ``azp``), ``exp`` and ``iat`` with a small clock skew, and ``nonce``. The user and groups
come from the claims the way the API server's ``--oidc-username-claim``, ``--oidc-username-prefix``,
``--oidc-groups-claim`` and ``--oidc-groups-prefix`` make them, so a SubjectAccessReview for
them answers as it would for the same person's ``kubectl``. No token is kept.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from .kube import Identity

SKEW = 30.0  # seconds of clock difference allowed on exp and iat
TIMEOUT = aiohttp.ClientTimeout(total=10)
ALGORITHMS = ("RS256", "ES256")
RESERVED = "system:"  # the prefix of Kubernetes' own user and group names
LOGIN_TTL = 600.0  # seconds a started login may take at the issuer
KEYS_TTL = 600.0  # seconds the issuer's key set is trusted before it is fetched again


class OidcError(Exception):
    """The login cannot go on; the message says why (shown to the user, no secret in it)."""


class OidcUnavailable(OidcError):
    """The issuer did not answer (or answered nonsense): try again later."""


def _b64url_decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise OidcError("the ID token is not a JWS (bad base64url)") from exc


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int(text: Any) -> int:
    if not isinstance(text, str):
        raise OidcError("the issuer's key set holds a malformed key")
    return int.from_bytes(_b64url_decode(text), "big")


@dataclass(frozen=True)
class OidcSettings:
    issuer: str
    client_id: str
    client_secret: str
    redirect_url: str
    username_claim: str = "sub"
    username_prefix: str | None = None  # None: the API server's default; "-": none
    groups_claim: str | None = None
    groups_prefix: str = ""
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    ca_file: str | None = None

    def __post_init__(self) -> None:
        for name, url in (("--oidc-issuer", self.issuer), ("--oidc-redirect-url",
                                                           self.redirect_url)):
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme not in ("https", "http") or not parsed.netloc:
                raise ValueError(f"{name} {url!r}: give an absolute https:// URL")
        if urllib.parse.urlsplit(self.issuer).scheme != "https":
            raise ValueError(f"--oidc-issuer {self.issuer!r}: an OpenID issuer is an https:// "
                             "URL (OpenID Connect Discovery 1.0, section 2)")
        if not self.client_id:
            raise ValueError("--oidc-client-id: give the client id registered at the issuer")
        if not self.client_secret:
            raise ValueError("--oidc-client-secret-file: the file is empty; put the client "
                             "secret registered at the issuer in it")
        if "openid" not in self.scopes:
            raise ValueError("--oidc-scopes: must include 'openid'")

    @classmethod
    def from_args(cls, *, issuer: str, client_id: str, client_secret_file: str,
                  redirect_url: str, username_claim: str = "sub",
                  username_prefix: str | None = None, groups_claim: str | None = None,
                  groups_prefix: str = "", scopes: str = "openid email profile",
                  ca_file: str | None = None) -> OidcSettings:
        try:
            secret = Path(client_secret_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"--oidc-client-secret-file {client_secret_file}: cannot read it "
                             f"({exc.strerror}); mount the client secret there") from None
        return cls(issuer=issuer, client_id=client_id, client_secret=secret,
                   redirect_url=redirect_url, username_claim=username_claim,
                   username_prefix=username_prefix, groups_claim=groups_claim or None,
                   groups_prefix=groups_prefix, scopes=tuple(scopes.split()), ca_file=ca_file)

    def user_prefix(self) -> str:
        """The API server's rule: claims other than ``email`` get ``ISSUER#`` unless a prefix
        is given; ``-`` means none."""
        if self.username_prefix == "-":
            return ""
        if self.username_prefix is not None:
            return self.username_prefix
        return "" if self.username_claim == "email" else self.issuer + "#"


@dataclass(frozen=True)
class LoginStart:
    """What a started login keeps (server-side, never in the browser): checked at the callback."""

    state: str
    nonce: str
    verifier: str
    started: float

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "nonce": self.nonce, "verifier": self.verifier,
                "started": self.started}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoginStart:
        return cls(str(data["state"]), str(data["nonce"]), str(data["verifier"]),
                   float(data["started"]))


def public_key(jwk: dict[str, Any], alg: str) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    kty = jwk.get("kty")
    if jwk.get("alg") not in (None, alg):
        raise OidcError(f"the ID token's key is for {jwk.get('alg')}, not {alg}")
    if jwk.get("use") not in (None, "sig"):
        raise OidcError("the ID token's key is not a signing key")
    if alg == "RS256" and kty == "RSA":
        return rsa.RSAPublicNumbers(_int(jwk.get("e")), _int(jwk.get("n"))).public_key()
    if alg == "ES256" and kty == "EC" and jwk.get("crv") == "P-256":
        return ec.EllipticCurvePublicNumbers(_int(jwk.get("x")), _int(jwk.get("y")),
                                             ec.SECP256R1()).public_key()
    raise OidcError(f"the ID token's key (kty {kty}) does not fit its algorithm {alg}")


def verify_signature(jwk: dict[str, Any], alg: str, signed: bytes, signature: bytes) -> None:
    key = public_key(jwk, alg)
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        else:
            if len(signature) != 64:
                raise OidcError("the ID token's signature is not valid")
            r = int.from_bytes(signature[:32], "big")
            s = int.from_bytes(signature[32:], "big")
            key.verify(encode_dss_signature(r, s), signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise OidcError("the ID token's signature is not valid") from None


class OidcClient:
    """One issuer: discovery and keys cached; a login started and finished."""

    def __init__(self, settings: OidcSettings, *, clock: Any = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self._ssl: ssl.SSLContext = ssl.create_default_context(cafile=settings.ca_file)
        self._session: aiohttp.ClientSession | None = None
        self._discovery: dict[str, Any] | None = None
        self._keys: list[dict[str, Any]] = []
        self._keys_fetched = float("-inf")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get_json(self, url: str, what: str, *, data: dict[str, str] | None = None,
                        auth: str | None = None) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=TIMEOUT)
        try:
            headers = {"Accept": "application/json"}
            if auth is not None:
                headers["Authorization"] = auth
            if data is None:
                call = self._session.get(url, ssl=self._ssl, allow_redirects=False,
                                         headers=headers)
            else:
                call = self._session.post(url, data=data, ssl=self._ssl,
                                          allow_redirects=False, headers=headers)
            async with call as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OidcUnavailable(f"the identity provider did not answer ({what}: "
                                  f"{type(exc).__name__})") from None
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise OidcUnavailable(f"the identity provider's {what} answered HTTP {status} "
                                  "without a JSON object")
        if status >= 400:
            error = str(body.get("error") or "")[:80]
            detail = str(body.get("error_description") or "")[:200]
            raise OidcError(f"the identity provider refused the {what}: "
                            f"{error or status}{': ' + detail if detail else ''}")
        return body

    async def discovery(self) -> dict[str, Any]:
        if self._discovery is None:
            url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
            doc = await self._get_json(url, "discovery document")
            if doc.get("issuer") != self.settings.issuer:
                raise OidcUnavailable(
                    f"the discovery document names issuer {str(doc.get('issuer'))[:100]!r}, "
                    f"not {self.settings.issuer!r}: set --oidc-issuer to the issuer exactly")
            for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                value = doc.get(key)
                if not isinstance(value, str) or not value.startswith("https://"):
                    raise OidcUnavailable(f"the discovery document has no https {key}")
            methods = doc.get("code_challenge_methods_supported")
            if isinstance(methods, list) and "S256" not in methods:
                raise OidcUnavailable("the issuer does not support PKCE with S256")
            self._discovery = doc
        return self._discovery

    async def _fetch_keys(self) -> None:
        doc = await self.discovery()
        jwks = await self._get_json(doc["jwks_uri"], "key set")
        keys = jwks.get("keys")
        if not isinstance(keys, list):
            raise OidcUnavailable("the issuer's key set has no keys")
        self._keys = [k for k in keys if isinstance(k, dict)]
        self._keys_fetched = self.clock()

    async def _key(self, kid: str | None, alg: str) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            fitting = [k for k in self._keys
                       if (kid is None or k.get("kid") == kid)
                       and k.get("kty") == ("RSA" if alg == "RS256" else "EC")]
            if kid is None and len(fitting) != 1:
                return None  # without a kid only an unambiguous key will do
            return fitting[0] if fitting else None

        if self.clock() - self._keys_fetched > KEYS_TTL:
            await self._fetch_keys()  # a key the issuer withdrew is not trusted for long
        key = find()
        if key is None:  # a key rotated in since the last fetch
            await self._fetch_keys()
            key = find()
        if key is None:
            raise OidcError("the ID token is signed with a key the issuer does not publish")
        return key

    async def begin(self) -> tuple[str, LoginStart]:
        """The issuer's URL to send the browser to, and what to keep until it comes back."""
        doc = await self.discovery()
        start = LoginStart(secrets.token_urlsafe(32), secrets.token_urlsafe(32),
                           secrets.token_urlsafe(48), self.clock())
        challenge = _b64url(hashlib.sha256(start.verifier.encode()).digest())
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": self.settings.client_id,
            "redirect_uri": self.settings.redirect_url, "scope": " ".join(self.settings.scopes),
            "state": start.state, "nonce": start.nonce, "code_challenge": challenge,
            "code_challenge_method": "S256"})
        endpoint = doc["authorization_endpoint"]
        return endpoint + ("&" if "?" in endpoint else "?") + query, start

    async def finish(self, start: LoginStart, code: str) -> Identity:
        """Exchange the code, verify the ID token, and name the user as the API server would."""
        if self.clock() - start.started > LOGIN_TTL:
            raise OidcError("the login took too long: start again")
        doc = await self.discovery()
        data = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": self.settings.redirect_url, "code_verifier": start.verifier}
        methods = doc.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        auth = None
        if "client_secret_basic" in methods:
            # RFC 6749 section 2.3.1: each part form-urlencoded before Basic encoding.
            pair = (f"{urllib.parse.quote(self.settings.client_id, safe='')}:"
                    f"{urllib.parse.quote(self.settings.client_secret, safe='')}")
            auth = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            data.update(client_id=self.settings.client_id,
                        client_secret=self.settings.client_secret)
        tokens = await self._get_json(doc["token_endpoint"], "token request", data=data,
                                      auth=auth)
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise OidcError("the identity provider answered without an ID token")
        claims = await self.verify(id_token, start.nonce)
        return self.identity(claims)

    async def verify(self, token: str, nonce: str) -> dict[str, Any]:
        parts = token.split(".")
        if len(parts) != 3:
            raise OidcError("the ID token is not a signed JWT")
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
        except ValueError:
            raise OidcError("the ID token is not a signed JWT (bad JSON)") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise OidcError("the ID token is not a signed JWT")
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise OidcError(f"the ID token is signed with {str(alg)[:20]!r}; the portal "
                            f"accepts {' or '.join(ALGORITHMS)}")
        if header.get("crit"):
            raise OidcError("the ID token has critical header parameters the portal does not "
                            "understand")
        kid = header.get("kid")
        key = await self._key(kid if isinstance(kid, str) else None, alg)
        verify_signature(key, alg, f"{parts[0]}.{parts[1]}".encode(),
                         _b64url_decode(parts[2]))
        self._check_claims(claims, nonce)
        return claims

    def _check_claims(self, claims: dict[str, Any], nonce: str) -> None:
        s = self.settings
        if claims.get("iss") != s.issuer:
            raise OidcError(f"the ID token was issued by {str(claims.get('iss'))[:100]!r}, "
                            f"not {s.issuer!r}")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if s.client_id not in audiences:
            raise OidcError("the ID token is not meant for this portal (its audience is not "
                            f"the client id {s.client_id!r})")
        if len(audiences) > 1 and claims.get("azp") != s.client_id:
            raise OidcError("the ID token has several audiences and this portal is not its "
                            "authorized party (azp)")
        now = self.clock()
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, int | float) or not isinstance(iat, int | float):
            raise OidcError("the ID token lacks exp or iat")
        if exp < now - SKEW:
            raise OidcError("the ID token has expired (check the clocks of the portal and "
                            "the identity provider)")
        if iat > now + SKEW:
            raise OidcError("the ID token was issued in the future (check the clocks of the "
                            "portal and the identity provider)")
        if not isinstance(claims.get("nonce"), str) or not secrets.compare_digest(
                claims["nonce"].encode(), nonce.encode()):
            raise OidcError("the ID token's nonce does not match this login (a replayed or "
                            "foreign token): start again")

    def identity(self, claims: dict[str, Any]) -> Identity:
        s = self.settings
        value = claims.get(s.username_claim)
        if not isinstance(value, str) or not value:
            raise OidcError(f"the ID token has no {s.username_claim!r} claim to name you by "
                            "(--oidc-username-claim)")
        if s.username_claim == "email" and claims.get("email_verified", True) is not True:
            raise OidcError("your email address is not verified at the identity provider")
        groups: tuple[str, ...] = ()
        if s.groups_claim:
            raw = claims.get(s.groups_claim)
            if isinstance(raw, str):
                raw = [raw]
            if raw is not None and not (isinstance(raw, list)
                                        and all(isinstance(g, str) for g in raw)):
                raise OidcError(f"the ID token's {s.groups_claim!r} claim is not a list of "
                                "names")
            groups = tuple(s.groups_prefix + g for g in raw or ())
        username = s.user_prefix() + value
        # ``system:`` names Kubernetes' own users and groups (service accounts, nodes,
        # ``system:masters``): a name an identity provider gives must not become one of them.
        if username.startswith(RESERVED):
            raise OidcError(f"the ID token names you {username[:80]!r}, a name Kubernetes "
                            f"reserves for itself ({RESERVED}...): set --oidc-username-prefix")
        reserved = [g for g in groups if g.startswith(RESERVED)]
        if reserved:
            raise OidcError(f"the ID token puts you in the group {reserved[0][:80]!r}, a name "
                            f"Kubernetes reserves for itself ({RESERVED}...): set "
                            "--oidc-groups-prefix")
        return Identity(username=username, groups=groups)
