"""A real PostgreSQL server that the test session starts itself (Debian's `postgresql` package).

``initdb`` in a temp dir and ``pg_ctl start``, as the unprivileged ``postgres`` user when the
tests run as root; it listens on a unix socket in a temp dir only (no TCP port to race for) and
is stopped and removed at the end of the session. Each test gets its own database::

    async def test_x(pg_dsn: str) -> None:      # "host=/tmp/... dbname=t_3 user=postgres"
        backend = PostgresBackend(pg_dsn)

``pg_server.stop()`` / ``pg_server.start()`` take the database down and up again (fault tests).
Tests needing it fail, naming the fix, when PostgreSQL is not installed
(`scripts/bootstrap --test` installs it).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.base = Path(tempfile.mkdtemp(prefix="mailplane-pg-"))
        self.data = self.base / "data"
        self.socket_dir = self.base / "run"
        self.log = self.base / "server.log"
        self.user = "postgres"
        self._as_root = os.geteuid() == 0
        self._names = itertools.count(1)
        self.socket_dir.mkdir()
        if self._as_root:
            shutil.chown(self.base, user="postgres")
            shutil.chown(self.socket_dir, user="postgres")
        else:
            self.user = os.environ.get("USER") or "postgres"

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, timeout=timeout, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user,
                  "--no-sync", "-E", "UTF8", "--locale=C")
        self.start()

    def start(self) -> None:
        opts = (f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w",
                  "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} user={self.user} dbname={dbname}"

    def url(self, dbname: str) -> str:
        """The same as a postgresql:// URL (what `mailplane dev --store` takes)."""
        from urllib.parse import quote

        return f"postgresql://{self.user}@/{dbname}?host={quote(str(self.socket_dir), safe='')}"

    def create_database(self) -> str:
        import psycopg

        name = f"t_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    bindir = _bindir()
    if bindir is None:
        # A missing tool is a failure, not a skip: a skip would hide a deleted feature.
        pytest.fail("PostgreSQL is not installed: run scripts/bootstrap --test")
    server = PostgresServer(bindir)
    try:
        server.init()
    except subprocess.CalledProcessError as exc:
        server.destroy()
        pytest.fail(f"could not start PostgreSQL: {exc.stderr.decode(errors='replace')}")
    yield server
    server.destroy()


@pytest.fixture
def pg_dsn(pg_server: PostgresServer) -> str:
    """A fresh, empty database of the session's server."""
    return pg_server.dsn(pg_server.create_database())
