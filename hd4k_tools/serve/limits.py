"""What one HTTP request may cost the server, enforced before the cost is paid.

* :func:`read_body`: the request body under a size cap **and a deadline** (a half-sent body cannot hold
  a connection open forever), with at most ``max_concurrent_uploads`` bodies being received at once.
* :func:`load_request_images`: every image's size read from its header, the request's image count,
  total pixels and token budget checked, and only then any image decoded. A request of six data-URL
  8000x8000 PNGs is refused having decoded nothing.

The app (``hd4k_tools.serve.app``) turns :class:`LimitExceeded` into its OpenAI-shaped error answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio

from hd4k_tools.errors import ContextOverflowError, RequestTooLargeError
from hd4k_tools.inputs.images import ImageHeader, SourceBytes, load_image, probe_image
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.models.registry import DEFAULT_FAMILY, HDPlan
from hd4k_tools.runtime.runner import Message

__all__ = [
    "DEFAULT_BODY_TIMEOUT_S",
    "DEFAULT_MAX_CONCURRENT_UPLOADS",
    "LimitExceeded",
    "UploadSlots",
    "load_request_images",
    "read_body",
]

#: Seconds a client has to send a whole request body (a few images over a slow link fit easily).
DEFAULT_BODY_TIMEOUT_S = 60.0
#: Request bodies received at the same time; more get 503 at once (each holds a socket and memory).
DEFAULT_MAX_CONCURRENT_UPLOADS = 16


class LimitExceeded(Exception):
    """A request over one of this module's limits: answered with ``status_code`` and ``code``."""

    def __init__(self, status_code: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code


class UploadSlots:
    """At most ``limit`` request bodies received at once, per app (an ``anyio`` semaphore)."""

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_concurrent_uploads must be an int >= 1, got {limit!r}")
        self.limit = limit
        self._semaphore: anyio.Semaphore | None = None  # created in the event loop, on first use

    @property
    def semaphore(self) -> anyio.Semaphore:
        if self._semaphore is None:
            self._semaphore = anyio.Semaphore(self.limit)
        return self._semaphore


async def read_body(
    request: Any,
    *,
    max_bytes: int,
    drain_bytes: int,
    timeout: float,
    slots: UploadSlots,
) -> bytes:
    """The request body, at most ``max_bytes``, received within ``timeout`` seconds.

    Raises:
        LimitExceeded: 503 ``too_many_uploads`` (all slots busy), 408 ``request_timeout`` (the body
            did not arrive in time), 413 ``request_too_large``, 400 ``invalid_request`` (bad
            Content-Length).
    """
    too_large = LimitExceeded(
        413,
        f"The request body is larger than this server's limit of {max_bytes:,} bytes; send smaller or "
        "fewer images (e.g. pre-sized with RemoteRunner), or raise --max-request-bytes.",
        "request_too_large",
    )
    declared = request.headers.get("content-length")
    declared_size: int | None = None
    if declared is not None:
        if not declared.isdigit() or len(declared) > 18:
            raise LimitExceeded(400, "Invalid Content-Length header.", "invalid_request")
        declared_size = int(declared)
    from starlette.requests import ClientDisconnect  # the serve extra

    semaphore = slots.semaphore
    try:
        semaphore.acquire_nowait()
    except anyio.WouldBlock:
        raise LimitExceeded(
            503,
            f"The server is already receiving {slots.limit} request bodies; retry in a moment.",
            "too_many_uploads",
        ) from None
    try:
        with anyio.move_on_after(timeout) as scope:
            try:
                body = await _receive(request, max_bytes, drain_bytes, declared_size)
            except ClientDisconnect:
                raise LimitExceeded(
                    400, "The client went away before sending the whole body.", "client_disconnected"
                ) from None
        if scope.cancelled_caught:
            raise LimitExceeded(
                408,
                f"The request body was not received within {timeout:g} s; send the whole body promptly "
                "(a slow or stalled upload is dropped).",
                "request_timeout",
            )
    finally:
        semaphore.release()
    if body is None:
        raise too_large
    return body


async def _receive(request: Any, max_bytes: int, drain_bytes: int, declared: int | None) -> bytes | None:
    """The body, or ``None`` when it is over ``max_bytes`` (after draining a bounded amount so the client
    still reads the answer)."""
    if declared is not None and declared > max_bytes:
        if declared <= max_bytes + drain_bytes:
            async for _ in request.stream():
                pass
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes + drain_bytes:
            break
        if size <= max_bytes:
            chunks.append(chunk)
    return None if size > max_bytes else b"".join(chunks)


def load_request_images(
    messages: Sequence[Message],
    *,
    policy: ImagePolicy,
    plan: Callable[[list[ImageHeader]], Sequence[HDPlan]],
    context_length: int,
    text_tokens: int,
) -> tuple[tuple[Message, ...], tuple[HDPlan, ...]]:
    """Decode the images of ``messages`` (held as undecoded :class:`SourceBytes` parts) once the whole
    request is known to fit, checking before any decode:

    1. every text part (special tokens, lone surrogates: ``check_untrusted_text``);
    2. every image's header (size of each frame or embedded image, frame count) under ``policy``;
    3. the image count (``policy.max_images``) and total pixels (``policy.max_total_pixels``);
    4. the token budget: the prompt's ``text_tokens`` plus the image tokens of ``plan(headers)`` within
       ``context_length``.

    Returns the messages with their images decoded, and the plans made from the headers (the request's
    only planning: an image decodes to its header's size, EXIF orientation included).

    Raises:
        RequestTooLargeError, ContextOverflowError, and the input errors of ``probe_image`` / ``load_image``.
    """
    images = [p for m in messages for p in m.content if isinstance(p, SourceBytes)]
    if len(images) > policy.max_images:
        raise RequestTooLargeError(
            f"The request has {len(images)} images, more than this server's limit of {policy.max_images}; "
            "send fewer images per request."
        )
    for m in messages:
        for part in m.content:
            if isinstance(part, str):
                DEFAULT_FAMILY.check_untrusted_text(m.role, part)
    headers = [probe_image(raw, policy=policy) for raw in images]
    total = sum(h.pixels for h in headers)
    if total > policy.max_total_pixels:
        raise RequestTooLargeError(
            f"The request's {len(images)} images have {total:,} pixels in all, more than this server's limit "
            f"of {policy.max_total_pixels:,}; send fewer or smaller images (the model sees at most its "
            "HD-N tiles anyway)."
        )
    plans = tuple(plan(headers))
    image_tokens = sum(p.num_tokens for p in plans)
    if text_tokens + image_tokens > context_length:
        raise ContextOverflowError(
            f"The prompt needs {text_tokens + image_tokens} tokens ({text_tokens} text + {image_tokens} "
            f"image tokens for {len(images)} image(s)) but the model's context holds {context_length}; use a "
            "smaller hd_num (or 'auto'), fewer images, or a shorter prompt."
        )
    loaded = tuple(
        Message(m.role, tuple(load_image(p, policy=policy) if isinstance(p, SourceBytes) else p for p in m.content))
        for m in messages
    )
    return loaded, plans
