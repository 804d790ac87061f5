"""CPU accounting from /proc, without psutil.

A relay is a tree of processes (Postfix: master and its daemons, which come and go; Mailplane:
one process or a supervisor with workers). The CPU a tree used over a window is the change of
``utime + stime`` of every live member plus ``cutime + cstime`` (the CPU of children that exited
and were reaped): a process that ends inside the window still counts, through its parent.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

_TICK = float(os.sysconf("SC_CLK_TCK"))


@dataclass(frozen=True)
class ProcCPU:
    pid: int
    ppid: int
    name: str
    own: float  # seconds of utime + stime
    reaped: float  # seconds of cutime + cstime (children that exited)
    kernel: float = 0.0  # seconds of stime + cstime: the system-call share of own + reaped


def read_proc(pid: int) -> ProcCPU | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may hold spaces and parentheses: it ends at the last ')'.
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state) of proc(5): ppid is 4, utime..cstime are 14..17.
    ppid = int(fields[1])
    own = (int(fields[11]) + int(fields[12])) / _TICK
    reaped = (int(fields[13]) + int(fields[14])) / _TICK
    kernel = (int(fields[12]) + int(fields[14])) / _TICK
    return ProcCPU(pid, ppid, name, own, reaped, kernel)


def _all_procs() -> dict[int, ProcCPU]:
    procs: dict[int, ProcCPU] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = read_proc(int(entry))
            if info is not None:
                procs[info.pid] = info
    return procs


def tree_snapshot(root: int) -> dict[int, ProcCPU]:
    """The root process and all its live descendants."""
    procs = _all_procs()
    children: dict[int, list[int]] = defaultdict(list)
    for p in procs.values():
        children[p.ppid].append(p.pid)
    out: dict[int, ProcCPU] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in procs and pid not in out:
            out[pid] = procs[pid]
            stack.extend(children.get(pid, ()))
    return out


def tree_cpu_delta(
    before: dict[int, ProcCPU], after: dict[int, ProcCPU], root: int | None = None,
) -> dict[str, float]:
    """CPU seconds used between two snapshots, by process name; ``(exited)`` holds the CPU of
    processes that ended in between (reaped by a member of the tree). Processes that all share
    one name (Python workers under a Python supervisor) are told apart as root and children."""
    split: dict[str, float] = defaultdict(float)
    root_name = after[root].name if root in after else None
    shared = sum(1 for p in after.values() if p.name == root_name) > 1
    for pid, p in after.items():
        prev = before.get(pid)
        same = prev is not None and prev.name == p.name
        name = p.name
        if shared and p.name == root_name:
            name = f"{p.name} (root)" if pid == root else f"{p.name} (children)"
        split[name] += p.own - (prev.own if same and prev else 0.0)
        reaped = p.reaped - (prev.reaped if same and prev else 0.0)
        if reaped > 0:
            split["(exited)"] += reaped
    # A member alive before and gone after was reaped by its parent: its CPU before the window
    # is now inside the parent's `reaped` too, so take it back out.
    for pid, prev in before.items():
        if pid not in after:
            split["(exited)"] -= prev.own + prev.reaped
    return {k: round(v, 2) for k, v in sorted(split.items(), key=lambda kv: -kv[1]) if v > 0.004}


def tree_kernel_delta(before: dict[int, ProcCPU], after: dict[int, ProcCPU]) -> float:
    """System (kernel) CPU seconds of the tree between two snapshots, counted as in
    tree_cpu_delta: on loopback, a send() runs the receiver's TCP path too."""
    total = 0.0
    for pid, p in after.items():
        prev = before.get(pid)
        total += p.kernel - (prev.kernel if prev is not None and prev.name == p.name else 0.0)
    for pid, prev in before.items():
        if pid not in after:
            total -= prev.kernel
    return round(total, 2)


def machine_busy() -> tuple[float, float]:
    """(busy seconds, total seconds) summed over all CPUs since boot, from /proc/stat."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()
    values = [int(v) for v in first[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # user..steal; guest time is already inside user
    return (total - idle) / _TICK, total / _TICK
