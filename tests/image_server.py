"""A local image server for URL tests (not a test module): serves fixed bytes on 127.0.0.1 and records
every request, so a test can prove that a URL was fetched, or never was."""

from __future__ import annotations

import http.server
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"


@dataclass
class LocalImageServer:
    """Where :func:`local_image_server` listens (``url``, no trailing slash), and the paths it was asked for."""

    url: str
    hits: list[str] = field(default_factory=list)


class _QuickHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), which can stall for seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = LOOPBACK, self.server_address[1]


@contextmanager
def local_image_server(body: bytes, content_type: str = "image/png") -> Iterator[LocalImageServer]:
    """Serve ``body`` at every path of ``http://127.0.0.1:<port>`` in a thread, recording each path."""
    info = LocalImageServer(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            info.hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = _QuickHTTPServer((LOOPBACK, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    info.url = f"http://{LOOPBACK}:{server.server_address[1]}"
    try:
        yield info
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
