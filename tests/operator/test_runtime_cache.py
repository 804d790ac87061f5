"""The operator's caches are bounded: least recently used entries go first."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import kopf
import yaml

from mailplane_operator import kube as k
from mailplane_operator.dnscheck import DnsChecker
from mailplane_operator.metrics import OperatorMetrics
from mailplane_operator.runtime import BoundedCache, OperatorConfig, Runtime, build_settings

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_bounded_cache_drops_the_least_recently_used() -> None:
    cache: BoundedCache[str, int] = BoundedCache(2)
    cache["a"] = 1
    cache["b"] = 2
    assert cache.get("a") == 1  # a use: "b" is now the oldest
    cache["c"] = 3
    assert set(cache) == {"a", "c"}
    assert cache.get("b") is None
    cache["d"] = 4
    assert set(cache) == {"c", "d"}


def test_the_runtime_caches_take_their_size_from_the_config() -> None:
    credentials = k.Credentials(kopf.ConnectionInfo(server="http://127.0.0.1:1"))
    config = OperatorConfig(credentials=credentials, cache_size=3, discovery_ttl=7.0)
    client = k.KubeClient(config.credentials)
    rt = Runtime(config=config, client=client, metrics=OperatorMetrics.create(),
                 dns=DnsChecker(None))
    for i in range(10):
        rt.parsed[(str(i), "p")] = ("1", None)
        rt.remember_secret("ns", str(i), None)
    assert len(rt.parsed) == 3 and len(rt.secrets) == 3
    assert client.discovery_ttl == 7.0


def test_the_cli_refuses_a_cache_too_small_to_be_useful(tmp_path: pathlib.Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    env = {k_: v for k_, v in os.environ.items() if not k_.startswith("KUBERNETES_")}
    done = subprocess.run(
        [sys.executable, "-m", "mailplane_cli.main", "operator", "--kubeconfig", str(kubeconfig),
         "--metrics-port", "0", "--cache-size", "10"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--cache-size must be at least 100" in done.stderr


def test_a_deleted_objects_timers_are_looked_at_again_within_a_second() -> None:
    # kopf releases a deleted object's finalizer only once its timers have stopped, and looks
    # again after cancellation_polling (60 s by default): a credential deleted while its
    # rotation check ran held its finalizer a minute after the relay had refused it.
    credentials = k.Credentials(kopf.ConnectionInfo(server="http://127.0.0.1:1"))
    settings = build_settings(OperatorConfig(credentials=credentials))
    assert settings.background.cancellation_polling <= 1.0
