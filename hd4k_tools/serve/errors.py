"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with a status code.

:func:`api_error_from` maps the library's typed errors to the status a client should see (400/413 for bad
input, never a 500); anything else becomes a generic 500 whose details stay in the server log.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hd4k_tools.errors import (
    ContextOverflowError,
    FileTooLargeError,
    ImageTooLargeError,
    InputError,
    InvalidHDNumError,
    URLFetchError,
    URLNotAllowedError,
)

__all__ = ["APIError", "api_error_from", "clean_loc", "internal_error", "validation_message"]


class APIError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with ``status_code``."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def internal_error() -> APIError:
    return APIError(
        500,
        "The server failed while handling this request; the details are in the server log.",
        type="server_error",
        code="internal_error",
    )


def api_error_from(err: BaseException, *, param: str | None = None) -> APIError:
    """Map a library error to the HTTP error a client should see (never a 500 for bad input)."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, ContextOverflowError):
        return APIError(400, str(err), param="messages", code="context_length_exceeded")
    if isinstance(err, FileTooLargeError):
        return APIError(413, str(err), param=param, code="image_too_large")
    if isinstance(err, ImageTooLargeError):
        return APIError(400, str(err), param=param, code="image_too_large")
    if isinstance(err, URLNotAllowedError):
        return APIError(400, str(err), param=param, code="image_url_not_allowed")
    if isinstance(err, URLFetchError):
        return APIError(400, str(err), param=param, code="image_url_fetch_failed")
    if isinstance(err, InvalidHDNumError):
        return APIError(400, str(err), param="hd_num", code="invalid_hd_num")
    if isinstance(err, InputError):
        return APIError(400, str(err), param=param, code="invalid_input")
    return internal_error()


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def clean_loc(loc: Sequence[Any]) -> list[str]:
    """A validation error's location without pydantic's union bookkeeping: ``("messages", 0, "content",
    "list[tagged-union[...]]", 0, "image_url", "image_url", "_ImageURL", "url")`` becomes
    ``["messages", "0", "content", "0", "image_url", "url"]``."""
    out: list[str] = []
    i = 0
    while i < len(loc):
        seg = loc[i]
        if seg == "body":
            i += 1
        elif isinstance(seg, str) and ("[" in seg or seg in _TYPE_TAGS or seg.startswith("_")):
            if "tagged-union" in seg and i + 2 < len(loc) and isinstance(loc[i + 1], int):
                out.append(str(loc[i + 1]))  # the list index; the discriminator tag after it is dropped
                i += 3
            else:
                i += 1
        else:
            out.append(str(seg))
            i += 1
    return out


def validation_message(err: Any) -> tuple[str, str | None]:
    """(message, param) for a pydantic/FastAPI validation error: the most specific problem (the deepest
    location, which for a union is the branch that matched best)."""
    errors = err.errors() if hasattr(err, "errors") else []
    if not errors:
        return "The request body is not valid.", None
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    param = ".".join(clean_loc(first.get("loc", ()))) or None
    # Sibling branches of the same union (locations that are prefixes of ``param``) are not news.
    others = {".".join(clean_loc(e.get("loc", ()))) for e in errors}
    others = {o for o in others if not (param or "").startswith(o)}
    extra = f" (and problems in: {', '.join(sorted(o or 'body' for o in others))})" if others else ""
    where = f"{param}: " if param else ""
    return f"Invalid request: {where}{first.get('msg', 'invalid value')}{extra}.", param
