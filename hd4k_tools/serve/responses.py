"""The JSON bodies the server answers: whole completions, stream chunks as server-sent events, usage and
the ``hd4k`` extension (tile plans, image tokens, timings)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hd4k_tools.runtime.runner import GenerationRequest, RunnerResult, TokenLogprob

__all__ = ["KEEPALIVE", "chunk", "completion_body", "extension", "finish_reason", "logprobs", "sse", "usage"]

#: An SSE comment line: clients ignore it; it keeps proxies and clients from timing out a long prefill.
KEEPALIVE = b": keep-alive\n\n"


def finish_reason(result: RunnerResult | None, stopped: bool) -> str:
    if stopped:
        return "stop"
    reason = result.finish_reason if result is not None else "stop"
    return reason if reason in ("stop", "length") else "stop"


def usage(result: RunnerResult | None) -> dict[str, int]:
    if result is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    u = result.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def extension(
    result: RunnerResult | None,
    request: GenerationRequest,
    *,
    structured_attempts: int | None = None,
    regions: Sequence[Sequence[float] | None] | None = None,
) -> dict[str, Any]:
    """The ``hd4k`` field: hd_nums, plans, image tokens, timings (and, for a JSON ``response_format``, how
    many model calls the answer took: 1, or 2 after a retry; with ``region``, the box read of each image)."""
    out: dict[str, Any] = {"hd_nums": list(request.hd_nums), "plans": [], "image_tokens": 0, "timings": None}
    if result is not None:
        out["plans"] = [p.model_dump(mode="json") for p in result.plans]
        out["image_tokens"] = result.usage.image_tokens
        out["timings"] = result.timings.model_dump(mode="json")
    if structured_attempts is not None:
        out["structured_attempts"] = structured_attempts
    if regions is not None:
        out["regions"] = [None if r is None else list(r) for r in regions]
    return out


def logprobs(entries: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
    """OpenAI's ``choices[].logprobs`` for these tokens (``None`` when logprobs were not asked for)."""
    if entries is None:
        return None
    return {"content": [e.to_openai() for e in entries], "refusal": None}


def completion_body(
    cid: str,
    created: int,
    model: str,
    text: str,
    finish: str,
    result: RunnerResult,
    request: GenerationRequest,
    *,
    structured_attempts: int | None = None,
    regions: Sequence[Sequence[float] | None] | None = None,
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": logprobs(result.logprobs),
            }
        ],
        "usage": usage(result),
        "hd4k": extension(result, request, structured_attempts=structured_attempts, regions=regions),
    }


def chunk(
    cid: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish: str | None,
    *,
    token_logprobs: Sequence[TokenLogprob] | None = None,
    **extra: Any,
) -> bytes:
    """One SSE chunk; ``token_logprobs``: the entries of the tokens this chunk carries (``logprobs: true``)."""
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs(token_logprobs)}],
        **extra,
    }
    return sse(body)


def sse(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


# ----------------------------------------------------------------------------------------------------
