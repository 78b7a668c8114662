"""``hd4k mcp``: serve the three tools to MCP clients over stdio or streamable HTTP (extra ``mcp``).

    hd4k mcp --model /models/internlm-xcomposer2-4khd-7b --allowed-root ~/Documents
    hd4k mcp --transport streamable-http --port 8765 --allowed-root ~/scans --remote http://gpu-box:8000/v1

The model loads before the server answers (a bad ``--model`` fails at once, with the usual one-line error);
for HTTP the port is bound first, so a port in use fails before the model loads. ``--port 0`` picks a free
port. The address served is printed on stderr; stdout belongs to the stdio transport.

Over HTTP every request's ``Host`` and ``Origin`` are checked (the MCP specification asks servers to
validate ``Origin``; DNS-rebinding protection), on every bind: on loopback the loopback names (any port)
are allowed; bound wider, the hosts clients use must be named with ``--allowed-host`` (a specific address
is allowed by default; ``0.0.0.0`` / ``::`` has no default and refuses to start without one), and web
origins with ``--allowed-origin``. A request without ``Origin`` (not a browser) passes the origin check.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from pydantic import ValidationError

from hd4k_tools.agent_tools import AgentTools, ImageRegistry, ToolSettings
from hd4k_tools.arguments import add_model_argument
from hd4k_tools.errors import CLI, HD4KError, InputError, MissingDependencyError
from hd4k_tools.hd4k import HD4K
from hd4k_tools.runtime.engines import ENGINES, engine_class

TRANSPORTS = ("stdio", "streamable-http")
DEFAULT_PORT = 8765
MCP_PATH = "/mcp"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# ToolSettings fields set from options (None: the option was not given, ToolSettings' default applies).
_SETTING_OPTIONS = {
    "allowed_root": "allowed_root",
    "allow_urls": "allow_urls",
    "max_pixels": "max_pixels",
    "max_image_bytes": "max_bytes",
    "max_pdf_pages": "max_pdf_pages",
    "max_new_tokens": "max_new_tokens",
    "num_beams": "num_beams",
}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of ``hd4k mcp`` (``python -m hd4k_tools.mcp`` has the same)."""
    p = parser or argparse.ArgumentParser(
        prog="python -m hd4k_tools.mcp", description="Serve the hd4k tools to MCP clients."
    )
    p.add_argument("--transport", choices=TRANSPORTS, default="stdio", help="stdio (default) or streamable-http")
    p.add_argument("--host", default="127.0.0.1", help="address for streamable-http (default: loopback only)")
    p.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"port for streamable-http (default {DEFAULT_PORT}; 0: any)"
    )
    add_model_argument(p)
    p.add_argument(
        "--engine", choices=sorted(ENGINES), default="native", help="native PyTorch in this process (default) or vllm"
    )
    p.add_argument("--remote", default=None, metavar="BASE_URL", help="use an OpenAI-compatible server instead")
    p.add_argument("--remote-model", default=None, metavar="NAME", help="model name on the server (default: --model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default)")
    p.add_argument(
        "--allowed-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder the tools may read files from (default: none, images come as data: URLs or image content)",
    )
    p.add_argument("--allow-urls", action="store_true", default=None, help="fetch http(s) image URLs (public hosts)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N", help="largest image (width*height)")
    p.add_argument("--max-image-bytes", type=int, default=None, metavar="N", help="largest encoded image or PDF")
    p.add_argument("--max-pdf-pages", type=int, default=None, metavar="N", help="most PDF pages one call reads")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="cap on every answer's length")
    p.add_argument("--num-beams", type=int, default=None, metavar="N", help="beams per call (default: the task's)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help=(
            "streamable-http: a Host header value clients use (repeatable; without a port any port matches); "
            "needed when --host is 0.0.0.0 or ::. Loopback names are always allowed"
        ),
    )
    p.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help=(
            "streamable-http: a browser origin allowed to call the server, e.g. https://app.example (repeatable); "
            "default: loopback origins only"
        ),
    )
    p.add_argument("--thumbnails", action="store_true", help="add a small JPEG of the input to every result")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="server log on stderr (default warning)")
    return p


def _port(text: str) -> int:
    try:
        port = int(text, 10)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"--port must be a number from 0 to 65535 (0: any free port), got {text!r}")
    return port


def register(commands: Any) -> None:
    """Add ``mcp`` to the ``hd4k`` sub-commands."""
    sub = commands.add_parser(
        "mcp",
        help="serve the three tools to MCP clients over stdio or streamable HTTP (extra: mcp)",
        description="Serve read_document, answer_chart_question and describe_image as an MCP server.",
    )
    build_parser(sub)
    sub.set_defaults(func=run_from_args)


def tool_settings(args: argparse.Namespace) -> ToolSettings:
    """The :class:`ToolSettings` the options ask for (limits not given keep their defaults)."""
    values = {field: getattr(args, option) for option, field in _SETTING_OPTIONS.items()}
    values = {k: v for k, v in values.items() if v is not None}
    root = values.get("allowed_root")
    if root is not None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise InputError(f"--allowed-root {root} is not a folder; pass an existing folder the tools may read.")
        values["allowed_root"] = root.resolve()
    try:
        return ToolSettings(**values)
    except ValidationError as err:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in err.errors())
        raise InputError(f"invalid limits: {problems}") from None


def open_hd4k(args: argparse.Namespace) -> HD4K:
    """The engine the options choose: a ``--remote`` server, or the model loaded on ``--engine``."""
    if args.remote:
        if args.engine != "native":
            raise InputError(f"--remote and --engine {args.engine} do not combine: the remote server is the engine.")
        return HD4K.remote(args.remote, args.remote_model or args.model, api_key=os.environ.get("HD4K_API_KEY"))
    if args.engine == "native":
        return HD4K.from_pretrained(args.model, device=args.device, dtype=args.dtype, progress=None)
    _check_engine(args.engine)
    # Only what was asked for: an engine refuses options it does not take (``engines.check_engine_options``).
    options = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v != "auto"}
    return HD4K.from_pretrained(args.model, engine=args.engine, **options)


def _check_engine(name: str) -> None:
    """Refuse an engine this installation cannot run, before anything loads, with its install line."""
    try:
        engine_class(name)
    except ModuleNotFoundError as err:  # the engine's own module is not part of this hd4k-tools yet
        raise MissingDependencyError(
            f"--engine {name} is not available in this installation ({err.name} is missing): {ENGINES[name].install}."
        ) from err


def _require_sdk() -> None:
    try:
        import mcp.server  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            f"hd4k mcp needs the MCP Python SDK ({err}); install it with: pip install 'hd4k-tools[mcp]'"
        ) from err


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port.") from err
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def _host_patterns(value: str) -> list[str]:
    """Host header values for one ``--allowed-host``: as given, plus any port when it names none."""
    host = value.strip()
    if ":" in host and not host.startswith("["):
        if host.count(":") == 1:  # host:port
            return [host]
        host = f"[{host}]"  # a bare IPv6 address
    if host.startswith("[") and "]:" in host:
        return [host]
    return [host, f"{host}:*"]


def _origin_patterns(value: str) -> list[str]:
    """Origin header values for one ``--allowed-origin``: as given (no trailing slash), plus any port when it
    names none."""
    origin = value.strip().rstrip("/")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]+", origin):
        raise InputError(
            f"--allowed-origin {value!r} is not an origin; give scheme://host[:port] as a browser sends it, e.g. "
            "https://app.example or http://localhost:3000."
        )
    host = origin.split("://", 1)[1]
    has_port = re.search(r":\d+$", host) is not None
    return [origin] if has_port else [origin, f"{origin}:*"]


def transport_security(host: str, allowed_hosts: Sequence[str] = (), allowed_origins: Sequence[str] = ()) -> Any:
    """The SDK's :class:`TransportSecuritySettings` for a server bound to ``host``: Host and Origin checked on
    every bind (see the module docstring).

    Raises:
        InputError: a wildcard bind (``0.0.0.0``, ``::``) without ``allowed_hosts``, or a malformed origin.
    """
    from mcp.server.transport_security import TransportSecuritySettings

    hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*", "127.0.0.1", "localhost", "[::1]"]
    origins = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
    origins += ["http://127.0.0.1", "http://localhost", "http://[::1]"]
    if host in _WILDCARD_HOSTS and not allowed_hosts:
        raise InputError(
            f"--host {host or '(all)'} listens on every address, so the server must know which names clients "
            "use: add --allowed-host NAME (e.g. --allowed-host gpu-box.lan, repeatable), and --allowed-origin "
            "for browser clients. Requests with another Host header are refused (DNS-rebinding protection)."
        )
    if host not in _LOOPBACK_HOSTS and host not in _WILDCARD_HOSTS:
        hosts += _host_patterns(host)
    for value in allowed_hosts:
        hosts += _host_patterns(value)
    for value in allowed_origins:
        origins += _origin_patterns(value)
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=list(dict.fromkeys(hosts)),
        allowed_origins=list(dict.fromkeys(origins)),
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the server the options describe until the client (stdio) or a signal (HTTP) ends it."""
    _require_sdk()
    from hd4k_tools.mcp.server import MCP_IMAGE_LIMIT, build_server  # needs the optional SDK

    security = None
    if args.transport == "streamable-http":
        security = transport_security(args.host, args.allowed_host, args.allowed_origin)  # before loading
    elif args.allowed_host or args.allowed_origin:
        raise InputError("--allowed-host and --allowed-origin are for --transport streamable-http.")
    settings = tool_settings(args)
    sock = _bind(args.host, args.port) if args.transport == "streamable-http" else None
    try:
        with open_hd4k(args) as hd:
            tools = AgentTools(hd, settings, ImageRegistry(max_images=MCP_IMAGE_LIMIT))
            server = build_server(tools, thumbnails=args.thumbnails)
            logging.basicConfig(
                stream=sys.stderr, level=args.log_level.upper(), format="hd4k mcp: %(levelname)s %(name)s: %(message)s"
            )
            if sock is None:
                anyio.run(_serve_stdio, server)
            else:
                anyio.run(_serve_http, server, sock, args.host, args.log_level.lower(), security)
    finally:
        if sock is not None:
            sock.close()
    return 0


async def _serve_stdio(server: Any) -> None:
    from mcp.server.stdio import stdio_server

    print("hd4k mcp: serving on stdio", file=sys.stderr, flush=True)
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


async def _serve_http(server: Any, sock: socket.socket, host: str, log_level: str, security: Any) -> None:
    import uvicorn

    from hd4k_tools.mcp.server import StreamCloseMiddleware

    app = StreamCloseMiddleware(
        server.streamable_http_app(streamable_http_path=MCP_PATH, host=host, transport_security=security)
    )
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    if host not in _LOOPBACK_HOSTS:
        print(
            f"hd4k mcp: warning: listening on {host} without authentication; anyone who reaches it can use "
            "the model and read the allowed folder",
            file=sys.stderr,
        )
    print(f"hd4k mcp: serving streamable HTTP on http://{shown}:{bound_port}{MCP_PATH}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=log_level, lifespan="on")
    await uvicorn.Server(config).serve(sockets=[sock])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hd4k_tools.mcp`` (errors as one line on stderr, exit code 2)."""
    args = build_parser().parse_args(argv)
    try:
        return run_from_args(args)
    except KeyboardInterrupt:
        return 130
    except HD4KError as err:
        print(f"hd4k mcp: error: {' '.join(err.render(CLI).split())}", file=sys.stderr)
        return 2
