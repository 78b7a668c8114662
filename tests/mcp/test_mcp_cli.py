"""``hd4k mcp`` options: the README's client snippet, settings from options, refusals before anything loads."""

from __future__ import annotations

import json
import re
import socket
import sys
import tomllib
from pathlib import Path

import pytest
from anyio.from_thread import start_blocking_portal
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp_support import REPO, environment

from hd4k_tools.agent_tools import TOOL_DESCRIPTIONS, ToolSettings
from hd4k_tools.cli.args import EXIT_ERROR
from hd4k_tools.cli.main import build_parser, main
from hd4k_tools.mcp import cli as mcp_cli
from hd4k_tools.runtime.engines import engine_class
from hd4k_tools.runtime.remote import RemoteRunner


def _readme_config() -> dict:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## MCP\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```json\n(.*?)```", section, flags=re.S)
    return json.loads(block)["mcpServers"]["hd4k"]


def test_readme_client_snippet_parses() -> None:
    config = _readme_config()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    # The full path of the console script in the README's virtual environment (clients do not see the venv).
    assert config["command"].endswith("/.venv/bin/hd4k")
    assert scripts[Path(config["command"]).name] == "hd4k_tools.cli:main"
    args = build_parser().parse_args(config["args"])
    assert args.func is mcp_cli.run_from_args
    assert args.transport == "stdio"
    assert args.engine == "native"
    assert args.model == "/models/internlm-xcomposer2-4khd-7b"
    assert args.allowed_root == Path("/home/me/Documents")


@pytest.mark.slow
def test_readme_client_snippet_runs_as_written(tiny_checkpoint: Path, mcp_root: Path, tmp_path: Path) -> None:
    """The snippet's command and arguments, with only the two paths swapped for the tiny checkpoint and a test
    folder, serve the tools over stdio to the SDK's client."""
    config = _readme_config()
    command = Path(sys.executable).with_name(Path(config["command"]).name)
    if not command.exists():
        pytest.skip(f"the console script {command} is not installed next to this interpreter")
    swap = {"/models/internlm-xcomposer2-4khd-7b": str(tiny_checkpoint), "/home/me/Documents": str(mcp_root)}
    args = [swap.get(a, a) for a in config["args"]] + ["--max-new-tokens", "2", "--device", "cpu"]
    params = StdioServerParameters(command=str(command), args=args, env=environment())
    with (tmp_path / "stderr.txt").open("w") as errlog, start_blocking_portal() as portal:
        client = Client(stdio_client(params, errlog=errlog), read_timeout_seconds=120)
        with portal.wrap_async_context_manager(client) as connected:
            names = [t.name for t in portal.call(connected.list_tools).tools]
            result = portal.call(lambda: connected.call_tool("describe_image", {"image": "photo.png", "hd_num": 1}))
    assert names == list(TOOL_DESCRIPTIONS)
    assert not result.is_error, result.content[0].text
    assert result.structured_content["pages"][0]["plan"]["input_size"] == [400, 300]


def test_options_become_tool_settings(tmp_path: Path) -> None:
    parser = mcp_cli.build_parser()
    defaults = mcp_cli.tool_settings(parser.parse_args([]))
    assert defaults == ToolSettings()
    limits = ["--max-pixels", "1000", "--max-image-bytes", "2000", "--max-pdf-pages", "3", "--max-new-tokens", "4"]
    args = parser.parse_args(["--allowed-root", str(tmp_path), "--allow-urls", *limits, "--num-beams", "2"])
    assert mcp_cli.tool_settings(args) == ToolSettings(
        allowed_root=tmp_path.resolve(),
        allow_urls=True,
        max_pixels=1000,
        max_bytes=2000,
        max_pdf_pages=3,
        max_new_tokens=4,
        num_beams=2,
    )


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["mcp", *argv]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("hd4k: error: ") and err.count("\n") == 1, err
    return err


def test_bad_options_fail_in_one_line_before_loading(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing_model = ["--model", str(tmp_path / "no-model")]
    assert "is not a folder" in _run(capsys, "--allowed-root", str(tmp_path / "nope"), *missing_model)
    assert "--num-beams" in _run(capsys, "--num-beams", "99", *missing_model)
    assert "--port must be a number from 0 to 65535" in _run(capsys, "--port", "70000", *missing_model)
    assert "invalid choice: 'loud'" in _run(capsys, "--log-level", "loud", *missing_model)
    assert "do not combine" in _run(capsys, "--remote", "http://127.0.0.1:1/v1", "--engine", "vllm")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        err = _run(capsys, "--transport", "streamable-http", "--port", port, *missing_model)
    assert f"cannot listen on 127.0.0.1:{port}" in err


def test_vllm_engine_is_refused_by_name_when_missing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    try:
        engine_class("vllm")
    except ImportError:
        pass
    else:
        pytest.skip("this installation has the vLLM engine; its own errors apply")
    err = _run(capsys, "--engine", "vllm", "--model", str(tmp_path))
    assert "hd4k-tools[vllm]" in err
    assert "--engine vllm" in err or "'vllm' engine" in err


def test_remote_engine_is_the_server_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HD4K_API_KEY", "secret")
    args = mcp_cli.build_parser().parse_args(["--remote", "http://127.0.0.1:9/v1", "--remote-model", "ixc-4khd"])
    with mcp_cli.open_hd4k(args) as hd:  # nothing is contacted until a call
        assert isinstance(hd.runner, RemoteRunner)
        assert hd.model_id == "ixc-4khd"


def test_missing_sdk_names_the_extra(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mcp.server", None)  # as if the SDK were not installed
    err = _run(capsys, "--model", "/nonexistent")
    assert "pip install 'hd4k-tools[mcp]'" in err


def test_missing_model_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _run(capsys, "--model", str(tmp_path / "no-such-model"))
    assert "no-such-model" in err
