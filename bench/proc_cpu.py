"""CPU seconds and resident memory of a process tree from the OS (``/proc``), for the
benches that measure servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (OSError if it is gone)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def tree_pids(pid: int) -> Iterator[int]:
    """``pid`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(d.name)[1]), []).append(int(d.name))
            except OSError:
                continue
    todo = [pid]
    while todo:
        p = todo.pop()
        yield p
        todo.extend(children.get(p, []))


def pid_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` alone (0.0 once it is gone)."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in tree_pids(pid):
        try:
            fields = _stat_fields(p)
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its live descendants."""
    total = 0
    for p in tree_pids(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:"))
    return total
