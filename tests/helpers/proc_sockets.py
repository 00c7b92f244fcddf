"""Which process holds which socket, read from the kernel (``/proc``, Linux): for the
tests of ``serve --workers N`` (``director.workers``); and stopping a server's
process group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

_LISTEN, _ESTABLISHED = "0A", "01"


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry))
    return found


def _sockets(port: int, state: str, other: Callable[[int], bool]) -> dict[str, int]:
    """``socket:[inode]`` -> the remote port, of the sockets on local ``port`` in ``state``."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local = int(fields[1].rsplit(":", 1)[1], 16)
                remote = int(fields[2].rsplit(":", 1)[1], 16)
                if local == port and fields[3] == state and other(remote):
                    found[f"socket:[{fields[9]}]"] = remote
    return found


def _holders(pids: Iterable[int], links: dict[str, int]) -> dict[str, set[int]]:
    """For each socket of ``links``: the processes of ``pids`` holding it."""
    held: dict[str, set[int]] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link in links:
                held.setdefault(link, set()).add(pid)
    return held


def connection_owners(pids: Iterable[int], port: int) -> dict[int, int]:
    """Client port -> the process of ``pids`` holding the server end of each established
    loopback connection to ``port``."""
    links = _sockets(port, _ESTABLISHED, lambda remote: True)
    return {links[link]: pid for link, holders in _holders(pids, links).items() for pid in holders}


def listening_sockets(pids: Iterable[int], port: int) -> dict[int, set[str]]:
    """For each process of ``pids``: the listening sockets on ``port`` it holds."""
    links = _sockets(port, _LISTEN, lambda remote: remote == 0)
    held: dict[int, set[str]] = {}
    for link, holders in _holders(pids, links).items():
        for pid in holders:
            held.setdefault(pid, set()).add(link)
    return held


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Ctrl-C to ``proc``'s process group (a server and its workers), SIGKILL after
    ``timeout`` seconds; a group already gone is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
