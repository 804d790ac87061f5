"""The operator's composition root: one `Runtime` per process, the handlers bound to it, kopf.

`run` builds the API client, the metrics and the DNS checker, hands them to every handler
module through `handlers.build_registry`, and runs kopf until stopped. Nothing is global: a test
runs several operators (one after another, or side by side) in one process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import kopf

from .dnscheck import DnsChecker
from .handlers import build_registry
from .kube import KubeClient
from .metrics import OperatorMetrics
from .runtime import OperatorConfig, Runtime, build_settings


async def run(config: OperatorConfig, *, metrics: OperatorMetrics | None = None,
              stop_flag: Any = None, ready_flag: Any = None,
              clock: Callable[[], datetime] | None = None,
              liveness_endpoint: str | None = None,
              on_runtime: Callable[[Runtime], Awaitable[None] | None] | None = None) -> None:
    """Run the operator until `stop_flag` is set (or forever)."""
    metrics = metrics if metrics is not None else OperatorMetrics.create()
    async with KubeClient(config.connection) as client:
        rt = Runtime(config=config, client=client, metrics=metrics,
                     dns=DnsChecker(config.dns_resolver))
        if clock is not None:
            rt.clock = clock
        if on_runtime is not None:
            maybe = on_runtime(rt)
            if maybe is not None:
                await maybe
        try:
            await kopf.operator(
                registry=build_registry(rt),
                settings=build_settings(config),
                clusterwide=not config.namespaces,
                namespaces=list(config.namespaces),
                stop_flag=stop_flag,
                ready_flag=ready_flag,
                liveness_endpoint=liveness_endpoint,
            )
        finally:
            metrics.up.set(0)
