"""Process-tree accounting from /proc: CPU seconds and resident memory.

CPU of a tree = for every live process in it, its own CPU plus what it has
collected from exited children (cutime/cstime), so short-lived processes
(PostgreSQL backends) are counted once, by the ancestor that reaped them.
"""

from __future__ import annotations

import os

_TICKS_PER_SEC = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may hold spaces; everything after its ')' is fields 3+.
    return data[data.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(roots: list[int]) -> float:
    total = 0
    for root in roots:
        for pid in tree(root):
            fields = _stat(pid)
            if fields:
                # utime, stime, cutime, cstime are fields 14-17 (1-based).
                total += sum(int(x) for x in fields[11:15])
    return total / _TICKS_PER_SEC


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
