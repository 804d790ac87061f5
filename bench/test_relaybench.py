"""Checks of the benchmark's own measuring parts, with real processes and sockets.

Run with ``.venv/bin/pytest bench/test_relaybench.py`` (a few seconds; not part of the default
suite, whose testpaths are ``tests/``). The benchmark's figures are only as good as its sink's
counting, its stamps and its CPU accounting, so those are checked here.
"""

from __future__ import annotations

import argparse
import asyncio
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relay_bench import percentiles, timeline
from relaybench.procstat import tree_cpu_delta, tree_snapshot
from relaybench.sinkproc import SinkProcess
from relaybench.smtpclient import ProbeResults, build_message, load, probe_loop


async def _smtplib_send(port: int, messages: list[bytes]) -> None:
    def send() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            for data in messages:
                client.sendmail("a@plain.test", ["b@dest.test"], data)

    await asyncio.to_thread(send)


async def test_sink_counts_bulk_and_stamped_messages(tmp_path: Path) -> None:
    sink = await SinkProcess.start(tmp_path / "samples")
    try:
        before = time.time()
        stamped = build_message(mail_from="a@plain.test", rcpt="b@dest.test", size=300,
                                kind="p", seq=7)
        dotted = b"Subject: x\r\n\r\n.leading dot\r\n..two\r\n"  # smtplib dot-stuffs these
        signed = b"DKIM-Signature: v=1; d=plain.test\r\nSubject: s\r\n\r\nbody\r\n"
        await _smtplib_send(sink.port, [b"Subject: a\r\n\r\nbulk\r\n", dotted, stamped, signed])
        dump = await sink.ask("dump")
    finally:
        await sink.stop()
    assert dump["messages"] == 4
    assert dump["bulk"] == 3 and dump["stamped"] == 1 and dump["dkim_signed"] == 1
    [(kind, seq, sent, arrived)] = dump["stamped_messages"]
    assert (kind, seq) == ("p", 7)
    assert before <= sent <= arrived <= time.time()
    assert (tmp_path / "samples" / "sample-1.eml").read_bytes().startswith(b"DKIM-Signature:")


async def test_sink_reads_pipelined_commands_and_split_end_of_data() -> None:
    sink = await SinkProcess.start()
    try:
        def talk() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", sink.port), timeout=10) as s:
                f = s.makefile("rb")
                assert f.readline().startswith(b"220")
                s.sendall(b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
                replies = [f.readline() for _ in range(8)]  # 5 EHLO lines, MAIL, RCPT, DATA
                s.sendall(b"Subject: split\r\n\r\nbody\r")
                s.sendall(b"\n.")
                s.sendall(b"\r\nQUIT\r\n")
                replies += [f.readline(), f.readline()]
                return replies

        replies = await asyncio.to_thread(talk)
        count = await sink.ask("count")
    finally:
        await sink.stop()
    codes = [r[:3] for r in replies]
    assert codes == [b"250"] * 7 + [b"354", b"250", b"221"]
    assert count["messages"] == 1 and count["bulk"] == 1


async def test_probes_and_load_client_reach_the_sink() -> None:
    sink = await SinkProcess.start()
    try:
        stop = asyncio.Event()
        results = ProbeResults()
        probes = asyncio.create_task(probe_loop(
            host="127.0.0.1", port=sink.port, mail_from="p@plain.test", rcpt="probe@dest.test",
            size=500, interval=0.01, stop=stop, results=results))
        report = await load(argparse.Namespace(
            host="127.0.0.1", port=sink.port, messages=200, connections=4, size=2048,
            mail_from="l@plain.test", rcpt="b@dest.test", tls=False, cafile=None,
            username=None))
        stop.set()
        await asyncio.wait_for(probes, 10)
        dump = await sink.ask("dump")
    finally:
        await sink.stop()
    assert report["accepted"] == 200 and report["errors"] == {}
    assert results.sent >= 1 and results.accepted == results.sent and not results.errors
    kinds = [m[0] for m in dump["stamped_messages"]]
    assert kinds.count("l") == 200 and kinds.count("p") == results.accepted
    assert dump["bulk"] == 0


def test_tree_cpu_counts_children_that_exit_within_the_window() -> None:
    # A parent that, after a signal on stdin, runs a child burning ~0.3 s of CPU and reaps it.
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys; sys.stdin.readline(); subprocess.run([sys.executable, '-c', "
         "'import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.3: pass']);"
         " print('done', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert parent.stdin is not None and parent.stdout is not None
        time.sleep(0.2)  # let the interpreter finish starting, so its start-up is not counted
        before = tree_snapshot(parent.pid)
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "done"
        after = tree_snapshot(parent.pid)
    finally:
        parent.kill()
        parent.wait()
    split = tree_cpu_delta(before, after, root=parent.pid)
    assert 0.25 <= split.get("(exited)", 0.0) <= 0.6, split


def test_percentiles_and_timeline() -> None:
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None, "max": None}
    values = [i / 100 for i in range(100)]
    got = percentiles(values)
    assert got["p50"] == 0.5 and got["p90"] == 0.9 and got["p99"] == 0.99 and got["max"] == 0.99
    assert timeline([10.1, 10.2, 11.5, 13.0], 10.0) == [2, 1, 0, 1]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
