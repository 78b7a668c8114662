"""``hd4k mcp`` over streamable HTTP at its edges (issue 21 item 6), driven with raw HTTP the way a 2025-era
client (initialize handshake) speaks it: closing a ``read_document`` call's stream cancels it within a page;
``Host`` and ``Origin`` are checked on every bind (loopback by default, ``--allowed-host`` /
``--allowed-origin`` when bound wider); error texts name ``hd4k mcp``'s own options."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("mcp", reason="the MCP tests need the 'mcp' extra")
from mcp_support import CALL_TIMEOUT_S, start_http_server, stop, wait_for

from hd4k_tools.errors import PathNotAllowedError, URLNotAllowedError
from hd4k_tools.inputs.images import load_image
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.mcp.cli import main, transport_security
from hd4k_tools.mcp.server import mcp_error_text

PROTOCOL = "2025-06-18"
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


class RawSession:
    """A 2025-era MCP session over plain HTTP (what many clients still speak)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.http = httpx.Client(timeout=CALL_TIMEOUT_S)
        self.headers = {**ACCEPT, **(headers or {})}
        self.next_id = 1

    def post(self, body: dict[str, Any], **headers: str) -> httpx.Response:
        return self.http.post(self.url, headers={**self.headers, **headers}, json=body)

    def initialize(self, **headers: str) -> httpx.Response:
        body = {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}
        response = self.post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": body}, **headers)
        if response.status_code == 200:
            self.headers.update(
                {"mcp-session-id": response.headers["mcp-session-id"], "mcp-protocol-version": PROTOCOL}
            )
            self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return response

    def call_body(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        params = {"name": name, "arguments": arguments, "_meta": {"progressToken": f"p{self.next_id}"}}
        return {"jsonrpc": "2.0", "id": self.next_id, "method": "tools/call", "params": params}

    def call(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """The call's JSON-RPC result (the last SSE event of its stream)."""
        response = self.post(self.call_body(name, arguments))
        events = [
            json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:") and line[5:].strip()
        ]
        return events[-1]["result"]

    def close(self) -> None:
        self.http.close()


@pytest.fixture(scope="module")
def loopback(tiny_checkpoint: Path, mcp_root: Path) -> Iterator[tuple[str, list[str]]]:
    lines: list[str] = []
    proc, url = start_http_server(tiny_checkpoint, mcp_root, lines)
    yield url, lines
    stop(proc)


# ----------------------------------------------------------------------------------------------------
# Closing the stream cancels the call
# ----------------------------------------------------------------------------------------------------
def test_closing_a_read_document_stream_cancels_it_within_a_page(loopback: tuple[str, list[str]]) -> None:
    url, lines = loopback
    session = RawSession(url)
    try:
        assert session.initialize().status_code == 200
        progress: list[float] = []
        with session.http.stream(
            "POST",
            url,
            headers=session.headers,
            json=session.call_body("read_document", {"image": "long.pdf", "hd_num": 1}),
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if '"notifications/progress"' in line:
                    progress.append(json.loads(line[5:])["params"]["progress"])
                    if progress[-1] >= 1:  # one page read: close the stream now
                        break
        stopped = re.compile(r"tool read_document stopped after the cancellation \((\d+) of 20 pages read\)")
        wait_for(lambda: stopped.search("".join(lines)) is not None, timeout=60)
        pages_read = int(stopped.search("".join(lines)).group(1))
        assert pages_read <= progress[-1] + 1, (pages_read, progress)  # the page in flight at most
        # The model is free: the next call is answered.
        result = session.call("describe_image", {"image": "photo.png", "hd_num": 1, "detail": "brief"})
        assert not result.get("isError"), result
    finally:
        session.close()


# ----------------------------------------------------------------------------------------------------
# Host and Origin
# ----------------------------------------------------------------------------------------------------
def test_loopback_server_checks_origin_and_host(loopback: tuple[str, list[str]]) -> None:
    url, _ = loopback
    port = url.split(":")[2].split("/")[0]
    session = RawSession(url)
    try:
        assert session.initialize(Origin="http://evil.example").status_code == 403
        assert session.initialize(Host=f"evil.example:{port}").status_code == 421
        assert session.initialize(Host=f"localhost:{port}", Origin="http://localhost:3000").status_code == 200
    finally:
        session.close()


def test_a_wider_bind_allows_the_named_hosts_and_origins_only(tiny_checkpoint: Path, mcp_root: Path) -> None:
    # 127.0.0.2 is a loopback address the server does not treat as loopback: the code path of a LAN bind,
    # without exposing the test server to the network.
    lines: list[str] = []
    extra = ["--allowed-host", "mcp.test", "--allowed-origin", "https://app.example"]
    proc, url = start_http_server(tiny_checkpoint, mcp_root, lines, host="127.0.0.2", extra=extra)
    port = url.split(":")[2].split("/")[0]
    try:
        for headers, status in [
            ({}, 200),  # Host 127.0.0.2:port, the bound address
            ({"Host": f"mcp.test:{port}"}, 200),
            ({"Host": "mcp.test"}, 200),
            ({"Host": f"mcp.test:{port}", "Origin": "https://app.example"}, 200),
            ({"Host": f"evil.example:{port}"}, 421),
            ({"Origin": "http://evil.example"}, 403),
            ({"Host": f"mcp.test:{port}", "Origin": "https://evil.example"}, 403),
        ]:
            session = RawSession(url)
            try:
                assert session.initialize(**headers).status_code == status, (headers, status)
            finally:
                session.close()
    finally:
        stop(proc)


def test_a_wildcard_bind_needs_allowed_host_and_fails_before_loading(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "no-model")
    code = main(["--transport", "streamable-http", "--host", "0.0.0.0", "--model", missing])
    assert code == 2
    err = capsys.readouterr().err
    assert "--allowed-host" in err and "no-model" not in err
    settings = transport_security("0.0.0.0", ["gpu-box.lan"], ["https://app.example"])
    assert {"gpu-box.lan", "gpu-box.lan:*"} <= set(settings.allowed_hosts)
    assert {"https://app.example", "https://app.example:*"} <= set(settings.allowed_origins)
    assert "http://evil.example" not in settings.allowed_origins
    with pytest.raises(Exception, match="--allowed-origin"):
        transport_security("127.0.0.1", [], ["not an origin"])


# ----------------------------------------------------------------------------------------------------
# Error texts name hd4k mcp's options
# ----------------------------------------------------------------------------------------------------
def test_error_texts_name_the_mcp_options(tmp_path: Path) -> None:
    (tmp_path / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(PathNotAllowedError) as refused:
        load_image(tmp_path / "secret.png", policy=ImagePolicy(allowed_roots=(tmp_path / "root",)))
    text = mcp_error_text(refused.value)
    assert "--allowed-root" in text and "allowed_roots" not in text and "ToolSettings" not in text
    text = mcp_error_text(URLNotAllowedError("URLs are disabled for this tool. Pass a file path."))
    assert "--allow-urls" in text


def test_a_path_outside_the_root_names_allowed_root_end_to_end(loopback: tuple[str, list[str]]) -> None:
    url, _ = loopback
    session = RawSession(url)
    try:
        assert session.initialize().status_code == 200
        result = session.call("describe_image", {"image": "../secret.png"})
        text = result["content"][0]["text"]
        assert result["isError"] and "--allowed-root" in text and "allowed_roots" not in text, text
    finally:
        session.close()
