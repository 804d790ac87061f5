"""Relay subcommands of ``mailplane``: relay, check-config, hash-password, logs, suppression.

Imports of the runtime (aiosmtpd, the app) happen inside the handlers, so that ``mailplane logs``
starts fast and works on a machine that only has the message-log file.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .config import ConfigError, is_domain, load_config, parse_duration
from .events import STATUSES

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .store import StoreBackend

    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

T = TypeVar("T")

# Where `mailplane dev --state-dir DIR` keeps the relay's message log.
DEV_MESSAGE_LOG = Path("relay") / "messagelog.sqlite3"

# Where the relay's configuration is mounted in its pod.
DEFAULT_CONFIG = "/etc/mailplane/config"
_TIME_HELP = "ISO 8601 (2026-01-31T12:00:00Z) or an age such as 30m, 1h, 7d"


class UsageError(Exception):
    """Bad input on the command line; the message names the fix."""


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("relay", help="run the SMTP relay until SIGTERM/SIGINT")
    p.add_argument("--config", required=True, metavar="PATH",
                   help="configuration file or directory (hot-reloaded)")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)  # set by the supervisor only
    p.set_defaults(func=_cmd_relay)

    p = subparsers.add_parser("check-config", help="validate a relay configuration")
    p.add_argument("path", metavar="PATH", help="configuration file or directory")
    p.set_defaults(func=_cmd_check_config)

    p = subparsers.add_parser("hash-password",
                              help="hash a password read from stdin, for credentials")
    p.add_argument("--scheme", choices=("sha256", "scrypt"), default="sha256",
                   help="sha256 for generated random passwords (default), scrypt for "
                        "passwords a human chose")
    p.set_defaults(func=_cmd_hash_password)

    p = subparsers.add_parser(
        "logs", help="search the message log of the pod or the whole pool",
        usage="mailplane logs [--config PATH | --store URL | --db PATH | --state-dir DIR] "
              "[--sender S] [--recipient R] [--status STATUS] [--namespace NS] "
              "[--credential USER] [--since T] [--until T] [--queue-id ID] [--limit N] "
              "[--json]\n       mailplane logs forget ADDRESS [store options] "
              "(the same as `mailplane erase ADDRESS`)",
        description="Search the message log (newest records, printed oldest first). With a "
                    "PostgreSQL store this is the log of every pod of the pool.",
    )
    p.add_argument("words", nargs="*", metavar="forget ADDRESS", help=argparse.SUPPRESS)
    _db_options(p)
    p.add_argument("--sender", help="envelope sender address, or @domain")
    p.add_argument("--recipient", help="recipient address, or @domain")
    p.add_argument("--status", choices=STATUSES)
    p.add_argument("--namespace", metavar="NS",
                   help="tenant: namespace of the SmtpCredential that sent")
    p.add_argument("--credential", metavar="USER", help="SMTP username that sent")
    p.add_argument("--since", metavar="T", help=f"from this time: {_TIME_HELP}")
    p.add_argument("--until", metavar="T", help=f"before this time: {_TIME_HELP}")
    p.add_argument("--queue-id", metavar="ID")
    p.add_argument("--limit", type=int, default=100, metavar="N",
                   help="at most N records (default 100)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_cmd_logs)

    p = subparsers.add_parser(
        "erase", help="delete every record of an address, in the whole pool",
        description="Delete every message-log record (as sender or recipient) and the "
                    "suppression entry of ADDRESS from the store, and have every running relay "
                    "worker erase it from its spool (pending messages it sent are deleted, it "
                    "is removed from the recipients of the others). A complaint stays "
                    "suppressed as a keyed hash of the address, never the address. Prints what "
                    "was removed; exit status 1 if some worker did not report in time (the "
                    "request stays open and the workers finish it).",
    )
    p.add_argument("address", metavar="ADDRESS")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--timeout", default="60s", metavar="T",
                   help="how long to wait for every relay worker (default 60s)")
    p.add_argument("--no-wait", action="store_true",
                   help="record the request and return; the relays carry it out")
    _db_options(p)
    p.set_defaults(func=_cmd_erase)

    p = subparsers.add_parser(
        "suppression", help="list, add or remove suppressed addresses",
        description="mailplane suppression list | add ADDRESS [--reason R] | remove ADDRESS",
    )
    p.add_argument("action", choices=("list", "add", "remove"))
    p.add_argument("address", nargs="?")
    p.add_argument("--reason", default="manual", help="why (add; default 'manual')")
    p.add_argument("--json", action="store_true", help="one JSON object per line (list)")
    _db_options(p)
    p.set_defaults(func=_cmd_suppression)

    _register_queue(subparsers)


def _register_queue(subparsers: SubParsers) -> None:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="PATH", default=DEFAULT_CONFIG,
                       help="the relay's configuration: its spool.directory holds the "
                            f"administration sockets (default {DEFAULT_CONFIG})")
    where.add_argument("--control-dir", metavar="DIR",
                       help="the directory of the administration sockets "
                            "(<spool.directory>/control)")
    common.add_argument("--json", action="store_true", help="print JSON")
    p = subparsers.add_parser(
        "queue", help="list and manage the messages queued in the running relay",
        description="Administer the queue of the relay running on this machine (or pod: "
                    "kubectl exec RELAY-POD -- mailplane queue list). Every worker process "
                    "of the relay is asked; each answers for its own spool. Run it as the "
                    "relay's user.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("list", parents=[common], help="queued messages, oldest first")
    a.add_argument("--destination", metavar="DOMAIN",
                   help="only messages with a pending recipient at this domain")
    a.add_argument("--older-than", metavar="T", help="only messages queued longer than T "
                                                     "(e.g. 30m, 4h, 2d)")
    a.add_argument("--limit", type=int, default=1000, metavar="N",
                   help="at most N messages per worker process (default 1000; 0: all)")
    a = actions.add_parser("show", parents=[common],
                           help="one message's envelope and state (never its content)")
    a.add_argument("queue_id", metavar="ID")
    actions.add_parser("destinations", parents=[common],
                       help="delivery destinations: state, suspension and its reason")
    a = actions.add_parser("flush", parents=[common],
                           help="retry now: every message (or those for DESTINATION), and "
                                "end the suspension of the destinations concerned")
    a.add_argument("destination", metavar="DESTINATION", nargs="?")
    for name, what in (("hold", "keep a message (or every message for a destination) out "
                                "of delivery until released; survives restarts"),
                       ("release", "let held messages be delivered again")):
        a = actions.add_parser(name, parents=[common], help=what)
        a.add_argument("target", metavar="ID|DESTINATION")
    a = actions.add_parser("delete", parents=[common],
                           help="delete a message from the queue (no notice to the sender)")
    a.add_argument("queue_id", metavar="ID")
    a = actions.add_parser("bounce", parents=[common],
                           help="return a message to its sender with a delivery status "
                                "notification and remove it")
    a.add_argument("queue_id", metavar="ID")
    p.set_defaults(func=_cmd_queue)


def _db_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--config", metavar="PATH",
                       help="relay configuration: use its store (SQLite file or PostgreSQL)")
    group.add_argument("--store", metavar="URL",
                       help="a PostgreSQL store: postgresql://USER@HOST/DB (the password from "
                            "PGPASSWORD or ~/.pgpass), or a file holding the connection "
                            "string as @PATH")
    group.add_argument("--db", metavar="PATH", help="the message-log SQLite file")
    group.add_argument("--state-dir", metavar="DIR",
                       help=f"state directory of `mailplane dev` (DIR/{DEV_MESSAGE_LOG})")


def _backend(args: argparse.Namespace, *, readonly: bool) -> StoreBackend:
    from .store import SqliteBackend, StoreError  # noqa: PLC0415 - keep start-up light
    from .store.factory import backend_for, read_dsn  # noqa: PLC0415 - keep start-up light

    path: str | None = None
    if args.store:
        dsn = read_dsn(args.store[1:]) if args.store.startswith("@") else args.store
        if not dsn.startswith(("postgresql://", "postgres://")):
            raise UsageError(f"--store {args.store!r}: give a postgresql:// URL (or @FILE "
                             "holding one); for a SQLite file use --db PATH")
        from .store.postgres import PostgresBackend  # noqa: PLC0415 - psycopg only when used

        return PostgresBackend(dsn)
    if args.db:
        path = str(args.db)
    elif args.state_dir:
        path = str(Path(args.state_dir) / DEV_MESSAGE_LOG)
    elif args.config:
        return backend_for(load_config(args.config).settings, readonly=readonly)
    else:
        raise UsageError("say which store: --config PATH (relay configuration), --store URL "
                         "(PostgreSQL), --db PATH (the SQLite file) or --state-dir DIR (of "
                         "`mailplane dev`)")
    if readonly and not Path(path).exists():
        raise StoreError(f"{path}: no message log there; check --db/--config/--state-dir (the "
                         "relay creates the file when it starts)")
    return SqliteBackend(path, readonly=readonly)


def _with_store(args: argparse.Namespace, fn: Callable[[StoreBackend], Awaitable[T]], *,
                readonly: bool = False) -> T:
    backend = _backend(args, readonly=readonly)

    async def run() -> T:
        await backend.open()
        try:
            return await fn(backend)
        finally:
            await backend.close()

    return asyncio.run(run())


def _fail(command: str, message: str, code: int) -> int:
    print(f"mailplane {command}: {message}", file=sys.stderr)
    return code


# ---- relay, check-config, hash-password ---------------------------------------------------


def _cmd_relay(args: argparse.Namespace) -> int:
    from .app import WorkerSpec, run_relay  # noqa: PLC0415 - keep start-up light
    from .logging_setup import setup_logging  # noqa: PLC0415 - keep start-up light

    worker = WorkerSpec.from_json(args.worker_spec) if args.worker_spec else None
    setup_logging(args.log_level, worker=worker.index if worker else None)
    try:
        return run_relay(args.config, log_level=args.log_level, worker=worker)
    except ConfigError as exc:
        return _fail("relay", f"configuration rejected:\n{exc}", 2)


def _cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.path)
    except ConfigError as exc:
        return _fail("check-config", f"configuration rejected:\n{exc}", 2)
    s = cfg.settings
    listeners = ", ".join(f"{lst.name} {lst.address}:{lst.port} ({lst.tls})"
                          for lst in s.listeners)
    dkim = sum(1 for d in s.domains if d.dkim is not None)
    delivery: str = s.delivery.mode
    if s.delivery.smarthost is not None and s.delivery.mode == "smarthost":
        delivery += f" via {s.delivery.smarthost.host}:{s.delivery.smarthost.port}"
    print(f"configuration OK (hash {cfg.source_hash})")
    print(f"  hostname:      {s.hostname}")
    print(f"  listeners:     {listeners}")
    print(f"  http:          {s.http.address}:{s.http.port}")
    print(f"  workers:       {s.workers}")
    print(f"  delivery:      {delivery}")
    print(f"  domains:       {len(s.domains)} ({dkim} with DKIM)")
    print(f"  credentials:   {len(s.credentials)} "
          f"({sum(c.suspended for c in s.credentials)} suspended)")
    print(f"  spool:         {s.spool.directory} (fsync {'on' if s.spool.fsync else 'OFF'})")
    print(f"  message log:   {s.message_log.path}")
    print(f"  retention:     logs {_days(s.retention.message_log)}, "
          f"suppression {_days(s.retention.suppression)}")
    return 0


def _days(seconds: float) -> str:
    return f"{seconds / 86400:g}d" if seconds >= 86400 else f"{seconds:g}s"


def _cmd_hash_password(args: argparse.Namespace) -> int:
    from .config import hash_password  # noqa: PLC0415 - keep start-up light

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        return _fail("hash-password", "empty password: give the password on stdin", 2)
    print(hash_password(password, scheme=args.scheme))
    return 0


# ---- logs ---------------------------------------------------------------------------------


def parse_time(value: str, *, option: str, now: float) -> float:
    """Seconds since the epoch from ISO 8601 (UTC if no zone) or an age like ``7d``."""
    text = value.strip()
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{option}: {value!r} is not a time; use {_TIME_HELP}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _cmd_logs(args: argparse.Namespace) -> int:
    from .store import LogQuery, StoreError  # noqa: PLC0415 - keep start-up light

    try:
        if args.words:
            if len(args.words) != 2 or args.words[0] != "forget":
                raise UsageError(f"unexpected arguments {' '.join(args.words)!r}: use "
                                 "`mailplane logs [filters]` or `mailplane erase ADDRESS`")
            args.address = args.words[1]
            return _cmd_erase(args, command="logs")
        if args.limit < 1:
            raise UsageError("--limit must be at least 1")
        now = datetime.now(UTC).timestamp()
        since = parse_time(args.since, option="--since", now=now) if args.since else None
        until = parse_time(args.until, option="--until", now=now) if args.until else None
        q = LogQuery(sender=args.sender, recipient=args.recipient, status=args.status,
                     since=since, until=until, queue_id=args.queue_id,
                     namespace=args.namespace, credential=args.credential, limit=args.limit)
        rows = _with_store(args, lambda b: b.query(q), readonly=True)
    except (UsageError, ConfigError) as exc:
        return _fail("logs", str(exc), 2)
    except StoreError as exc:
        return _fail("logs", str(exc), 1)
    rows.reverse()
    if args.json:
        for row in rows:
            print(json.dumps({"time": _iso(row["ts"]), **row}))
    else:
        _print_table(
            ["TIME", "STATUS", "QUEUE ID", "NAMESPACE", "SENDER", "RECIPIENT", "ATTEMPT",
             "RESPONSE"],
            [[_iso(r["ts"]), r["status"], r["queue_id"] or "-", r["namespace"] or "-",
              r["sender"] or "<>", r["recipient"] or "-",
              "" if r["attempt"] is None else str(r["attempt"]),
              (r["response"] or "")[:80]] for r in rows],
        )
    return 0


def _cmd_erase(args: argparse.Namespace, command: str = "erase") -> int:
    from .store import StoreError  # noqa: PLC0415 - keep start-up light
    from .store.erasure import erase_across_pool  # noqa: PLC0415 - keep start-up light

    try:
        address = _address(args.address)
        timeout = parse_duration(getattr(args, "timeout", "60s"))
        wait = not getattr(args, "no_wait", False)
        request_id, report, complete = _with_store(
            args, lambda b: erase_across_pool(b, address, wait_for=timeout, wait=wait))
    except ValueError as exc:
        return _fail(command, f"--timeout: {exc}", 2)
    except (UsageError, ConfigError) as exc:
        return _fail(command, str(exc), 2)
    except StoreError as exc:
        return _fail(command, str(exc), 1)
    if getattr(args, "json", False):
        print(json.dumps({"address": address, "request": request_id, "complete": complete,
                          "removed": report.counts}))
    else:
        parts = ", ".join(f"{n} {place.replace('_', ' ')}" for place, n in
                          sorted(report.counts.items()) if n) or "nothing found"
        unreachable = report.counts.get("workers_unreachable", 0)
        if complete:
            state = ""
        elif unreachable:
            state = (f" (INCOMPLETE: {unreachable} relay worker(s) down, not seen for over a "
                     "minute, did not erase their spools; run the erasure again once they are "
                     "back)")
        else:
            state = (f" (request {request_id} still open: not every relay worker reported "
                     f"within {_days(timeout)}; they finish it)")
        print(f"erased {address}: {parts}{state}")
    return 0 if complete or not wait else 1


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    for line in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


# ---- suppression --------------------------------------------------------------------------


def _address(value: str) -> str:
    address = value.strip().lower()
    local, _, domain = address.rpartition("@")
    if not local or not is_domain(domain):
        raise UsageError(f"{value!r} is not an email address such as 'user@example.com'")
    return address


def _cmd_suppression(args: argparse.Namespace) -> int:
    from .store import StoreError  # noqa: PLC0415 - keep start-up light

    try:
        if args.action == "list":
            if args.address:
                raise UsageError("`suppression list` takes no address")
            entries = _with_store(args, lambda b: b.suppression_list(), readonly=True)
            _print_entries(entries, as_json=args.json)
            return 0
        if not args.address:
            raise UsageError(f"`suppression {args.action}` needs an ADDRESS")
        address = _address(args.address)
        if args.action == "add":
            now = datetime.now(UTC).timestamp()
            _with_store(args, lambda b: b.suppression_upsert(address, args.reason, "cli", now))
            print(f"suppressed {address} ({args.reason})")
            return 0
        if _with_store(args, lambda b: b.suppression_delete(address)):
            print(f"removed {address}")
            return 0
        return _fail("suppression", f"{address} is not on the suppression list", 1)
    except (UsageError, ConfigError) as exc:
        return _fail("suppression", str(exc), 2)
    except StoreError as exc:
        return _fail("suppression", str(exc), 1)


def _print_entries(entries: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        for e in entries:
            print(json.dumps({**e, "time": _iso(e["created"])}))
        return
    # SCOPE: "pool" (every team's mail) or the namespace whose mail alone it stops.
    _print_table(["ADDRESS", "SCOPE", "REASON", "SOURCE", "SINCE"],
                 [[e["address"], e.get("namespace") or "pool", e["reason"], e["source"],
                   _iso(e["created"])] for e in entries])


# ---- queue --------------------------------------------------------------------------------


def _queue_request(args: argparse.Namespace) -> dict[str, Any]:
    action = args.action
    request: dict[str, Any] = {"op": action}
    if action == "list":
        if args.limit < 0:
            raise UsageError("--limit must be 0 (no limit) or more")
        request["limit"] = args.limit
        if args.destination:
            request["destination"] = args.destination.lower()
        if args.older_than:
            try:
                request["older_than"] = parse_duration(args.older_than)
            except ValueError as exc:
                raise UsageError(f"--older-than: {exc}") from None
    elif action in ("show", "delete", "bounce"):
        request["queue_id"] = _queue_id_arg(args.queue_id)
    elif action == "flush" and args.destination:
        request["destination"] = args.destination.lower()
    elif action in ("hold", "release"):
        target = args.target.strip()
        if _looks_like_queue_id(target):
            request["queue_id"] = target.upper()
        elif is_domain(target.lower()):
            request["destination"] = target.lower()
        else:
            raise UsageError(f"{target!r} is neither a queue id (20 characters, as `mailplane "
                             "queue list` prints) nor a destination domain")
    return request


def _looks_like_queue_id(value: str) -> bool:
    return len(value) == 20 and not value.upper().strip("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def _queue_id_arg(value: str) -> str:
    if not _looks_like_queue_id(value.strip()):
        raise UsageError(f"{value!r} is not a queue id (20 characters, as `mailplane queue "
                         "list` prints)")
    return value.strip().upper()


def _cmd_queue(args: argparse.Namespace) -> int:
    from .control import ControlError, control_dir, request_all  # noqa: PLC0415

    try:
        request = _queue_request(args)
        if args.control_dir:
            directory = Path(args.control_dir)
        else:
            directory = control_dir(load_config(args.config).settings.spool.directory)
        # hold, release and flush of many messages take a while: each worker reports its
        # progress (and a silence of 30 s, not the whole operation, counts as no answer).
        long_op = args.action in ("hold", "release", "flush")
        answers, stale = request_all(directory, request,
                                     progress=_queue_progress if long_op else None)
    except (UsageError, ConfigError) as exc:
        return _fail("queue", str(exc), 2)
    except ControlError as exc:
        return _fail("queue", str(exc), 1)
    except OSError as exc:
        return _fail("queue", f"cannot reach the relay: {exc}", 1)
    for name in stale:
        print(f"mailplane queue: {name}: no relay process listens (a worker that is gone); "
              "skipped", file=sys.stderr)
    ok = [(worker, a["result"]) for worker, a in answers if a.get("ok")]
    errors = [(worker, str(a.get("error"))) for worker, a in answers if not a.get("ok")]
    if "queue_id" in request:
        if not ok:
            reasons = sorted({e for _, e in errors})
            return _fail("queue", "; ".join(reasons) or "no relay process answered", 1)
    elif errors:
        for worker, error in errors:
            print(f"mailplane queue: {worker}: {error}", file=sys.stderr)
    _print_queue_answer(args, ok)
    return 1 if errors and "queue_id" not in request else 0


def _queue_progress(worker: str, done: int, total: int) -> None:
    if done < total:
        print(f"mailplane queue: {worker}: {done} of {total} message(s) done...",
              file=sys.stderr, flush=True)


def _print_queue_answer(args: argparse.Namespace, ok: list[tuple[str, Any]]) -> None:
    action = args.action
    if action == "list":
        rows = sorted(({**m, "worker": w} for w, result in ok for m in result["messages"]),
                      key=lambda m: m["queue_id"])
        matched = sum(result["matched"] for _, result in ok)
        if args.json:
            for m in rows:
                print(json.dumps(m))
            return
        now = datetime.now(UTC).timestamp()
        _print_table(["QUEUE ID", "WORKER", "STATE", "AGE", "SIZE", "SENDER", "RECIPIENTS",
                      "LAST REPLY"],
                     [[m["queue_id"], m["worker"], m["state"],
                       _age(now - m["received_at"]), str(m["size"]), m["sender"] or "<>",
                       ",".join(r["address"] for r in m["recipients"]),
                       _last_reply(m["recipients"])] for m in rows])
        print(f"{len(rows)} message(s)" + (f" of {matched} (raise --limit to see more)"
                                            if matched > len(rows) else ""))
        return
    if action == "show":
        worker, doc = ok[0]
        print(json.dumps({**doc, "worker": worker}, indent=None if args.json else 2))
        return
    if action == "destinations":
        dests = [{**d, "worker": w} for w, result in ok for d in result]
        if args.json:
            for d in dests:
                print(json.dumps(d))
            return
        _print_table(["DESTINATION", "WORKER", "STATE", "READY", "IN USE", "LIMIT",
                      "SUSPENDED FOR", "REASON"],
                     [[d["destination"], d["worker"], d["state"], str(d["ready"]),
                       str(d["connectionsInUse"]), str(d["connectionLimit"]),
                       _age(d["suspendedFor"]) if d["suspendedFor"] else "",
                       d["reason"]] for d in dests])
        return
    if action == "flush":
        messages = sorted(q for _, r in ok for q in r["messages"])
        resumed = sorted(d for _, r in ok for d in r["destinations"])
        if args.json:
            print(json.dumps({"messages": messages, "destinations": resumed}))
            return
        print(f"flushed {len(messages)} message(s)"
              + (f"; resumed {', '.join(resumed)}" if resumed else ""))
        return
    ids = sorted(q for _, r in ok for q in r)
    if args.json:
        print(json.dumps(ids))
        return
    verb = {"hold": "held", "release": "released", "delete": "deleted",
            "bounce": "bounced"}[action]
    print(f"{verb} {len(ids)} message(s)" + (f": {' '.join(ids)}" if ids else ""))


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _last_reply(recipients: list[dict[str, Any]]) -> str:
    replies = [r["last_response"] for r in recipients if r.get("last_response")]
    return replies[-1][:60] if replies else ""


def main(argv: list[str] | None = None) -> int:
    """The relay's commands alone (``python -m mailplane_relay.cli``): what the supervisor runs
    for its workers, so a relay image needs neither the operator nor the dev tooling."""
    parser = argparse.ArgumentParser(prog="mailplane")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
