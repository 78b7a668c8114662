"""``POST /v1/completions`` as a view of the chat route: a completion body becomes a one-turn chat body
(the ``prompt`` as the user's message, every shared field as it is), and the chat answer, whole or
streamed, is rewritten into OpenAI's ``text_completion`` shape. So generation, limits, stop sequences,
cancellation, metrics and errors are the chat route's own.

The prompt is answered as one user turn of the model's conversation template, not continued as raw text:
the engines render every prompt with the model family's template (docs/decisions.md, "/v1/completions
answers the prompt as one user turn"). Images have no place in a text prompt: they go to
``/v1/chat/completions`` as ``image_url`` parts.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from hd4k_tools.serve.errors import APIError, validation_message
from hd4k_tools.serve.schemas import CompletionRequest

__all__ = ["completion_as_chat", "completion_body", "completion_events"]

# Fields of a completion request that a chat request does not have (each checked below).
_COMPLETION_ONLY = ("prompt", "echo", "suffix", "best_of", "logprobs")


def _refuse(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def completion_as_chat(raw: bytes) -> bytes:
    """The chat-completion body that answers the completion body ``raw``.

    Raises:
        APIError: 400 for a body that is not a JSON object, a prompt that is not text (token ids, images,
            several prompts) and the completion options this server cannot honour.
    """
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise APIError(400, f"The request body is not valid JSON: {reason}", code="invalid_json") from err
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = data["prompt"] = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(
            400,
            "prompt must be one text string (token ids, several prompts and images are not supported here); "
            "send images to /v1/chat/completions as image_url content parts.",
            param="prompt",
            code="invalid_prompt",
        )
    try:
        body = CompletionRequest.model_validate(data)
    except ValidationError as err:
        message, param = validation_message(err)
        raise APIError(400, message, param=param) from err
    if body.echo:
        raise _refuse("echo", "echo=true is not supported: the answer never repeats the prompt; drop echo.")
    if body.suffix:
        raise _refuse("suffix", "suffix (fill-in-the-middle) is not supported by this model; drop suffix.")
    if body.best_of not in (None, 1):
        raise _refuse("best_of", "Only best_of=1 is supported: one answer per request.")
    if body.logprobs is not None:
        raise _refuse(
            "logprobs", "logprobs are not available on /v1/completions; use /v1/chat/completions with logprobs."
        )
    chat = {k: v for k, v in data.items() if k not in _COMPLETION_ONLY}
    chat["messages"] = [{"role": "user", "content": prompt}]
    return json.dumps(chat).encode()


def _choice(chat_choice: dict[str, Any]) -> dict[str, Any]:
    """A chat choice (``message`` or ``delta``) as a completion choice (``text``)."""
    message = chat_choice.get("message") or chat_choice.get("delta") or {}
    return {
        "index": chat_choice.get("index", 0),
        "text": message.get("content") or "",
        "finish_reason": chat_choice.get("finish_reason"),
        "logprobs": None,
    }


def completion_body(chat: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` (or ``chat.completion.chunk``) body as a ``text_completion`` body."""
    return {
        **{k: v for k, v in chat.items() if k not in ("object", "choices")},
        "object": "text_completion",
        "choices": [_choice(c) for c in chat.get("choices", [])],
    }


async def completion_events(chat_events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chat route's server-sent events as completion events: each ``chat.completion.chunk`` rewritten,
    the role-only first chunk dropped (completions have no roles); comments, errors and ``[DONE]`` as
    they are."""
    try:
        async for event in chat_events:
            if not event.startswith(b"data: {"):
                yield event
                continue
            body = json.loads(event[len(b"data: ") :])
            if body.get("object") != "chat.completion.chunk":  # an error event
                yield event
                continue
            choices = body.get("choices") or []
            if choices and choices[0].get("delta") == {"role": "assistant", "content": ""}:
                continue
            yield f"data: {json.dumps(completion_body(body), ensure_ascii=False)}\n\n".encode()
    finally:
        aclose = getattr(chat_events, "aclose", None)
        if aclose is not None:
            await aclose()
