"""The listening sockets of ``serve --workers N`` (``director.workers.listen``, issue 12):
one per worker with SO_REUSEPORT on Linux, never joining a port something else
listens on; one shared socket where SO_REUSEPORT does not spread connections."""

from __future__ import annotations

import socket

import pytest

from director import workers
from director.workers import bind_group, listen, reuseport_available
from uptane.errors import ConfigError

linux_only = pytest.mark.skipif(not reuseport_available(), reason="SO_REUSEPORT is Linux's")


def _close(groups: list[list[socket.socket]]) -> None:
    for group in groups:
        for s in group:
            s.close()


@linux_only
def test_each_worker_gets_its_own_socket_on_the_same_port() -> None:
    groups = listen("127.0.0.1", [0, 0], 3)  # port 0: the port the first socket got
    try:
        assert len(groups) == 3 and all(len(g) == 2 for g in groups)
        for listener in range(2):
            socks = [g[listener] for g in groups]
            assert len({s.fileno() for s in socks}) == 3  # three sockets, not one shared
            assert len({s.getsockname()[1] for s in socks}) == 1
            assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in socks)
        assert groups[0][0].getsockname()[1] != groups[0][1].getsockname()[1]
    finally:
        _close(groups)


@linux_only
def test_a_port_another_reuseport_server_listens_on_is_refused() -> None:
    """Without the parent's first bind (no SO_REUSEPORT), the kernel would let the
    workers join another server's group of this user and split its connections."""
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", 0))
    other.listen()
    port = other.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_group("127.0.0.1", port, 2)
    finally:
        other.close()


def test_a_taken_port_is_one_line_and_leaves_nothing_bound() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        free_port = free.getsockname()[1]
        free.close()
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}: "):
            listen("127.0.0.1", [free_port, port], 2)
        with socket.socket() as again:  # the first port's sockets were closed
            again.bind(("127.0.0.1", free_port))
    finally:
        taken.close()


def test_without_reuseport_every_worker_shares_one_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(workers, "reuseport_available", lambda: False)
    groups = listen("127.0.0.1", [0], 2)
    try:
        assert groups[0][0] is groups[1][0]
    finally:
        _close(groups)
