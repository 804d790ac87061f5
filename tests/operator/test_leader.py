"""Two operator replicas, one Lease: only the leader works; a clean stop hands over at once, a
killed leader is replaced once its Lease expires."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import yaml

from mailplane_operator import kube as k
from mailplane_operator.app import standby_health
from mailplane_operator.leader import LeaseSettings
from tests.helpers.kube import KubeApi, RunningOperator, namespace_body, relay_body

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _holder(api: KubeApi) -> str | None:
    lease = api.get(k.LEASES, "mailplane-system", "mailplane-operator")
    return ((lease or {}).get("spec") or {}).get("holderIdentity")


def _renew_time(api: KubeApi) -> str | None:
    lease = api.get(k.LEASES, "mailplane-system", "mailplane-operator")
    return ((lease or {}).get("spec") or {}).get("renewTime")


# A Lease far longer than any wait of the test: a leader on a loaded machine never loses it by
# renewing late, and a standby that takes over within HANDOVER can only have found it released.
LEASE_DURATION = 60.0
HANDOVER = 30.0


def _lease(identity: str) -> LeaseSettings:
    return LeaseSettings(namespace="mailplane-system", identity=identity,
                         lease_duration=LEASE_DURATION, renew_deadline=45.0, retry_period=0.2)


def _leading(op: RunningOperator) -> bool:
    return "mailplane_operator_leader 1.0" in op.metrics_text()


def test_only_the_leader_works_and_a_clean_stop_hands_over_at_once(
        kube_api: KubeApi, operator_factory: Callable[..., RunningOperator]) -> None:
    kube_api.create(k.NAMESPACES, namespace_body("mailplane-system"))
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    first = operator_factory(leader_election=_lease("replica-a"))
    assert _holder(kube_api) == "replica-a"
    second = operator_factory(leader_election=_lease("replica-b"), wait_ready=False)
    kube_api.wait_until(lambda: "Waiting for the Lease" in second.logs.text, poll=0.1,
                        what="the second replica to wait")

    kube_api.create(k.SMTP_RELAYS, relay_body())
    kube_api.wait_for(k.STATEFULSETS, "mail", "main")
    assert _leading(first) and not _leading(second)
    assert not second.runtime  # the standby never built a runtime, let alone wrote anything
    def renewed_since(seen: str | None) -> Callable[[], bool]:
        return lambda: _renew_time(kube_api) != seen

    for _ in range(2):  # renewals: the leader keeps the Lease, the standby keeps waiting
        kube_api.wait_until(renewed_since(_renew_time(kube_api)), poll=0.05,
                            what="the leader renewing the Lease")
    assert _holder(kube_api) == "replica-a" and not second.runtime

    first.stop()  # releases the Lease
    # Well before the Lease would have expired: the stop released it.
    assert second.ready_flag.wait(HANDOVER)
    assert _holder(kube_api) == "replica-b"
    kube_api.create(k.SMTP_RELAYS, relay_body("second"))
    kube_api.wait_for(k.STATEFULSETS, "mail", "second")
    lease = kube_api.get(k.LEASES, "mailplane-system", "mailplane-operator")
    assert lease is not None and lease["spec"]["leaseTransitions"] == 1


def _kubeconfig(path: pathlib.Path, server: str) -> pathlib.Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "operator", "user": {"token": "not-checked-by-the-emulator"}}],
        "contexts": [{"name": "emulator",
                      "context": {"cluster": "emulator", "user": "operator"}}],
    }))
    return path


def _replica(kubeconfig: pathlib.Path, name: str, log: pathlib.Path) -> subprocess.Popen[Any]:
    env = {k_: v for k_, v in os.environ.items() if not k_.startswith("KUBERNETES_")}
    env["POD_NAME"] = name
    return subprocess.Popen(
        [sys.executable, "-m", "mailplane_cli.main", "operator", "--kubeconfig", str(kubeconfig),
         "--metrics-port", "0", "--leader-election",
         "--leader-election-namespace", "mailplane-system", "--lease-duration", "3",
         "--renew-deadline", "2", "--retry-period", "0.5"],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_a_killed_leader_is_replaced_when_its_lease_expires(
        kube_api: KubeApi, tmp_path: pathlib.Path) -> None:
    kube_api.create(k.NAMESPACES, namespace_body("mailplane-system"))
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", kube_api.url)
    first = _replica(kubeconfig, "replica-a", tmp_path / "a.log")
    second = None
    try:
        kube_api.wait_until(lambda: _holder(kube_api) == "replica-a", timeout=30, poll=0.2,
                            what="the first replica to lead")
        second = _replica(kubeconfig, "replica-b", tmp_path / "b.log")
        kube_api.create(k.SMTP_RELAYS, relay_body())
        kube_api.wait_for(k.STATEFULSETS, "mail", "main", timeout=30)
        kube_api.wait_until(lambda: "Waiting for the Lease" in (tmp_path / "b.log").read_text(),
                            timeout=30, poll=0.2, what="the second replica to wait")

        first.send_signal(signal.SIGKILL)  # no release: the Lease must expire
        killed = time.monotonic()
        first.wait(10)
        kube_api.wait_until(lambda: _holder(kube_api) == "replica-b", timeout=30, poll=0.1,
                            what="the second replica to take over")
        took = time.monotonic() - killed
        # Not before the Lease expired (3 s after the last renewal the second replica saw, at
        # most one retry period before the kill), and not long after.
        assert 2.5 <= took < 10.0, took

        kube_api.create(k.SMTP_RELAYS, relay_body("second"))
        kube_api.wait_for(k.STATEFULSETS, "mail", "second", timeout=30)
        lease = kube_api.get(k.LEASES, "mailplane-system", "mailplane-operator")
        assert lease is not None and lease["spec"]["leaseTransitions"] == 1
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    assert second is not None and second.returncode == 0, (tmp_path / "b.log").read_text()[-3000:]
    log = (tmp_path / "b.log").read_text()
    assert "Leading as replica-b" in log and "Released the Lease" in log


def test_a_standby_answers_the_liveness_probe() -> None:
    async def probe() -> tuple[int, str]:
        async with standby_health("http://127.0.0.1:0/healthz") as port, \
                aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            return resp.status, await resp.text()

    status, text = asyncio.run(probe())
    assert status == 200 and "standby" in text
