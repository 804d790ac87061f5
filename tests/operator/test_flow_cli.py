"""`mailplane operator` as a process: kubeconfig, metrics port, clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from mailplane_operator import kube as k
from tests.helpers.kube import (
    KubeApi,
    credential_body,
    domain_body,
    namespace_body,
    relay_body,
    rendered_credentials,
)
from tests.helpers.ports import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _kubeconfig(path: pathlib.Path, server: str) -> pathlib.Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "operator", "user": {"token": "not-checked-by-the-emulator"}}],
        "contexts": [{"name": "emulator",
                      "context": {"cluster": "emulator", "user": "operator"}}],
    }))
    return path


def _serves_metrics(proc: subprocess.Popen[str], port: int) -> bool:
    """Wait until the operator serves /metrics (True) or exits (False)."""
    deadline = time.monotonic() + 60  # bounds a hang only
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2):
                return True
        except OSError:
            time.sleep(0.1)
    assert proc.poll() is not None, "the operator did not serve metrics in 60s"
    return False


@pytest.mark.slow
def test_the_operator_command_runs_against_the_kubeconfig_cluster(
        kube_api: KubeApi, tmp_path: pathlib.Path) -> None:
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", kube_api.url)
    env = {k_: v for k_, v in os.environ.items() if not k_.startswith("KUBERNETES_")}
    # The metrics port is picked free before the operator binds it; if another process took it
    # in between, the operator exits saying so and is started again on another port.
    for _ in range(5):
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailplane_cli.main", "operator", "--kubeconfig",
             str(kubeconfig), "--metrics-port", str(port), "--all-namespaces",
             "--cluster-domain", "corp.internal"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if _serves_metrics(proc, port):
            break
        output, _ = proc.communicate(timeout=30)
        assert "address already in use" in output.lower(), output[-3000:]
    else:
        raise AssertionError("the operator found no free metrics port in 5 tries")
    try:
        kube_api.create(k.NAMESPACES, namespace_body("mail"))
        kube_api.create(k.NAMESPACES, namespace_body("shop", **{
            "mailplane.io/smtp-access": "true"}))
        kube_api.create(k.SMTP_RELAYS, relay_body())
        kube_api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))
        kube_api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["example.com"]))
        kube_api.wait_until(lambda: "shop.orders" in rendered_credentials(kube_api),
                            timeout=30, what="the process to render the relay configuration")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        assert "mailplane_operator_up 1.0" in metrics
        lint = subprocess.run(["promtool", "check", "metrics"], input=metrics, text=True,
                              capture_output=True, timeout=30)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        assert 'mailplane_operator_reconciles_total{kind="SmtpCredential",result="ok"}' in metrics
        app = kube_api.secret_data("shop", "orders-smtp")
        password = app["password"]
        assert password not in metrics
        assert app["host"] == "main.mail.svc.corp.internal"
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output[-3000:]
    assert password not in output
    assert "Mailplane operator starting against" in output


@pytest.mark.slow
def test_json_logs_are_one_object_per_line_and_name_the_object(
        kube_api: KubeApi, tmp_path: pathlib.Path) -> None:
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", kube_api.url)
    env = {k_: v for k_, v in os.environ.items() if not k_.startswith("KUBERNETES_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailplane_cli.main", "operator", "--kubeconfig", str(kubeconfig),
         "--metrics-port", "0", "--all-namespaces", "--log-format=json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        kube_api.create(k.NAMESPACES, namespace_body("mail"))
        kube_api.create(k.NAMESPACES, namespace_body("shop", **{
            "mailplane.io/smtp-access": "true"}))
        kube_api.create(k.SMTP_RELAYS, relay_body())
        kube_api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))
        kube_api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["example.com"]))
        kube_api.wait_until(lambda: "shop.orders" in rendered_credentials(kube_api),
                            timeout=30, what="the process to render the relay configuration")
        password = kube_api.secret_data("shop", "orders-smtp")["password"]
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output[-3000:]
    assert password not in output
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    for record in records:
        assert {"ts", "level", "logger", "msg"} <= set(record), record
        assert record["ts"].endswith("Z")
    assert any(r["msg"].startswith("Mailplane operator starting against") for r in records)
    # kopf's per-object records say which object they are about.
    about = {(r["object"].get("kind"), r["object"].get("namespace"), r["object"]["name"])
             for r in records if "object" in r}
    assert ("SmtpCredential", "shop", "orders") in about, about
