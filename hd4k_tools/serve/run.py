"""Serving the native model from a shell: bind the port first, load the model, run uvicorn.

``run_server`` (and ``hd4k serve`` / ``python -m hd4k_tools.serve.app``, whose options :func:`build_parser`
defines) binds ``host:port`` before the model loads, so a port in use fails at once; ``--model`` defaults to
``$HD4K_MODEL`` or the official checkpoint, like every other ``hd4k`` command, and the served model id to the
checkpoint's name.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from hd4k_tools.arguments import add_model_argument
from hd4k_tools.errors import HD4KError, InputError
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.models.registry import DEFAULT_FAMILY, HDNum
from hd4k_tools.runtime.engines import (
    DEFAULT_ENGINE,
    ENGINES,
    engines_help,
    load_engine,
)
from hd4k_tools.serve.accesslog import ACCESS_LOGGER
from hd4k_tools.serve.chat import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_TOKENS_LIMIT, DEFAULT_SSE_KEEPALIVE_S
from hd4k_tools.serve.factory import ServerOptions, create_app, require_serve
from hd4k_tools.serve.ports import ServeError, bind_port
from hd4k_tools.serve.vllm import run_vllm_server

__all__ = ["ServeError", "build_parser", "main", "run_server", "serve_from_args", "served_name"]


def served_name(model: str) -> str:
    """The model id a server reports by default: a checkpoint folder's name, or the hub id as given."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve().name or str(model)
    return str(model)


def _configure_access_log(log_level: str) -> None:
    """Show the JSON access lines on stderr (once per process), at uvicorn's log level."""
    access = logging.getLogger(ACCESS_LOGGER)
    if not any(getattr(h, "_hd4k_access", False) for h in access.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._hd4k_access = True  # type: ignore[attr-defined]
        access.addHandler(handler)
        access.propagate = False
    level = logging.getLevelName(str(log_level).upper())
    access.setLevel(level if isinstance(level, int) else logging.INFO)


_SERVER_FIELDS = frozenset(f.name for f in fields(ServerOptions))


def run_server(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    options: ServerOptions | None = None,
    max_pixels: int | None = None,
    max_image_bytes: int | None = None,
    **changes: Any,
) -> None:
    """Bind ``host:port``, load the native model from ``model`` (a checkpoint folder or hub id) and serve
    it until stopped.

    ``options`` (a :class:`~hd4k_tools.serve.factory.ServerOptions`) holds what the app serves with; its fields
    may also be given as keywords, and every other keyword is a native engine option (``device``, ``dtype``,
    ``quantization``, ``cache_bytes``, ``revision``, ``cache_dir``, ``local_files_only``; an unknown one is
    refused before the model loads). ``max_pixels``/``max_image_bytes`` tighten the default
    :class:`ImagePolicy`.

    The served model id is ``served_model_name``, by default the checkpoint's name (:func:`served_name`:
    the folder's name, or the hub id); without ``served_model_name`` a request may also name the model as
    ``model`` was given (vLLM's default name). Any other name is a 404 ``model_not_found``. Access lines go
    to the ``hd4k_tools.serve.access`` logger as one JSON object per request (shown at ``log_level`` info
    and below). ``host`` defaults to loopback: pass ``host="0.0.0.0"`` deliberately (ideally with
    ``api_key``) to serve other machines.

    Raises:
        ServeError: the port is already in use or cannot be bound (raised before the model loads), or
            uvicorn did not start.
    """
    require_serve()
    server_changes = {k: v for k, v in changes.items() if k in _SERVER_FIELDS}
    engine_options = {k: v for k, v in changes.items() if k not in _SERVER_FIELDS}
    policy_changes = {"max_pixels": max_pixels, "max_bytes": max_image_bytes}
    policy = ImagePolicy(**{k: v for k, v in policy_changes.items() if v is not None})
    served = ServerOptions.of(options, **{"policy": policy, **server_changes})
    if served.served_model_name is None:
        # vLLM's default name is the --model argument: accepted too, so one client recipe fits both servers.
        served = ServerOptions.of(served, served_model_name=served_name(model), model_aliases=(str(model),))
    sock = bind_port(host, port)
    try:
        runner = load_engine(DEFAULT_ENGINE, model, **engine_options)
        try:
            _serve_app(create_app(runner, served), sock, host=host, port=port, log_level=log_level)
        finally:
            runner.close()
    finally:
        sock.close()


def _serve_app(app: Any, sock: socket.socket, *, host: str, port: int, log_level: str) -> None:
    """Run uvicorn on the already bound ``sock`` until stopped (Ctrl-C is a clean stop)."""
    import uvicorn

    _configure_access_log(log_level)
    bound = sock.getsockname()[1]
    where = f"[{host}]" if ":" in host else host

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            # uvicorn announces its address only when it binds the socket itself.
            if self.started:
                logging.getLogger("uvicorn.error").info(
                    "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", where, bound
                )

    server = _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False))
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    if not server.started:
        raise ServeError(f"the server on {host}:{bound} did not start; see the log above")


def _positive_int_arg(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _positive_float_arg(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = 0.0
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return x


def _hd_num_arg(value: str) -> HDNum:
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return _positive_int_arg(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The command-line options of ``python -m hd4k_tools.serve.app``; ``hd4k serve`` passes its sub-parser
    to be filled with the same options."""
    p = parser or argparse.ArgumentParser(
        prog="python -m hd4k_tools.serve.app",
        description="Serve InternLM-XComposer2-4KHD over an OpenAI-compatible HTTP API.",
    )
    _add_model_arguments(p)
    _add_server_arguments(p)
    p.add_argument(
        "vllm_args",
        nargs=argparse.REMAINDER,
        metavar="-- VLLM_OPTION ...",
        help="--engine vllm: options passed on to vLLM's server as they are, after '--'",
    )
    return p


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint and engine options of the server."""
    add_model_argument(p)
    p.add_argument(
        "--engine",
        choices=tuple(ENGINES),
        default=DEFAULT_ENGINE,
        help=engines_help() + " (vllm serves with vLLM's own OpenAI server)",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=_positive_int_arg,
        default=1,
        metavar="N",
        help="--engine vllm: GPUs to shard the model over (default 1)",
    )
    p.add_argument(
        "--hd-num",
        type=_positive_int_arg,
        default=None,
        metavar="N",
        help=(
            "--engine vllm: the engine's HD-N budget and default, the largest hd_num a request may ask for "
            "(default: the plugin's DEFAULT_ENGINE_HD_NUM); requests pick theirs with "
            '"mm_processor_kwargs": {"hd_num": n}'
        ),
    )
    p.add_argument("--revision", default=None, help="hub revision: branch, tag or commit (hub ids only)")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: the HF cache)")
    p.add_argument(
        "--local-files-only",
        action="store_true",
        help="never download: use a local folder or the HF cache ($HF_HUB_OFFLINE=1 does the same)",
    )


def _add_server_arguments(p: argparse.ArgumentParser) -> None:
    """The HTTP, device and request-limit options of the server."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None)
    p.add_argument(
        "--served-model-name",
        default=None,
        help="model id reported by the API (default: the checkpoint folder's name, or the hub id)",
    )
    p.add_argument("--allow-image-urls", action="store_true", help="fetch http(s) image URLs (public hosts)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    p.add_argument("--max-pixels", type=int, default=None, help="largest image (width*height) accepted")
    p.add_argument("--max-image-bytes", type=int, default=None, help="largest encoded image accepted")
    p.add_argument(
        "--default-hd-num",
        type=_hd_num_arg,
        default=DEFAULT_FAMILY.default_engine_hd_num,
        help=f"an int or 'auto' (default {DEFAULT_FAMILY.default_engine_hd_num})",
    )
    p.add_argument(
        "--max-tokens-limit",
        type=_positive_int_arg,
        default=DEFAULT_MAX_TOKENS_LIMIT,
        metavar="N",
        help=(
            f"largest max_tokens one request may ask for (default {DEFAULT_MAX_TOKENS_LIMIT}); a request over "
            "it is refused with 400, not clamped, so a client never mistakes a cut answer for a whole one. "
            "Requests without max_tokens get min(512, N)"
        ),
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("HD4K_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $HD4K_API_KEY; the environment keeps it out of ps)",
    )
    p.add_argument(
        "--sse-keepalive",
        type=_positive_float_arg,
        default=DEFAULT_SSE_KEEPALIVE_S,
        metavar="SECONDS",
        help=(
            "interval of keep-alive comments while a stream waits for its first token "
            f"(default {DEFAULT_SSE_KEEPALIVE_S:g})"
        ),
    )
    p.add_argument("--log-level", default="info", help="uvicorn's log level; info shows the JSON access lines")


# The options both servers take, under the same keyword (``run_server`` / ``run_vllm_server``).
_SHARED = ("host", "port", "dtype", "api_key", "log_level")
# Options of the native server that vLLM's server has no equivalent for: refused with --engine vllm
# rather than silently ignored.
_NATIVE_ONLY = (
    "device",
    "quantization",
    "allow_image_urls",
    "max_request_bytes",
    "max_pixels",
    "max_image_bytes",
    "default_hd_num",
    "max_tokens_limit",
    "sse_keepalive",
    "revision",
    "cache_dir",
    "local_files_only",
)
# The run_server keyword of a parser dest, where the two differ.
_KEYWORDS = {"sse_keepalive": "sse_keepalive_s"}


def _serve_vllm(args: argparse.Namespace) -> int:
    defaults = build_parser().parse_args([])
    changed = [name for name in _NATIVE_ONLY if getattr(args, name) != getattr(defaults, name)]
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise InputError(
            f"{flags} configure(s) the native server only; vLLM's server has its own options (pass them after "
            "'--', e.g. '-- --allowed-media-domains example.com' to allow image URLs from that host)."
        )
    extra = list(args.vllm_args or ())
    if extra and extra[0] == "--":
        extra = extra[1:]
    run_vllm_server(
        args.model,
        hd_num=args.hd_num,
        tensor_parallel_size=args.tensor_parallel_size,
        # Like the native server: the folder's name, and the --model argument as given (vLLM's own default).
        served_model_name=args.served_model_name or list(dict.fromkeys([served_name(args.model), str(args.model)])),
        extra_args=extra,
        **{name: getattr(args, name) for name in _SHARED},
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hd4k_tools.serve.app``."""
    args = build_parser().parse_args(argv)
    try:
        return serve_from_args(args)
    except HD4KError as err:  # a bad model folder, a missing extra: the message says what to do
        print(f"error: {err}", file=sys.stderr)
        return 1


def serve_from_args(args: argparse.Namespace) -> int:
    """Run :func:`run_server` with options parsed by :func:`build_parser` (``hd4k serve`` calls this and
    reports errors its own way)."""
    if args.engine == "vllm":
        return _serve_vllm(args)
    if [a for a in (args.vllm_args or ()) if a != "--"] or args.hd_num is not None or args.tensor_parallel_size != 1:
        raise InputError(
            "--hd-num, --tensor-parallel-size and options after '--' are for --engine vllm; the native server "
            "takes --default-hd-num and serves on one device."
        )
    run_server(
        args.model,
        served_model_name=args.served_model_name,
        **{name: getattr(args, name) for name in _SHARED},
        **{_KEYWORDS.get(dest, dest): getattr(args, dest) for dest in _NATIVE_ONLY},
    )
    return 0
