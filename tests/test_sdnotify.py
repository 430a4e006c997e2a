"""callguard.sdnotify against real AF_UNIX datagram sockets: one bound to a path in
tmp_path, one in the abstract namespace, as systemd's $NOTIFY_SOCKET may name either."""

from __future__ import annotations

import os
import socket
import struct
import time
import uuid

import pytest

from callguard import sdnotify


class Receiver:
    """A SOCK_DGRAM socket like systemd's notify socket: SO_PASSCRED on, so every datagram
    comes with the sender's PID (what NotifyAccess=main checks)."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(2)

    def receive(self) -> tuple[str, int]:
        size = struct.calcsize("3i")
        data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(size))
        pids = [struct.unpack("3i", cdata[:size])[0] for level, kind, cdata in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
        return data.decode("utf-8"), pids[0]

    def nothing_waiting(self) -> bool:
        self.sock.settimeout(0.05)
        try:
            self.sock.recv(4096)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(2)
        return False

    def close(self):
        self.sock.close()


@pytest.fixture
def path_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify"
    if len(os.fsencode(path)) > 100:  # sun_path holds 108 bytes
        path = tmp_path.parent / f"n{uuid.uuid4().hex[:8]}"
    receiver = Receiver(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield receiver
    receiver.close()


@pytest.fixture
def abstract_socket(monkeypatch):
    name = f"callguard-test-{uuid.uuid4().hex}"
    receiver = Receiver("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield receiver
    receiver.close()


@pytest.fixture(params=["path", "abstract"])
def receiver(request):
    return request.getfixturevalue(f"{request.param}_socket")


def test_unset_or_empty_notify_socket_is_a_silent_false(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready(status="x") is False
    assert sdnotify.stopping() is False
    assert sdnotify.status("x") is False
    assert sdnotify.watchdog() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.ready() is False


@pytest.mark.parametrize("value", ["relative/notify", "notify", "vsock:2:1234"])
def test_an_address_that_is_neither_a_path_nor_abstract_is_false(monkeypatch, value):
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


def test_nobody_listening_is_false_not_an_exception(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent"))
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@callguard-test-absent-{uuid.uuid4().hex}")
    assert sdnotify.ready() is False
    (tmp_path / "plain").write_text("not a socket")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "plain"))
    assert sdnotify.ready() is False


def test_ready_sends_one_datagram_from_this_process(receiver):
    assert sdnotify.ready() is True
    assert receiver.receive() == ("READY=1", os.getpid())


def test_ready_with_a_status_is_one_datagram_of_two_lines(receiver):
    assert sdnotify.ready(status="serving FastAGI on 127.0.0.1:4573 (node n1)") is True
    text, _ = receiver.receive()
    assert text == "READY=1\nSTATUS=serving FastAGI on 127.0.0.1:4573 (node n1)"
    assert receiver.nothing_waiting()


def test_status_folds_newlines_so_it_stays_one_assignment(receiver):
    assert sdnotify.status("AMI down:\nconnection refused\r\nreconnecting") is True
    assert receiver.receive()[0] == "STATUS=AMI down: connection refused reconnecting"


def test_stopping_watchdog_and_extend_timeout(receiver):
    assert sdnotify.stopping() is True
    assert receiver.receive()[0] == "STOPPING=1"
    assert sdnotify.stopping(status="finishing 3 commits") is True
    assert receiver.receive()[0] == "STOPPING=1\nSTATUS=finishing 3 commits"
    assert sdnotify.watchdog() is True
    assert receiver.receive()[0] == "WATCHDOG=1"
    assert sdnotify.extend_timeout(7.5) is True
    assert receiver.receive()[0] == "EXTEND_TIMEOUT_USEC=7500000"


def test_notify_sends_the_state_as_given_and_nothing_for_an_empty_one(receiver):
    assert sdnotify.notify("STATUS=a\nMAINPID=1") is True
    assert receiver.receive()[0] == "STATUS=a\nMAINPID=1"
    assert sdnotify.notify("") is False
    assert receiver.nothing_waiting()


def test_utf8_status(receiver):
    assert sdnotify.status("Zürich: 3 Anrufe") is True
    assert receiver.receive()[0] == "STATUS=Zürich: 3 Anrufe"


def test_notify_reads_the_environment_it_is_given(path_socket, monkeypatch):
    env = {"NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"]}
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.notify("READY=1", env=env) is True
    assert path_socket.receive()[0] == "READY=1"
    assert sdnotify.notify("READY=1") is False


def test_a_full_queue_costs_at_most_the_send_timeout_then_false(path_socket, monkeypatch):
    monkeypatch.setattr(sdnotify, "SEND_TIMEOUT", 0.05)
    for i in range(5000):  # the receiver never reads, so its queue fills up
        started = time.monotonic()
        if not sdnotify.status(f"n {i}"):
            break
    else:
        pytest.fail("5000 datagrams queued and none refused")
    assert i > 0 and time.monotonic() - started < 1
    # It was not a dead socket: the first ones arrived.
    assert path_socket.receive()[0] == "STATUS=n 0"


# --- the watchdog -------------------------------------------------------------------------


def test_no_watchdog_without_watchdog_usec():
    assert sdnotify.watchdog_timeout({}) is None
    assert sdnotify.watchdog_interval({}) is None


def test_watchdog_interval_is_half_of_watchdog_usec():
    env = {"WATCHDOG_USEC": "30000000"}
    assert sdnotify.watchdog_timeout(env) == 30.0
    assert sdnotify.watchdog_interval(env) == 15.0
    env["WATCHDOG_PID"] = str(os.getpid())
    assert sdnotify.watchdog_interval(env) == 15.0


def test_watchdog_meant_for_another_process_is_off():
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert sdnotify.watchdog_interval(env) is None


@pytest.mark.parametrize("env", [{"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "-5"},
                                 {"WATCHDOG_USEC": "soon"}, {"WATCHDOG_USEC": ""},
                                 {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"}])
def test_malformed_watchdog_variables_are_off(env):
    assert sdnotify.watchdog_interval(env) is None


def test_watchdog_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 1.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert sdnotify.watchdog_interval() is None
