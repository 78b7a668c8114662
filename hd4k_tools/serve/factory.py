"""``create_app``: one FastAPI application over one runner (the routes in :mod:`hd4k_tools.serve.routes`,
OpenAI-shaped errors, the access-log/metrics middleware, the OpenAPI document).

FastAPI is an optional extra (``serve``): it is imported when an app is built, and without it
:class:`~hd4k_tools.errors.MissingDependencyError` says what to install.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from hd4k_tools import __version__
from hd4k_tools.errors import InvalidHDNumError, MissingDependencyError
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.models.registry import DEFAULT_FAMILY, HDNum
from hd4k_tools.runtime.runner import Runner
from hd4k_tools.serve import limits
from hd4k_tools.serve.accesslog import AccessLogMiddleware
from hd4k_tools.serve.chat import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_TOKENS_LIMIT,
    DEFAULT_SSE_KEEPALIVE_S,
    ServeSettings,
)
from hd4k_tools.serve.errors import APIError, internal_error, validation_message
from hd4k_tools.serve.metrics import ServerMetrics

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

__all__ = ["SERVE_HINT", "ServerOptions", "create_app", "require_serve"]

SERVE_HINT = 'pip install "hd4k-tools[serve]"'


def require_serve() -> None:
    """Raise :class:`MissingDependencyError` when FastAPI or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            f"The HTTP server needs FastAPI and uvicorn, which are not installed: {SERVE_HINT}"
        ) from err


def _checked_hd_num(default_hd_num: HDNum) -> HDNum:
    if isinstance(default_hd_num, str):
        if default_hd_num.strip().lower() != "auto":
            raise InvalidHDNumError(f"default_hd_num must be a positive int or 'auto', got {default_hd_num!r}.")
        return "auto"
    DEFAULT_FAMILY.check_hd_num(default_hd_num)
    return default_hd_num


# The routes a client may call, for the message of a 404.
_ROUTES = (
    "POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{id}, GET /health, "
    "GET /metrics, GET /docs"
)


def _routing_message(request: Any, status: int, detail: str, headers: Any) -> str:
    """Starlette's "Not Found" / "Method Not Allowed" as messages that say what to call instead."""
    method = request.method if len(request.method) <= 32 else request.method[:32] + "..."
    path = request.url.path if len(request.url.path) <= 200 else request.url.path[:200] + "..."
    if status == 404 and detail == "Not Found":
        return f"No route {method} {path!r} on this server; it answers {_ROUTES}."
    if status == 405 and detail == "Method Not Allowed":
        allowed = (headers or {}).get("Allow") or (headers or {}).get("allow") or "another method"
        return f"{method} is not allowed on {path!r}; use {allowed}."
    return detail


@dataclass(frozen=True)
class ServerOptions:
    """What an app serves with besides its runner (the keywords of :func:`create_app`, as one object).

    Attributes:
        policy: image limits (pixels, bytes, private URLs); defaults to ``ImagePolicy()``.
        max_request_bytes: largest accepted request body; larger ones get 413.
        allow_image_urls: accept ``http(s)://`` image URLs (fetched under ``policy``: private and
            loopback addresses stay refused unless ``policy.allow_private_urls``). Data URLs are always
            accepted.
        default_hd_num: tile budget for images when a request has no ``hd_num`` (an int or ``"auto"``).
        served_model_name: the model name reported by the API; defaults to ``runner.model_id``.
        model_aliases: other names a request's ``model`` may use; ``/v1/models`` lists them after the served
            name. Any other ``model`` is a 404 ``model_not_found`` (a request without ``model`` is answered).
        api_key: when set, requests to ``/v1/*`` must send ``Authorization: Bearer <api_key>``.
        max_tokens_limit: largest ``max_tokens`` (or ``max_completion_tokens``) a request may ask for;
            more is refused with 400 ``max_tokens_too_large``. A request without ``max_tokens`` gets the
            runner's default, lowered to this limit if needed.
        sse_keepalive_s: a streamed answer whose first token takes longer than this starts its event
            stream and sends an SSE comment (``: keep-alive``) every ``sse_keepalive_s`` until it comes.
        body_timeout: seconds a client has to send its whole request body; slower uploads get 408.
        max_concurrent_uploads: request bodies received at once; more get 503 ``too_many_uploads``.
    """

    policy: ImagePolicy | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    allow_image_urls: bool = False
    default_hd_num: HDNum = DEFAULT_FAMILY.default_engine_hd_num
    served_model_name: str | None = None
    model_aliases: Sequence[str] = ()
    api_key: str | None = None
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT
    sse_keepalive_s: float = DEFAULT_SSE_KEEPALIVE_S
    body_timeout: float = limits.DEFAULT_BODY_TIMEOUT_S
    max_concurrent_uploads: int = limits.DEFAULT_MAX_CONCURRENT_UPLOADS

    def __post_init__(self) -> None:
        object.__setattr__(self, "default_hd_num", _checked_hd_num(self.default_hd_num))
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        limit = self.max_tokens_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_tokens_limit must be an int >= 1, got {limit!r}")
        for name in ("body_timeout", "sse_keepalive_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")

    @classmethod
    def of(cls, options: ServerOptions | None = None, **changes: Any) -> ServerOptions:
        """``options`` (default: the defaults) with ``changes``, refusing unknown names."""
        unknown = sorted(set(changes) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown server options {unknown}; valid: {[f.name for f in fields(cls)]}")
        return replace(options or cls(), **changes)

    def settings(self, runner: Runner) -> ServeSettings:
        """The request handlers' settings for ``runner``."""
        return ServeSettings(
            runner=runner,
            policy=self.policy or ImagePolicy(),
            allow_image_urls=self.allow_image_urls,
            default_hd_num=self.default_hd_num,
            model_name=self.served_model_name or runner.model_id,
            max_request_bytes=self.max_request_bytes,
            api_key=self.api_key,
            max_tokens_limit=self.max_tokens_limit,
            sse_keepalive_s=float(self.sse_keepalive_s),
            body_timeout=float(self.body_timeout),
            upload_slots=limits.UploadSlots(self.max_concurrent_uploads),
            model_aliases=tuple(str(a) for a in self.model_aliases),
        )


def create_app(runner: Runner, options: ServerOptions | None = None, **changes: Any) -> FastAPI:
    """Build the OpenAI-compatible FastAPI app that answers with ``runner``.

    ``runner`` is any :class:`~hd4k_tools.runtime.runner.Runner` (usually a ``LocalRunner``); it must be safe
    to call from several threads (``LocalRunner`` serialises its model calls). The options are a
    :class:`ServerOptions`, or its fields as keywords (``create_app(runner, api_key="...",
    default_hd_num=9)``), or both (the keywords win).

    Raises:
        MissingDependencyError: FastAPI/uvicorn are not installed (``pip install "hd4k-tools[serve]"``).
        ValueError, InvalidHDNumError: an option out of range; TypeError: an unknown option.
    """
    require_serve()
    from fastapi import FastAPI

    from hd4k_tools.serve.routes import ServerState, router

    settings = ServerOptions.of(options, **changes).settings(runner)
    metrics = ServerMetrics(settings.model_name)
    app = FastAPI(
        title="hd4k-tools",
        version=__version__,
        description="OpenAI-compatible server for InternLM-XComposer2-4KHD (images as data URLs, hd_num tiling).",
    )
    app.state.hd4k = ServerState(settings=settings, metrics=metrics)
    app.include_router(router)
    app.add_middleware(AccessLogMiddleware, metrics=metrics)
    _install_error_handlers(app)
    _install_openapi(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error object (validation 400s, 404/405, our APIErrors, and 500s logged)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from hd4k_tools.serve.routes import error_response, logger

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        headers = getattr(exc, "headers", None)
        message = _routing_message(request, exc.status_code, str(exc.detail), headers)
        err = APIError(exc.status_code, message, type=kind, code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(APIError)
    async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(internal_error())


def _install_openapi(app: FastAPI) -> None:
    """The OpenAPI document with the request/response models the raw-body chat route does not declare."""
    from fastapi.openapi.utils import get_openapi

    from hd4k_tools.serve.routes import openapi_components

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in openapi_components().items():
                components.setdefault(name, definition)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
