"""The framework-neutral agent tools: settings that fail loudly, and per-host URL allowances."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

import pytest
from image_server import LOOPBACK, LocalImageServer, local_image_server
from PIL import Image
from pydantic import ValidationError

from hd4k_tools import HD4K, AgentTools, ImageRegistry, ToolSettings
from hd4k_tools.errors import CancelledError, InputError, URLNotAllowedError


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


# ----------------------------------------------------------------------------------------------------
# Hooks for protocol servers (hd4k mcp): untrusted argument dicts, cancellation, page progress
# ----------------------------------------------------------------------------------------------------
def _pdf(pages: int) -> bytes:
    images = [Image.new("RGB", (200, 280), (30 * i, 90, 160)) for i in range(pages)]
    buf = io.BytesIO()
    images[0].save(buf, "PDF", save_all=True, append_images=images[1:], resolution=72.0)
    return buf.getvalue()


def test_invoke_names_the_valid_arguments(hd4k_tiny: HD4K) -> None:
    tools = AgentTools(hd4k_tiny, ToolSettings(max_new_tokens=2))
    with pytest.raises(InputError, match=r"Invalid arguments for describe_image: .*detial.*Its arguments are: image"):
        tools.invoke("describe_image", {"image": "image://x", "detial": "brief"})
    with pytest.raises(InputError, match="Unknown tool 'delete'"):
        tools.invoke("delete", {})


def test_invoke_reports_pages_and_stops_when_cancelled(hd4k_tiny: HD4K) -> None:
    tools = AgentTools(hd4k_tiny, ToolSettings(max_new_tokens=2))
    ref = tools.registry.add(_pdf(3))
    seen: list[tuple[int, int]] = []
    answer = tools.invoke("read_document", {"image": ref, "hd_num": 1}, on_page=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert [p.page for p in answer.result.pages] == [1, 2, 3]

    cancel = threading.Event()
    seen.clear()

    def cancel_after_first(done: int, total: int) -> None:
        seen.append((done, total))
        if done == 1:
            cancel.set()

    with pytest.raises(CancelledError):
        tools.invoke("read_document", {"image": ref, "hd_num": 1}, cancel=cancel, on_page=cancel_after_first)
    assert seen == [(0, 3), (1, 3)]


def test_invoke_never_returns_a_cancelled_answer(hd4k_tiny: HD4K) -> None:
    """A single image has no page boundary: the cut generation must still raise, not look complete."""
    tools = AgentTools(hd4k_tiny, ToolSettings(max_new_tokens=4))
    ref = tools.registry.add(Image.new("RGB", (64, 64)))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        tools.invoke("describe_image", {"image": ref, "hd_num": 1}, cancel=cancel)


def test_registry_bound_forgets_the_oldest_image() -> None:
    registry = ImageRegistry(max_images=2)
    first, second = registry.add(b"1"), registry.add(b"2")
    registry.add(b"1-again", name=first)  # re-adding makes it the newest
    third = registry.add(b"3")
    assert registry.refs() == [first, third]
    with pytest.raises(InputError, match="No image is registered"):
        registry.get(second)
    with pytest.raises(ValueError, match="max_images"):
        ImageRegistry(max_images=0)
