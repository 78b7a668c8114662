"""An OpenAI-compatible HTTP server over a :class:`~hd4k_tools.runtime.runner.Runner` (extra ``serve``).

``create_app(runner)`` returns a FastAPI application with

* ``POST /v1/chat/completions``: OpenAI chat completions (text and ``image_url`` content parts, streaming
  with server-sent events and keep-alive comments during long prefills, ``response_format``
  ``json_object`` / ``json_schema`` by constrained decoding and validation, ``tool`` messages),
  plus the extensions ``hd_num`` (an int, ``"auto"``, or one per image), ``region`` (``[x0, y0, x1, y1]`` in
  image fractions, one for every image or one per image: only that part is read, with the whole hd_num;
  OpenAI clients send it in ``extra_body``), ``top_k``,
  ``repetition_penalty``, ``num_beams`` and ``layout`` (``"chat"`` or ``"eval"``). Responses carry an
  extension field ``hd4k`` with the tile plans, timings and image-token count. ``tools`` are refused with
  400 ``tools_not_supported`` (the model has no tool calling; the message says how to use the hd4k tools).
  ``mm_processor_kwargs`` (``hd_num``, ``layout``) is read as the vLLM engine reads it.
* ``POST /v1/completions``: a text ``prompt`` answered as one user turn, in the ``text_completion`` shape
  (whole or streamed); images go to the chat route.
* ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` (``?verbose=true``: state and cache
  statistics) and ``GET /metrics`` (Prometheus text format, bounded labels); ``/docs`` and
  ``/openapi.json`` describe the API. Every response carries ``x-request-id`` (the client's, when sane).

Untrusted input never reaches the model unchecked: the request body is capped (``max_request_bytes``),
images go through :func:`hd4k_tools.inputs.images.load_image` under an :class:`ImagePolicy` (pixel and byte
limits; ``http(s)`` image URLs only with ``allow_image_urls=True`` and never to private addresses unless
the policy says so), and every error is answered in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` — 400/413 for bad input, 500 with a generic message
(the traceback goes to the server log only) for bugs.

Decoding defaults are the runner's (:class:`GenerationConfig`: greedy, 512 new tokens) for every setting a
request leaves out; ``temperature: 0`` is greedy, any other temperature samples. So that one request cannot
hold the model for long or exhaust its memory, ``max_tokens`` above the server's ``max_tokens_limit``
(default :data:`DEFAULT_MAX_TOKENS_LIMIT`) is refused with 400 (not clamped: a silently shorter answer
would look like a complete one), and ``num_beams`` is at most
:data:`~hd4k_tools.runtime.generation_config.MAX_NUM_BEAMS`. A request's ``model`` must be a name ``/v1/models``
lists (the served name, and without ``served_model_name`` the ``--model`` argument); another is a 404
``model_not_found``, as OpenAI answers. Streamed and whole answers are cut at ``stop`` sequences and trimmed of
surrounding whitespace the same way, so the deltas join to the whole answer.

Generation runs in a worker thread, so the event loop keeps answering (``/health`` stays responsive
during a long answer); a client that disconnects cancels its generation between two tokens. Each request
is logged as one JSON line on the ``hd4k_tools.serve.access`` logger.

``run_server(model_dir)`` binds the port (a port already in use fails at once, before the model loads),
loads the native model and serves it with uvicorn; ``hd4k serve --model DIR`` (or
``python -m hd4k_tools.serve.app --model DIR``) does the same from a shell.

The parts, one job each: :mod:`~hd4k_tools.serve.schemas` (request/response models),
:mod:`~hd4k_tools.serve.errors` (OpenAI-shaped errors), :mod:`~hd4k_tools.serve.chat` (request ->
``GenerationRequest``), :mod:`~hd4k_tools.serve.generate` (whole and structured answers),
:mod:`~hd4k_tools.serve.responses` (response bodies, SSE), :mod:`~hd4k_tools.serve.routes` (the FastAPI
routes), :mod:`~hd4k_tools.serve.metrics` and :mod:`~hd4k_tools.serve.accesslog`,
:mod:`~hd4k_tools.serve.factory` (``create_app``) and :mod:`~hd4k_tools.serve.run` (bind, uvicorn, CLI).
FastAPI and uvicorn are imported only when an app is built or served; without them
:class:`~hd4k_tools.errors.MissingDependencyError` says what to install.
"""

from __future__ import annotations

from hd4k_tools.serve.chat import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_TOKENS_LIMIT, DEFAULT_SSE_KEEPALIVE_S
from hd4k_tools.serve.errors import APIError
from hd4k_tools.serve.factory import create_app
from hd4k_tools.serve.run import ServeError, build_parser, main, run_server, serve_from_args, served_name
from hd4k_tools.serve.schemas import ChatCompletionRequest

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_MAX_TOKENS_LIMIT",
    "DEFAULT_SSE_KEEPALIVE_S",
    "APIError",
    "ChatCompletionRequest",
    "ServeError",
    "build_parser",
    "create_app",
    "main",
    "run_server",
    "serve_from_args",
    "served_name",
]

if __name__ == "__main__":
    raise SystemExit(main())
