"""The fault-injecting TCP proxy the network-cut tests rely on, against a local echo server."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.fixtures.tcp_proxy import TcpProxy


class EchoServer:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
        for conn in self.conns:
            conn.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", echo.port) as p:
        yield p


def connect(proxy: TcpProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=2)


def assert_refused(proxy: TcpProxy) -> None:
    """The connection is reset at once (possibly while it is still being set up)."""
    with pytest.raises(OSError):
        with connect(proxy) as sock:
            sock.sendall(b"x")
            if not sock.recv(1):
                raise ConnectionResetError("closed without a reset")


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_forwards_both_ways_including_large_payloads(proxy: TcpProxy) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock, b"ping") == b"ping"
        big = bytes(range(256)) * 4096  # 1 MiB: exercises back-pressure
        assert roundtrip(sock, big) == big


def test_reset_closes_open_connections_and_refuses_new_ones(proxy: TcpProxy) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock, b"a") == b"a"
        proxy.cut("reset")
        with pytest.raises(OSError):
            sock.sendall(b"b")
            if not sock.recv(1):
                raise ConnectionResetError("closed")
    assert_refused(proxy)
    proxy.restore()
    with connect(proxy) as sock:
        assert roundtrip(sock, b"back") == b"back"


def test_drop_goes_silent_and_restore_resets_what_was_dropped(proxy: TcpProxy) -> None:
    with connect(proxy) as old:
        assert roundtrip(old, b"a") == b"a"
        proxy.cut("drop")
        old.settimeout(0.3)
        old.sendall(b"lost")
        with pytest.raises(TimeoutError):
            old.recv(10)
        with connect(proxy) as new:  # accepted, then ignored
            new.settimeout(0.3)
            new.sendall(b"x")
            with pytest.raises(TimeoutError):
                new.recv(10)
        proxy.restore()
        old.settimeout(2)
        with pytest.raises(OSError):
            if not old.recv(10):
                raise ConnectionResetError("closed")
    with connect(proxy) as sock:
        assert roundtrip(sock, b"fine") == b"fine"


def test_restore_can_leave_dropped_connections_silent_for_good(proxy: TcpProxy) -> None:
    with connect(proxy) as old:
        assert roundtrip(old, b"a") == b"a"
        proxy.cut("drop")
        proxy.restore(keep_dropped=True)
        with connect(proxy) as new:
            assert roundtrip(new, b"new works") == b"new works"
        old.settimeout(0.3)
        old.sendall(b"still lost")
        with pytest.raises(TimeoutError):
            old.recv(10)


def test_rewrite_keeps_user_path_and_query(proxy: TcpProxy) -> None:
    assert proxy.rewrite("postgresql://u:pw@10.0.0.9:5432/db?sslmode=disable") == (
        f"postgresql://u:pw@127.0.0.1:{proxy.port}/db?sslmode=disable"
    )
    assert proxy.rewrite("redis://127.0.0.1:6379/0") == f"redis://127.0.0.1:{proxy.port}/0"


def test_server_down_means_refused(echo: EchoServer) -> None:
    with TcpProxy("127.0.0.1", echo.port) as proxy:
        echo.close()
        assert_refused(proxy)
