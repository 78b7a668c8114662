"""The framework-neutral agent tools: settings that fail loudly, and per-host URL allowances."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from image_server import LOOPBACK, LocalImageServer, local_image_server
from PIL import Image
from pydantic import ValidationError

from hd4k_tools import HD4K, AgentTools, ToolSettings
from hd4k_tools.errors import URLNotAllowedError


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 60)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def image_server() -> Iterator[LocalImageServer]:
    with local_image_server(_png(500, 300)) as server:
        yield server


def test_unknown_settings_are_refused() -> None:
    """A misspelt limit must not silently leave the default in force."""
    with pytest.raises(ValidationError, match="allowed_private_host"):
        ToolSettings(allowed_private_host=["10.0.0.5"])  # type: ignore[call-arg]


def test_allowed_private_hosts_reach_the_policy() -> None:
    policy = ToolSettings(allow_urls=True, allowed_private_hosts=frozenset({"Images.Intranet."})).image_policy()
    assert policy.allowed_private_hosts == frozenset({"images.intranet"})
    assert not policy.allow_private_urls


def test_one_allowed_private_host_and_no_other(hd4k_tiny: HD4K, image_server: LocalImageServer) -> None:
    base, hits = image_server.url, image_server.hits
    settings = ToolSettings(allow_urls=True, allowed_private_hosts=frozenset({LOOPBACK}), max_new_tokens=2)
    tools = AgentTools(hd4k_tiny, settings)
    answer = tools.describe_image(f"{base}/photo.png", hd_num=4)
    assert hits == ["/photo.png"]
    assert answer.result.plan.input_size == (500, 300)
    # Other loopback names stay refused, before any connection.
    port = base.rsplit(":", 1)[1]
    with pytest.raises(URLNotAllowedError, match="allowed_private_hosts"):
        tools.describe_image(f"http://localhost:{port}/photo.png", hd_num=4)
    assert hits == ["/photo.png"]
    # Without the allowance the very same URL is refused too.
    with pytest.raises(URLNotAllowedError):
        AgentTools(hd4k_tiny, ToolSettings(allow_urls=True)).describe_image(f"{base}/photo.png")
    assert hits == ["/photo.png"]


def test_beams_per_tool_call_are_bounded() -> None:
    assert ToolSettings(num_beams=16).generation() == {"num_beams": 16}
    with pytest.raises(ValidationError, match="less than or equal to 16"):
        ToolSettings(num_beams=17)
