"""sd_notify datagrams on a real AF_UNIX socket, filesystem and abstract names."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from gateway.sdnotify import Notifier


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    # A short path: AF_UNIX names are limited to 108 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn-") as folder:
        path = os.path.join(folder, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5)
            yield sock, path


def test_sends_one_datagram_of_assignments_to_a_path_socket(
        receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert Notifier({"NOTIFY_SOCKET": path}).send("READY=1", "STATUS=3 mails today")
    assert sock.recv(4096) == b"READY=1\nSTATUS=3 mails today"


def test_abstract_socket_names_start_with_at() -> None:
    name = f"deskgate-unit-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": f"@{name}"}).send("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_without_notify_socket_it_is_a_quiet_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False
    assert notifier.watchdog_interval_s is None


def test_a_vanished_socket_is_logged_not_raised() -> None:
    assert Notifier({"NOTIFY_SOCKET": "/nonexistent/deskgate-notify"}).send("READY=1") is False


def test_watchdog_pings_at_half_the_interval_for_this_process_only() -> None:
    mine = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval_s == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval_s == 15.0
    assert Notifier({**mine, "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval_s is None
