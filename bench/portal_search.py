"""Log search through the portal over a large PostgreSQL message log.

Starts its own PostgreSQL (tests/helpers/postgres.py), creates the store's schema with the
relay's PostgreSQL backend, generates N message-log rows server-side (default 10 million: 40
tenants, 200 credentials, 2,000 sender and 1 million recipient addresses, 90 days, the statuses
in realistic shares), ANALYZEs, then runs the portal's own search (search.page, scoped to one
namespace, a page of 50) for a mix of filters and reports p50/p95/max per kind and overall.

    .venv/bin/python bench/portal_search.py [--rows 10000000] [--queries 400]
        [--without-search-indexes]

The rows are generated without the store's tenant-first indexes (SEARCH_INDEXES), which are
then built by the store's own migration (CREATE INDEX CONCURRENTLY), timed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for sub in ("relay", "operator", "cli", "portal", "."):
    sys.path.insert(0, str(ROOT / sub))

from tests.helpers.postgres import PostgresServer, _bindir  # noqa: E402

from mailplane_portal.search import Search, page  # noqa: E402
from mailplane_relay.store.postgres import SEARCH_INDEXES, PostgresBackend  # noqa: E402

DAY = 86400
GENERATE = """
INSERT INTO message_log (event_id, ts, status, queue_id, message_id, credential, namespace,
                         sender, recipient, response, size, attempt, remote)
SELECT 'b' || g, %(now)s - (g::double precision / %(rows)s) * 90 * 86400,
       (ARRAY['delivered','delivered','delivered','delivered','delivered','delivered',
              'received','received','deferred','bounced'])[1 + (g * 7919) %% 10],
       'Q' || (g / 3), '<' || g || '@bench>', 'cred' || (g %% 200),
       'team' || (g %% 200 %% 40),
       'sender' || (g %% 2000) || '@team' || (g %% 200 %% 40) || '.example',
       'user' || ((g * 48271) %% 1000000) || '@mail' || ((g * 48271) %% 50) || '.example',
       '250 2.0.0 ok', 2048, 1, 'mx.example:25 tls'
FROM generate_series(%(start)s::bigint, %(stop)s::bigint) AS g
"""


async def fill(dsn: str, rows: int, search_indexes: bool = True) -> None:
    backend = PostgresBackend(dsn)
    await backend.open()  # creates the schema and its indexes
    await backend.search_indexes_settled()
    import psycopg

    now = time.time()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        # Generated without the tenant-first indexes, which are then built the way an
        # existing store gets them at its first start after an upgrade (timed).
        for name in SEARCH_INDEXES:
            await conn.execute(f"DROP INDEX {name}")
        chunk = 1_000_000
        for start in range(0, rows, chunk):
            t = time.monotonic()
            await conn.execute(GENERATE, {"now": now, "rows": rows, "start": start,
                                          "stop": min(rows, start + chunk) - 1})
            print(f"  rows {min(rows, start + chunk):>10,}  {time.monotonic() - t:.1f}s",
                  flush=True)
        if search_indexes:
            t = time.monotonic()
            built = await backend.ensure_search_indexes()
            print(f"  migration: built {', '.join(built)} concurrently in "
                  f"{time.monotonic() - t:.1f}s", flush=True)
        await conn.execute("ANALYZE message_log")
    await backend.close()


def searches(rng: random.Random, now: float) -> list[tuple[str, str, Search]]:
    out = []
    for _ in range(100):
        team = rng.randrange(40)
        ns = f"team{team}"
        cred_ids = [c for c in range(200) if c % 40 == team]
        sender_ids = [s for s in range(2000) if s % 200 % 40 == team]
        out += [
            ("namespace only", ns, Search()),
            ("recipient", ns, Search(recipient=f"user{rng.randrange(1_000_000)}@mail"
                                               f"{rng.randrange(50)}.example")),
            ("sender + 1 day", ns, Search(sender=f"sender{rng.choice(sender_ids)}@{ns}.example",
                                          since=now - rng.randrange(2, 80) * DAY,
                                          until=None)),
            ("status bounced", ns, Search(status="bounced")),
            ("credential + range", ns, Search(credential=f"cred{rng.choice(cred_ids)}",
                                              since=now - 30 * DAY, until=now - 29 * DAY)),
            ("recipient @domain", ns, Search(recipient=f"@mail{rng.randrange(50)}.example")),
            ("queue id", ns, Search(queue_id=f"Q{rng.randrange(3_000_000)}")),
        ]
    rng.shuffle(out)
    return out


async def measure(dsn: str, queries: int) -> None:
    backend = PostgresBackend(dsn)
    await backend.open()
    rng = random.Random(7)
    work = searches(rng, time.time())[:queries]
    for _, ns, s in work[:20]:  # warm the pool and the cache a little
        await page(backend, ns, s)
    times: dict[str, list[float]] = {}
    for kind, ns, s in work:
        t = time.perf_counter()
        await page(backend, ns, s)
        times.setdefault(kind, []).append((time.perf_counter() - t) * 1000)
    await backend.close()
    every = sorted(x for v in times.values() for x in v)

    def p(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]

    for kind, v in sorted(times.items()):
        print(f"  {kind:<20} n={len(v):>4}  p50 {statistics.median(v):7.1f} ms  "
              f"p95 {p(v, 0.95):7.1f} ms  max {max(v):7.1f} ms")
    print(f"  {'ALL':<20} n={len(every):>4}  p50 {statistics.median(every):7.1f} ms  "
          f"p95 {p(every, 0.95):7.1f} ms  max {max(every):7.1f} ms")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--without-search-indexes", action="store_true",
                    help="leave out the store's tenant-first indexes (SEARCH_INDEXES), to "
                         "see what they are worth")
    args = ap.parse_args()
    bindir = _bindir()
    if bindir is None:
        print("PostgreSQL is not installed: scripts/bootstrap --test", file=sys.stderr)
        return 2
    server = PostgresServer(bindir)
    server.init()
    try:
        dsn = server.dsn(server.create_database())
        t = time.monotonic()
        print(f"generating {args.rows:,} rows", flush=True)
        asyncio.run(fill(dsn, args.rows, not args.without_search_indexes))
        print(f"generated in {time.monotonic() - t:.0f}s; searching", flush=True)
        asyncio.run(measure(dsn, args.queries))
    finally:
        server.destroy()
        shutil.rmtree(server.base if hasattr(server, "base") else "", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
