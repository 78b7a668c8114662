"""``RemoteRunner``: the :class:`~hd4k_tools.runtime.runner.Runner` protocol over an OpenAI-compatible server.

It talks to ``hd4k serve`` (this project's server) or to any chat-completions endpoint (LMDeploy, vLLM,
SGLang) with :mod:`httpx`: timeouts, retries with exponential backoff and jitter on 429/500/502/503/504
and connection errors (``Retry-After`` honoured), other 4xx answered at once as
:class:`~hd4k_tools.errors.RemoteResponseError`, and a concurrency limit shared by all threads that use
the same runner.

**Client-side HD pre-sizing.** The model never sees more pixels than its HD-N plan: an image is resized
to ``plan(W, H, hd_num).resized_size`` (and white-padded to multiples of 336) before the vision tower.
So, before upload, every image larger than that is reduced here to exactly the resized image — with the
reference's own arithmetic (portrait images transposed, PIL bilinear) — and sent as a lossless PNG data
URL. A 30 MB scan at ``hd_num=25`` goes over the wire as at most ~1680×1008 pixels. On the server the
plan of the pre-sized image is (normally) the same plan with an identity resize, so the model sees
exactly the pixels it would see in process. For about 6% of sizes the float arithmetic of the reference
plans the pre-sized image one pixel shorter; then the nearest size that plans to itself is used, which
differs from the in-process pixels by that one-pixel rescale (the tile grid and token count are
unchanged). Images the plan enlarges are sent as they are (the server upscales them itself).
``presize=False`` sends every image unchanged; ``image_format="JPEG"`` makes uploads smaller but lossy.

**Extensions.** With ``send_hd_num=True`` (the default, for ``hd4k serve``) the request carries this
project's extensions ``hd_num`` (one per image) and ``layout``, so the server tiles each image exactly as
the client planned. ``server="vllm"`` (vLLM with this project's plugin, ``hd4k serve --engine vllm``) sends
the same two as ``"mm_processor_kwargs": {"hd_num": [...], "layout": ...}``, which the plugin reads; vLLM
has no beam search, so such a runner refuses ``num_beams > 1`` and ``HD4K``'s task defaults decode
greedily. For LMDeploy / SGLang / other vLLM models pass ``send_hd_num=False``: they do their own image
preprocessing (LMDeploy uses a fixed hd_num of 25) and would ignore or reject unknown fields.
``top_k``, ``repetition_penalty`` and ``num_beams`` are sent only when they differ from their defaults.

Results: ``plans`` are the client's own plans of the original images (replaced by the server's ``hd4k``
extension when it sends one, with ``input_size`` kept as the original image's size), ``usage`` comes from
the server's ``usage``, and ``timings`` from the ``hd4k`` extension plus the client's wall time
(``total_s``).
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import io
import json
import random
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
from PIL import Image

from hd4k_tools.errors import InputError, RemoteConnectionError, RemoteResponseError
from hd4k_tools.inputs.images import to_data_url
from hd4k_tools.models.registry import DEFAULT_FAMILY, HDPlan
from hd4k_tools.results import PlanSummary, Timings, Usage
from hd4k_tools.runtime.deadline_http import DeadlineTransport, call_deadline, time_left
from hd4k_tools.runtime.generation_config import GenerationConfig
from hd4k_tools.runtime.runner import GenerationRequest, RunnerResult, TextStream, stream_in_thread
from hd4k_tools.runtime.stops import StopFilter

__all__ = ["MAX_SSE_LINE_BYTES", "RETRY_STATUSES", "RemoteRunner", "presize", "sse_lines"]

#: Statuses worth retrying: rate limited, a transient server failure (500: e.g. a GPU out-of-memory error
#: under load), or a gateway/server that is (re)starting or overloaded. 501 and 505 will not change.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# Longest single wait between two attempts, whatever Retry-After says.
_MAX_DELAY_S = 60.0
# Errors before any byte of an answer: the request can safely be sent again.
_RETRY_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)
# How far (in pixels of the short side) to look for a pre-sized size that plans to itself.
_PRESIZE_SEARCH = 3


# ----------------------------------------------------------------------------------------------------
# Pre-sizing
# ----------------------------------------------------------------------------------------------------
def _resize_like_reference(image: Image.Image, size: tuple[int, int], transposed: bool) -> Image.Image:
    """Resize to ``size`` (final orientation) the way the reference HD transform does: portrait images
    are transposed, resized, and transposed back (not pixel-identical to a direct resize)."""
    img = image if image.mode == "RGB" else image.convert("RGB")
    if not transposed:
        return img.resize(size, Image.Resampling.BILINEAR)
    working = img.transpose(Image.Transpose.TRANSPOSE).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return working.transpose(Image.Transpose.TRANSPOSE)


def _self_planning_size(p: HDPlan) -> tuple[int, int]:
    """A size close to ``p.resized_size`` whose own plan at ``p.hd_num`` is an identity resize with the
    same grid; ``p.resized_size`` itself unless float truncation makes it plan one pixel shorter."""

    def stable(size: tuple[int, int]) -> bool:
        q = DEFAULT_FAMILY.plan(size[0], size[1], p.hd_num)
        return q.resized_size == size and (q.rows, q.cols) == (p.rows, p.cols)

    rw, rh = p.resized_size
    if stable((rw, rh)):
        return rw, rh
    for delta in (d * sign for d in range(1, _PRESIZE_SEARCH + 1) for sign in (1, -1)):
        # The long side is scale*336 by construction; only the computed short side can be off.
        candidate = (rw + delta, rh) if p.transposed else (rw, rh + delta)
        if min(candidate) >= 1 and stable(candidate):
            return candidate
    return rw, rh


def _data_url(image: Image.Image, image_format: str) -> str:
    if image_format.upper() != "PNG":
        return to_data_url(image, image_format)
    # compress_level=1 encodes ~3x faster than Pillow's default (6); on scans and photos the file is
    # about as small, and the upload is sent once and decoded once.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def presize(image: Image.Image, hd_plan: HDPlan | int) -> Image.Image:
    """``image`` reduced to what the model sees under its plan (see the module docstring); the request's
    own :class:`HDPlan` (an int hd_num is planned here, for callers outside a request).

    Returns ``image`` itself when the HD-N plan does not shrink it (small images are upscaled by the
    server, so sending them as they are costs less), or when the plan is degenerate (a side clamped to
    one pixel).
    """
    p = hd_plan if isinstance(hd_plan, HDPlan) else DEFAULT_FAMILY.plan(image.width, image.height, hd_plan)
    rw, rh = p.resized_size
    if p.clamped or rw * rh >= image.width * image.height:
        return image
    return _resize_like_reference(image, _self_planning_size(p), p.transposed)


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def _normalise_base_url(base_url: str) -> str:
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise InputError(f"base_url must start with http:// or https://, got {base_url!r}.")
    return url if url.endswith("/v1") else url + "/v1"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _server_message(response: httpx.Response) -> str:
    """The error message of an error response (OpenAI ``{"error": {"message"}}``, FastAPI ``detail``,
    or the start of the body)."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError, RecursionError):
        text = response.text.strip()
        return text[:500] or response.reason_phrase or "no message"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"]:
            return err["message"][:2000]
        if isinstance(err, str):
            return err[:2000]
        for key in ("detail", "message"):
            if isinstance(body.get(key), str) and body[key]:
                return body[key][:2000]
    return _excerpt(body, 500)


def _excerpt(value: object, limit: int = 300) -> str:
    """A short JSON excerpt of a server's value for messages; never raises (deep or odd values)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text[:limit]


def _plans_for(request: GenerationRequest) -> list[HDPlan]:
    return request.plans() if request.images else []


# ----------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------
#: Longest line of a server-sent-event stream the client reads (8 MiB: a whole structured answer with its
#: plans fits many times over). Beyond it the stream is refused, so a server that never sends a newline
#: costs at most this much memory.
MAX_SSE_LINE_BYTES = 8 * 2**20


def sse_lines(chunks: Iterator[bytes], max_line_bytes: int, source: str = "the server") -> Iterator[str]:
    """The lines of an event stream (``\n``, ``\r\n`` or ``\r`` ends a line, as SSE allows), decoded as
    UTF-8, reading ``chunks`` as they come and holding at most ``max_line_bytes`` of an unfinished line.

    Raises:
        RemoteResponseError: a line is longer than ``max_line_bytes`` (raised as soon as the buffer passes
            it, without reading the rest).
    """
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        start = 0
        # The next LF and CR at or after ``start`` (-1: none left in this buffer), each searched once.
        lf, cr = buffer.find(b"\n"), buffer.find(b"\r")
        while lf >= 0 or cr >= 0:
            end = min(k for k in (lf, cr) if k >= 0)
            if end == cr and end + 1 == len(buffer):
                break  # a CR at the end of the chunk: its LF may come next
            if end - start > max_line_bytes:
                break
            yield buffer[start:end].decode("utf-8", errors="replace")
            start = end + (2 if end == cr and end + 1 == lf else 1)
            if 0 <= lf < start:
                lf = buffer.find(b"\n", start)
            if 0 <= cr < start:
                cr = buffer.find(b"\r", start)
        del buffer[:start]
        if len(buffer) - buffer.endswith(b"\r") > max_line_bytes:
            raise RemoteResponseError(
                f"The server at {source} sent an event-stream line longer than {max_line_bytes:,} bytes; an "
                "OpenAI-compatible stream sends one small JSON event per line. Check that the URL points at "
                "the model server, or raise RemoteRunner.max_sse_line_bytes."
            )
    if buffer:
        yield buffer.rstrip(b"\r").decode("utf-8", errors="replace")


class RemoteRunner:
    """A :class:`~hd4k_tools.runtime.runner.Runner` that sends each request to an OpenAI-compatible server.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000`` or ``http://127.0.0.1:8000/v1`` (``/v1`` is
            appended when missing).
        model: the model name to request (``hd4k serve`` reports it at ``GET /v1/models``).
        api_key: sent as ``Authorization: Bearer <api_key>`` when given.
        timeout: seconds for a whole call: connecting, retries and their waits, and reading the whole
            answer (streamed or not); a server that drips bytes cannot stretch it. Generous, answers
            can be long. (With ``http_client`` only that client's per-read timeouts apply.)
        connect_timeout: seconds to establish a connection.
        max_retries: extra attempts after a connection error or a 429/500/502/503/504 answer.
        backoff: first wait between attempts in seconds; doubles every attempt, with ±50% jitter, and
            never shorter than the server's ``Retry-After``.
        max_concurrency: requests in flight at once from this runner (more callers wait their turn).
        context_length: the served model's context, used by ``HD4K`` for ``hd_num="auto"``.
        presize: reduce images to their HD-N resized size before upload (see the module docstring).
        send_hd_num: send the ``hd_num``/``layout`` extensions (``hd4k serve``); ``False`` for
            LMDeploy / SGLang / other vLLM models.
        server: ``"hd4k"`` (``hd4k serve``) or ``"vllm"`` (vLLM with this project's plugin: the extensions
            go in ``mm_processor_kwargs``; no beam search).
        image_format: ``"PNG"`` (lossless, exact) or ``"JPEG"``/``"WEBP"`` (smaller, lossy).
        http_client: an ``httpx.Client`` to use instead of the runner's own (its timeouts and limits then
            apply; it is not changed, and not closed by :meth:`close`).

    The runner is thread-safe: ``httpx.Client`` is, and the concurrency limit is a semaphore.
    """

    #: Longest server-sent-event line read (see :func:`sse_lines`); an instance may lower or raise it.
    max_sse_line_bytes: int = MAX_SSE_LINE_BYTES

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_concurrency: int = 4,
        context_length: int = 16384,
        presize: bool = True,
        send_hd_num: bool = True,
        server: str = "hd4k",
        image_format: str = "PNG",
        http_client: httpx.Client | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if backoff < 0:
            raise ValueError(f"backoff must be >= 0, got {backoff}")
        self.base_url = _normalise_base_url(base_url)
        self._model = model
        self._context_length = int(context_length)
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.presize = presize
        if server not in ("hd4k", "vllm"):
            raise ValueError(f"server must be 'hd4k' or 'vllm', got {server!r}")
        self.send_hd_num = send_hd_num
        self.server = server
        self.image_format = image_format
        self._semaphore = threading.BoundedSemaphore(max_concurrency)
        self._rng = random.Random()
        self._owns_client = http_client is None
        # Sent with each request rather than set on the client, so a caller's client is left untouched.
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if http_client is None:
            http_client = httpx.Client(
                timeout=httpx.Timeout(timeout, connect=connect_timeout),
                transport=DeadlineTransport(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            )
        self._client = http_client

    def __repr__(self) -> str:
        return f"RemoteRunner(base_url={self.base_url!r}, model={self._model!r})"

    # -- Runner protocol ---------------------------------------------------------------------------
    @property
    def supports_beam_search(self) -> bool:
        """vLLM has no beam search (``HD4K`` then decodes task defaults greedily)."""
        return self.server != "vllm"

    @property
    def model_id(self) -> str:
        return self._model

    @property
    def context_length(self) -> int:
        return self._context_length

    def count_text_tokens(self, text: str) -> int:
        """A rough estimate with no tokenizer at hand: ``len(text) // 3 + 1``.

        Sentencepiece/BPE tokenizers like InternLM2's typically average about 4 characters per English
        token; dividing by 3 overestimates, which is the safe side for context budgeting.
        """
        return len(text) // 3 + 1

    def close(self) -> None:
        """Close the HTTP client (only if the runner created it)."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> RemoteRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult:
        """Send ``request`` and wait for the whole answer.

        ``cancel`` is honoured before sending and between retries; once the server is generating, the
        request runs to its end (use :meth:`stream` to stop an answer midway).

        Raises:
            RemoteConnectionError: the server is unreachable after the retries, or dropped the connection.
            RemoteResponseError: the server answered with an error status or a malformed body.
        """
        started = time.perf_counter()
        plans = _plans_for(request)
        if cancel is not None and cancel.is_set():
            return self._result("", "cancelled", plans, None, None, started)
        payload = self._payload(request, stream=False)
        with self._exchange(payload, stream=False, cancel=cancel) as response:
            if response is None:
                return self._result("", "cancelled", plans, None, None, started)
        data = self._json(response)
        text, finish = self._message(data, response.status_code)
        return self._result(text, finish, plans, data.get("usage"), data.get("hd4k"), started)

    def stream(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> TextStream:
        """Send ``request`` with ``stream=true`` and yield text deltas as the server sends them.

        Closing the stream (or setting ``cancel``) closes the connection, which makes ``hd4k serve``
        stop generating. A connection that drops midway raises :class:`RemoteConnectionError` from the
        iterator (deltas already yielded are not retried).
        """
        return stream_in_thread(lambda emit, ev: self._stream_call(request, emit, ev), cancel)

    def generate_batch(
        self, requests: Sequence[GenerationRequest], *, cancel: threading.Event | None = None
    ) -> list[RunnerResult]:
        """The requests sent at once (at most ``max_concurrency`` in flight; a batching server such as vLLM
        runs them together); results in the same order."""
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=len(requests), thread_name_prefix="hd4k-remote") as pool:
            return list(pool.map(lambda r: self.generate(r, cancel=cancel), requests))

    # -- requests ----------------------------------------------------------------------------------
    def _messages(self, request: GenerationRequest, plans: Iterator[HDPlan]) -> list[dict[str, Any]]:
        """The request's messages in OpenAI's shape, each image (presized to its plan) as a data URL."""
        messages: list[dict[str, Any]] = []
        for m in request.messages:
            if all(isinstance(p, str) for p in m.content):
                messages.append({"role": m.role, "content": m.text})
                continue
            parts: list[dict[str, Any]] = []
            for p in m.content:
                if isinstance(p, str):
                    parts.append({"type": "text", "text": p})
                else:
                    image = presize(p, next(plans)) if self.presize else p
                    url = _data_url(image, self.image_format)
                    parts.append({"type": "image_url", "image_url": {"url": url}})
            messages.append({"role": m.role, "content": parts})
        return messages

    def _payload(self, request: GenerationRequest, *, stream: bool) -> dict[str, Any]:
        plans = iter(request.plans())
        if len(request.images) != len(request.hd_nums):
            raise InputError(
                f"{len(request.images)} images but {len(request.hd_nums)} hd_num values; give one per image."
            )
        messages = self._messages(request, plans)
        g = request.generation
        payload: dict[str, Any] = {
            "model": self._model,
            "messages": messages,
            "max_tokens": g.max_new_tokens,
            "stream": stream,
        }
        payload.update(_sampling_options(g))
        if request.constraint is not None:
            payload["response_format"] = request.constraint.response_format()
        if g.num_beams != 1:
            if not self.supports_beam_search:
                raise InputError(
                    f"vLLM has no beam search (num_beams={g.num_beams}): pass num_beams=1 (greedy) or sampling options."
                )
            payload["num_beams"] = g.num_beams
        if self.send_hd_num and self.server == "vllm":
            extensions: dict[str, Any] = {"layout": request.layout}
            if request.hd_nums:
                extensions["hd_num"] = list(request.hd_nums)
            payload["mm_processor_kwargs"] = extensions
        elif self.send_hd_num:
            if request.hd_nums:
                unique = set(request.hd_nums)
                payload["hd_num"] = request.hd_nums[0] if len(unique) == 1 else list(request.hd_nums)
            payload["layout"] = request.layout
        if stream:
            payload["stream_options"] = {"include_usage": True}
        return payload

    @contextlib.contextmanager
    def _slot(self, cancel: threading.Event | None) -> Iterator[bool]:
        """Hold one of the ``max_concurrency`` slots; yields False if ``cancel`` was set while waiting."""
        while not self._semaphore.acquire(timeout=0.1):
            if cancel is not None and cancel.is_set():
                yield False
                return
        try:
            yield True
        finally:
            self._semaphore.release()

    @contextlib.contextmanager
    def _exchange(
        self, payload: dict[str, Any], *, stream: bool, cancel: threading.Event | None
    ) -> Iterator[httpx.Response | None]:
        """The server's response to ``payload`` (:meth:`_send`), sent holding a concurrency slot under the
        call's deadline, both kept until the block ends; ``None`` when ``cancel`` came first."""
        with self._slot(cancel) as acquired, call_deadline(self.timeout):
            yield self._send(payload, stream=stream, cancel=cancel) if acquired else None

    def _wait(self, seconds: float, cancel: threading.Event | None) -> bool:
        """Sleep ``seconds``; False if ``cancel`` was set meanwhile."""
        if cancel is None:
            time.sleep(seconds)
            return True
        return not cancel.wait(seconds)

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        delay = self.backoff * (2**attempt) * (0.5 + self._rng.random())
        hinted = _retry_after(response) if response is not None else None
        if hinted is not None:
            delay = max(delay, hinted)
        return min(delay, _MAX_DELAY_S)

    def _send(self, payload: dict[str, Any], *, stream: bool, cancel: threading.Event | None) -> httpx.Response | None:
        """POST ``payload`` with retries; returns a successful response (streamed when ``stream``), or
        None when ``cancel`` was set between attempts."""
        url = f"{self.base_url}/chat/completions"
        attempts = self.max_retries + 1
        last_error: str = ""
        for attempt in range(attempts):
            response: httpx.Response | None = None
            try:
                response = self._client.send(
                    self._client.build_request("POST", url, json=payload, headers=self._headers), stream=stream
                )
            except _RETRY_ERRORS as err:
                last_error = f"{type(err).__name__}: {err}"
            except httpx.TimeoutException as err:
                raise self._timed_out() from err
            except httpx.HTTPError as err:
                raise RemoteConnectionError(
                    f"Cannot talk to the model server at {self.base_url}: {type(err).__name__}: {err}. "
                    "Check base_url (e.g. http://127.0.0.1:8000/v1)."
                ) from err
            else:
                if response.status_code < 400:
                    return response
                if response.status_code in RETRY_STATUSES and attempt + 1 < attempts:
                    last_error = f"HTTP {response.status_code}"
                    response.close()
                else:
                    if stream:
                        response.read()
                    message = _server_message(response)
                    response.close()
                    raise RemoteResponseError(
                        f"The model server at {self.base_url} answered {response.status_code}: {message}",
                        status_code=response.status_code,
                    )
            if attempt + 1 < attempts:
                delay = self._delay(attempt, response)
                left = time_left()
                if left is not None and delay >= left:
                    raise self._timed_out()
                if not self._wait(delay, cancel):
                    return None
        raise RemoteConnectionError(
            f"Cannot reach the model server at {self.base_url} after {attempts} attempt(s) (last error: "
            f"{last_error}). Check that it is running (e.g. `hd4k serve --model DIR --port 8000`) and "
            "that base_url and the port are right."
        )

    def _timed_out(self) -> RemoteConnectionError:
        return RemoteConnectionError(
            f"The model server at {self.base_url} did not finish answering within timeout={self.timeout} s "
            "(the whole call); raise RemoteRunner(timeout=...) for long answers, or ask for fewer tokens."
        )

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise RemoteResponseError(
                f"The server at {self.base_url} answered {response.status_code} with a body that is not "
                f"JSON: {response.text[:200]!r}",
                status_code=response.status_code,
            ) from err
        if not isinstance(data, dict):
            raise RemoteResponseError(
                f"The server at {self.base_url} answered with JSON that is not an object: {str(data)[:200]}",
                status_code=response.status_code,
            )
        return data

    def _message(self, data: dict[str, Any], status: int) -> tuple[str, str]:
        """(text, finish_reason) of a whole chat completion."""
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            finish = choice.get("finish_reason") or "stop"
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise RemoteResponseError(
                f"The server at {self.base_url} answered without choices[0].message: {_excerpt(data)}",
                status_code=status,
            ) from err
        if not isinstance(text, str) or not isinstance(finish, str):
            raise RemoteResponseError(
                f"The server at {self.base_url} answered with a message content or finish_reason that is not "
                f"text: {_excerpt(choice)}",
                status_code=status,
            )
        return text, finish

    def _stream_call(self, request: GenerationRequest, emit: Any, cancel: threading.Event) -> RunnerResult:
        # Deltas of the stripped answer (as every runner gives): a server may start with a space (vLLM's
        # detokenizer keeps the first piece's word boundary) or end with whitespace.
        trim, emit_raw = StopFilter(), emit

        def emit(delta: str) -> None:
            if out := trim.feed(delta):
                emit_raw(out)

        started = time.perf_counter()
        plans = _plans_for(request)
        payload = self._payload(request, stream=True)
        pieces: list[str] = []
        finish: str | None = None
        usage: dict[str, Any] | None = None
        extension: dict[str, Any] | None = None
        with self._exchange(payload, stream=True, cancel=cancel) as response:
            if response is None:
                return self._result("", "cancelled", plans, None, None, started)
            if response.headers.get("content-type", "").startswith("application/json"):
                # A server that ignores stream=true and answers whole: one delta.
                try:
                    response.read()
                finally:
                    response.close()
                data = self._json(response)
                text, finish = self._message(data, response.status_code)
                emit(text)
                if tail := trim.finish():
                    emit_raw(tail)
                return self._result(text, finish, plans, data.get("usage"), data.get("hd4k"), started)
            done, finish, usage, extension, cancelled = self._read_sse(response, cancel, emit, pieces)
            if cancelled:
                return self._result("".join(pieces), "cancelled", plans, usage, extension, started)
        if not done and finish is None:
            raise RemoteConnectionError(
                f"The connection to {self.base_url} ended before the answer was complete (no finish_reason "
                "and no [DONE]); the server may have crashed or restarted. Retry the request."
            )
        if tail := trim.finish():
            emit_raw(tail)
        return self._result("".join(pieces), finish or "stop", plans, usage, extension, started)

    def _read_sse(
        self, response: httpx.Response, cancel: threading.Event, emit: Any, pieces: list[str]
    ) -> tuple[bool, str | None, dict[str, Any] | None, dict[str, Any] | None, bool]:
        """Read a streamed answer's events (closing ``response``), each delta appended to ``pieces`` and
        passed to ``emit``; return ``(done, finish, usage, extension, cancelled)``, ``done`` once ``[DONE]``
        came."""
        finish: str | None = None
        usage: dict[str, Any] | None = None
        extension: dict[str, Any] | None = None
        done = False
        try:
            for line in sse_lines(response.iter_bytes(), self.max_sse_line_bytes, self.base_url):
                if cancel.is_set():
                    return done, finish, usage, extension, True
                if not line.startswith("data:"):
                    continue  # blank separators, comments, "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    return True, finish, usage, extension, False
                event = self._event(data)
                if "error" in event:
                    err = event["error"]
                    message = err.get("message") if isinstance(err, dict) else str(err)
                    raise RemoteResponseError(
                        f"The model server at {self.base_url} failed mid-answer: {message}", status_code=None
                    )
                usage = event.get("usage") or usage
                extension = event.get("hd4k") or extension
                for delta, choice_finish in self._deltas(event):
                    if delta:
                        pieces.append(delta)
                        emit(delta)
                    finish = choice_finish or finish
        except httpx.TimeoutException as err:
            raise RemoteConnectionError(
                f"The model server at {self.base_url} stopped sending mid-answer for longer than "
                f"timeout={self.timeout} s; raise RemoteRunner(timeout=...)."
            ) from err
        except httpx.HTTPError as err:
            raise RemoteConnectionError(
                f"The connection to {self.base_url} dropped in the middle of the answer "
                f"({type(err).__name__}: {err}); the server may have crashed or restarted. Retry the "
                "request."
            ) from err
        finally:
            response.close()
        return False, finish, usage, extension, False

    def _deltas(self, event: dict[str, Any]) -> list[tuple[str | None, str | None]]:
        """(content delta, finish_reason) of each choice of a stream event, every value checked before
        any is emitted."""
        choices = event.get("choices") or []
        if not isinstance(choices, list):
            raise RemoteResponseError(f"The server at {self.base_url} sent stream choices that are not a list.")
        out: list[tuple[str | None, str | None]] = []
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            content = delta.get("content") if isinstance(delta, dict) else None
            finish = choice.get("finish_reason") if isinstance(choice, dict) else None
            if (
                not isinstance(choice, dict)
                or not isinstance(delta, dict | None)
                or not isinstance(content, str | None)
                or not isinstance(finish, str | None)
            ):
                raise RemoteResponseError(
                    f"The server at {self.base_url} sent a malformed stream choice (a choice must be an object "
                    f"whose delta.content and finish_reason are text): {_excerpt(choice)}"
                )
            out.append((content, finish))
        return out

    def _event(self, data: str) -> dict[str, Any]:
        try:
            event = json.loads(data)
        except (json.JSONDecodeError, RecursionError) as err:
            raise RemoteResponseError(
                f"The server at {self.base_url} sent a stream event that is not JSON: {data[:200]!r}"
            ) from err
        if not isinstance(event, dict):
            raise RemoteResponseError(f"The server at {self.base_url} sent a stream event that is not an object.")
        return event

    def _count(self, value: object, name: str) -> int:
        """A token count from the server: absent is 0; anything but a non-negative int is refused."""
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise RemoteResponseError(
                f"The server at {self.base_url} sent {name}={_excerpt(value)}, which is not a token count."
            )
        return value

    def _result(
        self,
        text: str,
        finish: str,
        plans: list[HDPlan],
        usage: dict[str, Any] | None,
        extension: dict[str, Any] | None,
        started: float,
    ) -> RunnerResult:
        summaries = [PlanSummary.from_plan(p) for p in plans]
        timings = Timings()
        image_tokens = sum(p.num_tokens for p in plans)
        if isinstance(extension, dict):
            server_plans = extension.get("plans")
            if isinstance(server_plans, list) and len(server_plans) == len(plans):
                with contextlib.suppress(ValueError, TypeError):
                    # The server planned the pre-sized upload; report the size the caller passed.
                    summaries = [
                        PlanSummary.model_validate({**sp, "input_size": (p.width, p.height)})
                        for sp, p in zip(server_plans, plans, strict=True)
                    ]
            if isinstance(extension.get("timings"), dict):
                with contextlib.suppress(ValueError, TypeError):
                    timings = Timings.model_validate(extension["timings"])
            if isinstance(extension.get("image_tokens"), int):
                image_tokens = extension["image_tokens"]
        u = usage if isinstance(usage, dict) else {}
        if usage is not None and not isinstance(usage, dict):
            raise RemoteResponseError(f"The server at {self.base_url} sent a usage that is not an object.")
        result_usage = Usage(
            prompt_tokens=self._count(u.get("prompt_tokens"), "usage.prompt_tokens"),
            image_tokens=self._count(image_tokens, "hd4k.image_tokens"),
            completion_tokens=self._count(u.get("completion_tokens"), "usage.completion_tokens"),
        )
        timings = timings.model_copy(update={"total_s": time.perf_counter() - started})
        return RunnerResult(
            text=text.strip(),
            model=self._model,
            finish_reason=finish,
            plans=summaries,
            usage=result_usage,
            timings=timings,
        )


def _sampling_options(g: GenerationConfig) -> dict[str, Any]:
    """The sampling, penalty and bias options of a chat-completions body (only those not at their default)."""
    options: dict[str, Any] = {}
    if g.do_sample:
        options["temperature"] = g.temperature
        if g.top_p != 1.0:
            options["top_p"] = g.top_p
        if g.top_k:
            options["top_k"] = g.top_k
    else:
        options["temperature"] = 0.0
    if g.seed is not None:
        options["seed"] = g.seed
    if g.repetition_penalty != 1.0:
        options["repetition_penalty"] = g.repetition_penalty
    # OpenAI's own options: every OpenAI-compatible server (hd4k serve, vLLM) takes them.
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(g, name):
            options[name] = getattr(g, name)
    if g.logit_bias:
        options["logit_bias"] = {str(t): b for t, b in g.logit_bias}
    return options
