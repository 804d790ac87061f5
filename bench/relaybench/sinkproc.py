"""Child processes of a benchmark run: the sink, and process-group cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """Our modules importable by ``python -m relaybench.x`` in a child process."""
    path = os.environ.get("PYTHONPATH", "")
    joined = f"{BENCH_DIR}{os.pathsep}{path}" if path else str(BENCH_DIR)
    return {**os.environ, "PYTHONPATH": joined}


async def kill_group(proc: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left after ``grace``."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        await asyncio.wait_for(proc.wait(), grace)


class SinkProcess:
    """The counting sink (relaybench.sink) in its own process, asked over stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, samples_dir: Path | None = None) -> SinkProcess:
        args = [sys.executable, "-m", "relaybench.sink", "--port", "0"]
        if samples_dir is not None:
            samples_dir.mkdir(parents=True, exist_ok=True)
            args += ["--samples-dir", str(samples_dir)]
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=child_env(), start_new_session=True, limit=256 * 1024 * 1024,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 15)
            if not line.startswith(b"PORT "):
                raise RuntimeError(f"the bench sink did not start: {line!r}")
            return cls(proc, int(line.split()[1]))
        except BaseException:
            await kill_group(proc)
            raise

    async def ask(self, command: str, timeout: float = 60) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError("the bench sink exited")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def stop(self) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self.proc.stdin.write(b"quit\n")
                await self.proc.stdin.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), 5)
        await kill_group(self.proc)
