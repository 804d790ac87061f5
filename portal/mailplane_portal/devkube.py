"""`mailplane dev`'s stand-in for the API server: one dev user with one generated token, who may
read and change every namespace of the example manifests, and the resources' status as
`mailplane dev` wrote it (state-dir/status/NS/KIND-NAME.yaml). For a laptop only."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import yaml

from .kube import Identity

KINDS = {"smtpcredentials": "smtpcredential", "sendingdomains": "sendingdomain"}


class DevKube:
    def __init__(self, state_dir: Path, token: str, specs: dict[tuple[str, str, str], Any]
                 ) -> None:
        self.state_dir = state_dir
        self.token = token
        self.specs = specs  # (plural, namespace, name) -> spec of the example manifest
        self.identity = Identity("dev", "dev", ("system:authenticated",))

    async def review_token(self, token: str) -> Identity | None:
        return self.identity if hmac.compare_digest(token.encode(), self.token.encode()) \
            else None

    async def allowed(self, who: Identity, verb: str, resource: str, namespace: str) -> bool:
        return who == self.identity

    async def list(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        items = []
        for (kind_plural, ns, name), spec in sorted(self.specs.items()):
            if kind_plural != plural or (namespace is not None and ns != namespace):
                continue
            path = self.state_dir / "status" / ns / f"{KINDS[plural]}-{name}.yaml"
            status: dict[str, Any] = {}
            if path.is_file():
                status = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get(
                    "status") or {}
            items.append({"metadata": {"name": name, "namespace": ns}, "spec": spec,
                          "status": status})
        return items

    async def close(self) -> None:
        return None
