"""Tests for hd4k_tools.inputs.urlfetch against a real HTTP server on 127.0.0.1 (never any other address)."""

from __future__ import annotations

import io
import ipaddress
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from PIL import Image

from hd4k_tools import errors
from hd4k_tools.inputs.images import load_image, read_source_bytes
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.inputs.urlfetch import address_refusal, fetch_url, redact_url

LOOPBACK = "127.0.0.1"


def _png() -> bytes:
    pixels = np.random.RandomState(7).randint(0, 256, (12, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()


class _Handler(BaseHTTPRequestHandler):
    stop: threading.Event

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        routes = {
            "/image.png": lambda: self._send(200, PNG, "image/png"),
            "/missing": lambda: self._send(404, b"nope", "text/plain"),
            "/redirect-relative": lambda: self._redirect("/image.png"),
            "/redirect-localhost": lambda: self._redirect(f"http://localhost:{port}/image.png"),
            "/redirect-metadata": lambda: self._redirect("http://169.254.169.254/latest/meta-data"),
            "/redirect-file": lambda: self._redirect("file:///etc/passwd"),
            "/redirect-loop": lambda: self._redirect("/redirect-loop"),
            "/big-declared": self._big_declared,
            "/big-undeclared": self._big_undeclared,
            "/slow": self._slow,
            "/echo-host": lambda: self._send(200, (self.headers.get("Host") or "").encode(), "text/plain"),
        }
        route = routes.get(self.path.split("?")[0])
        if route is None:
            self._send(404, b"", "text/plain")
        else:
            route()

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _big_declared(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(10_000_000))
        self.end_headers()
        self._write_quietly(b"\x00" * 1024)

    def _big_undeclared(self) -> None:
        self.send_response(200)
        self.end_headers()  # HTTP/1.0 without Content-Length: the body ends when we close
        for _ in range(64):
            if not self._write_quietly(b"\x00" * 16384):
                return

    def _slow(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        for _ in range(1000):
            if self.stop.is_set() or not self._write_quietly(b"x"):
                return
            self.stop.wait(0.02)

    def _write_quietly(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client hung up, which is what these routes expect
            return False
        return True


class _QuickServer(ThreadingHTTPServer):
    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) that can take a second.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = LOOPBACK, self.server_address[1]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    stop = threading.Event()
    handler = type("Handler", (_Handler,), {"stop": stop})
    httpd = _QuickServer((LOOPBACK, 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{httpd.server_address[1]}"
    finally:
        stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record every outgoing TCP connection, and refuse any that is not to loopback."""
    made: list[tuple[str, int]] = []
    real = socket.create_connection

    def guarded(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        made.append(address)
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"test tried to connect to {address}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    return made


@pytest.fixture
def policy() -> ImagePolicy:
    return ImagePolicy(allow_urls=True, allowed_private_hosts=frozenset({LOOPBACK}), url_timeout=5.0)


def test_image_from_url(server: str, policy: ImagePolicy) -> None:
    loaded = load_image(f"{server}/image.png", policy=policy)
    expected = np.asarray(Image.open(io.BytesIO(PNG)).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(loaded), expected)
    raw = read_source_bytes(f"{server}/image.png", policy=policy)
    assert raw.kind == "image"
    assert raw.name == f"<url {server}/image.png>"


def test_urls_are_refused_unless_allowed(server: str) -> None:
    with pytest.raises(errors.URLNotAllowedError, match="allow_urls=True"):
        load_image(f"{server}/image.png")


def test_loopback_is_refused_unless_allow_listed(server: str, connections: list[Any]) -> None:
    with pytest.raises(errors.URLNotAllowedError, match=r"loopback.*allowed_private_hosts"):
        load_image(f"{server}/image.png", allow_urls=True)
    assert connections == []
    assert load_image(f"{server}/image.png", allow_urls=True, allow_private_urls=True).size == (16, 12)


def test_relative_redirect_is_followed(server: str, policy: ImagePolicy) -> None:
    fetched = fetch_url(f"{server}/redirect-relative", policy=policy)
    assert fetched.data == PNG
    assert fetched.url == f"{server}/image.png"
    assert fetched.content_type == "image/png"


def test_redirect_to_localhost_is_refused(server: str, policy: ImagePolicy) -> None:
    with pytest.raises(errors.URLNotAllowedError, match=r"redirected to a refused URL.*loopback"):
        load_image(f"{server}/redirect-localhost", policy=policy)


def test_redirect_to_metadata_address_is_refused_before_connecting(
    server: str, policy: ImagePolicy, connections: list[tuple[str, int]]
) -> None:
    with pytest.raises(
        errors.URLNotAllowedError, match=r"redirected to a refused URL.*169\.254\.169\.254, a link-local address"
    ):
        load_image(f"{server}/redirect-metadata", policy=policy)
    assert connections, "the first hop should have connected to the test server"
    assert all(host == LOOPBACK for host, _ in connections)


def test_redirect_to_another_scheme_is_refused(server: str, policy: ImagePolicy) -> None:
    with pytest.raises(errors.URLNotAllowedError, match="use http:// or https://"):
        fetch_url(f"{server}/redirect-file", policy=policy)


def test_too_many_redirects(server: str, policy: ImagePolicy) -> None:
    with pytest.raises(errors.URLFetchError, match="max_redirects=3"):
        fetch_url(f"{server}/redirect-loop", policy=policy)
    with pytest.raises(errors.URLFetchError, match="max_redirects=0"):
        fetch_url(f"{server}/redirect-relative", policy=replace(policy, max_redirects=0))


@pytest.mark.parametrize("route", ["/big-declared", "/big-undeclared"])
def test_too_big_body_is_aborted(server: str, policy: ImagePolicy, route: str) -> None:
    small = replace(policy, max_bytes=50_000)
    started = time.monotonic()
    with pytest.raises(errors.FileTooLargeError, match=r"max_bytes=50,000.*stopped"):
        fetch_url(f"{server}{route}", policy=small)
    assert time.monotonic() - started < 2.0


def test_slow_drip_hits_the_overall_deadline(server: str, policy: ImagePolicy) -> None:
    quick = replace(policy, url_timeout=0.4)
    started = time.monotonic()
    with pytest.raises(errors.URLFetchError, match=r"url_timeout=0\.4"):
        fetch_url(f"{server}/slow", policy=quick)
    elapsed = time.monotonic() - started
    assert 0.35 <= elapsed < 1.0  # each byte arrives within the read timeout: only the deadline stops it


def test_404(server: str, policy: ImagePolicy) -> None:
    with pytest.raises(errors.URLFetchError, match=r"HTTP 404.*check the URL"):
        load_image(f"{server}/missing", policy=policy)


def test_connection_refused(policy: ImagePolicy) -> None:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    with pytest.raises(errors.URLFetchError, match=r"connection failed.*server is up") as info:
        load_image(f"http://{LOOPBACK}:{port}/a.png", policy=policy)
    assert isinstance(info.value, ConnectionError)


def test_credentials_are_stripped_from_messages(server: str, policy: ImagePolicy) -> None:
    url = server.replace("http://", "http://alice:hunter2@") + "/missing"
    with pytest.raises(errors.URLFetchError) as info:
        fetch_url(url, policy=policy)
    assert "hunter2" not in str(info.value)
    assert "alice" not in str(info.value)
    assert redact_url("https://u:p@example.com/x?y=1") == "https://example.com/x?y=1"


def test_dns_failure(monkeypatch: pytest.MonkeyPatch, policy: ImagePolicy) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(errors.URLFetchError, match=r"cannot resolve.*check the host name"):
        fetch_url("http://no-such-host.invalid/a.png", policy=policy)


def test_any_private_address_among_several_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(errors.URLNotAllowedError, match=r"10\.1\.2\.3, a private address"):
        fetch_url("http://mixed.example/a.png", policy=ImagePolicy(allow_urls=True))


def test_connection_is_pinned_to_the_checked_address(
    server: str, monkeypatch: pytest.MonkeyPatch, connections: list[tuple[str, int]]
) -> None:
    """DNS rebinding: the name is resolved once per hop; a second answer would never be used."""
    port = int(server.rsplit(":", 1)[1])
    real = socket.getaddrinfo
    answers = iter([LOOPBACK, "10.9.9.9"])
    lookups: list[str] = []

    def rebinding(host: str, *args: Any, **kwargs: Any) -> Any:
        if host != "pinned.test":
            return real(host, *args, **kwargs)
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    policy = ImagePolicy(allow_urls=True, allowed_private_hosts=frozenset({"pinned.test"}))
    fetched = fetch_url(f"http://pinned.test:{port}/echo-host", policy=policy)
    assert fetched.data == f"pinned.test:{port}".encode()  # the Host header keeps the name
    assert lookups == ["pinned.test"]
    assert connections == [(LOOPBACK, port)]


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "not globally routable"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fd00::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_address_refusal(address: str, refused: str | None) -> None:
    reason = address_refusal(address)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1]:9/x.png",
        "http://2130706433:9/x.png",  # 127.0.0.1 as one decimal number
        "http://0x7f000001:9/x.png",
        "http://127.1:9/x.png",
        "http://[::ffff:127.0.0.1]:9/x.png",
    ],
)
def test_disguised_loopback_hosts_are_refused(url: str, connections: list[tuple[str, int]]) -> None:
    with pytest.raises(errors.URLNotAllowedError, match="loopback"):
        load_image(url, allow_urls=True)
    assert connections == []
