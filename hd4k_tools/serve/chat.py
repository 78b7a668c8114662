"""One chat-completion request body -> a :class:`~hd4k_tools.runtime.runner.GenerationRequest`.

:func:`prepare` parses and validates the JSON body, refuses what the model cannot do (``tools``: it has no
tool calling), reads ``response_format`` into a :class:`~hd4k_tools.structured.StructuredOutput`, turns the
messages into :class:`Message` objects (images loaded under the server's :class:`ImagePolicy`; ``tool``
results as user turns, as ``ChatHD4K`` reads a LangChain ``ToolMessage``), resolves the generation settings
and plans every image once. It runs in a worker thread: JSON and image decoding are CPU work.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from PIL import Image
from pydantic import ValidationError

from hd4k_tools.errors import ContextOverflowError, HD4KError, InputError
from hd4k_tools.inputs.images import ImageHeader, SourceBytes, probe_image, read_source_bytes
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.models.registry import DEFAULT_FAMILY, HDNum, HDPlan, ModelFamily
from hd4k_tools.runtime.generation_config import GenerationConfig
from hd4k_tools.runtime.runner import GenerationRequest, Message, Runner
from hd4k_tools.serve import limits
from hd4k_tools.serve.errors import APIError, api_error_from, validation_message
from hd4k_tools.serve.schemas import ChatCompletionRequest, ResponseFormat, _ChatMessage, _TextPart
from hd4k_tools.structured import StructuredOutput
from hd4k_tools.tasks import tool_specs
from hd4k_tools.zoom import Region, check_region, crop_region, region_box, snap_region

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_MAX_TOKENS_LIMIT",
    "DEFAULT_SSE_KEEPALIVE_S",
    "MAX_STOP_SEQUENCES",
    "Prepared",
    "ServeSettings",
    "check_model",
    "generation_config",
    "prepare",
    "tool_result_prefix",
]

#: Default cap on a request body: a few full-resolution images as base64 data URLs.
DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
#: Default cap on ``max_tokens``: four times the longest task default (``read_document``, 1024 tokens).
DEFAULT_MAX_TOKENS_LIMIT = 4096
#: Default interval of SSE keep-alive comments while a streamed answer waits for its first token.
DEFAULT_SSE_KEEPALIVE_S = 10.0
#: Most stop sequences one request may give.
MAX_STOP_SEQUENCES = 16
# A json_schema bigger than this is refused: it is prompt text, and the context is finite.
_MAX_SCHEMA_CHARS = 32_000

TOOLS_UNSUPPORTED = (
    "This model (InternLM-XComposer2-4KHD) has no tool calling, so 'tools' cannot be honoured: an answer "
    "would be prose with no tool call. Send the request without 'tools' (or with tool_choice \"none\"), "
    "and to let an agent see documents and images give its tool-calling LLM the hd4k tools instead: "
    f"{', '.join(tool_specs())} (langchain_hd4k.HD4KToolkit, "
    "llama_index_hd4k.HD4KToolSpec, or hd4k_tools.AgentTools over HD4K.remote(<this server>))."
)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A validated request, ready for the runner."""

    request: GenerationRequest
    stream: bool
    include_usage: bool
    stops: tuple[str, ...]
    structured: StructuredOutput | None = None
    #: ``logprobs: true``: stream chunks carry their tokens' entries.
    logprobs: bool = False
    #: With ``region``: the box read of each image (snapped outward to whole pixels; ``None``: all of it).
    regions: tuple[Region | None, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What :func:`~hd4k_tools.serve.app.create_app` was given, checked."""

    runner: Runner
    policy: ImagePolicy
    allow_image_urls: bool
    default_hd_num: HDNum
    model_name: str
    max_request_bytes: int
    api_key: str | None
    max_tokens_limit: int
    sse_keepalive_s: float = DEFAULT_SSE_KEEPALIVE_S
    body_timeout: float = limits.DEFAULT_BODY_TIMEOUT_S
    upload_slots: limits.UploadSlots = dataclasses.field(
        default_factory=lambda: limits.UploadSlots(limits.DEFAULT_MAX_CONCURRENT_UPLOADS)
    )
    #: Other names a request's ``model`` may use (listed by ``/v1/models`` after ``model_name``).
    model_aliases: tuple[str, ...] = ()

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name this server answers to: the served name first, then the aliases."""
        return (self.model_name, *(a for a in dict.fromkeys(self.model_aliases) if a != self.model_name))


def check_model(model: str | None, settings: ServeSettings) -> None:
    """A request's ``model`` must be one of :attr:`ServeSettings.model_names` (or left out): another name is
    a 404 ``model_not_found``, as OpenAI answers it, rather than an answer from a model the client did not
    ask for."""
    if model is None or model in settings.model_names:
        return
    names = ", ".join(repr(n) for n in settings.model_names)
    shown = model if len(model) <= 200 else model[:200] + "..."
    raise APIError(
        404,
        f"The model {shown!r} does not exist on this server; it serves {names} (GET /v1/models lists them).",
        code="model_not_found",
    )


def _with_mm_processor_kwargs(body: ChatCompletionRequest) -> ChatCompletionRequest:
    """``mm_processor_kwargs.hd_num`` / ``.layout`` (vLLM's spelling) as the top-level ``hd_num`` /
    ``layout``; both spellings with different values are a 400."""
    mm = body.mm_processor_kwargs
    if mm is None:
        return body
    changes: dict[str, Any] = {}
    for name in ("hd_num", "layout"):
        value, top = getattr(mm, name), getattr(body, name)
        if value is None:
            continue
        if top is not None and top != value:
            raise APIError(
                400,
                f"{name}={top!r} and mm_processor_kwargs.{name}={value!r} disagree; send one of them.",
                param=f"mm_processor_kwargs.{name}",
            )
        changes[name] = value
    return body.model_copy(update=changes)


def generation_config(body: ChatCompletionRequest, max_tokens_limit: int) -> GenerationConfig:
    """The request's decoding settings over the runner's defaults (``max_tokens`` capped by the server)."""
    changes: dict[str, Any] = {}
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None:
        if max_tokens > max_tokens_limit:
            field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise APIError(
                400,
                f"{field}={max_tokens} is over this server's limit of {max_tokens_limit} new tokens; ask for "
                f"at most {max_tokens_limit} (the server's --max-tokens-limit).",
                param=field,
                code="max_tokens_too_large",
            )
        changes["max_new_tokens"] = max_tokens
    elif GenerationConfig.max_new_tokens > max_tokens_limit:
        # The client asked for nothing: the server's own default must respect the server's own cap.
        changes["max_new_tokens"] = max_tokens_limit
    if body.temperature is not None:
        # OpenAI's temperature 0 means "as deterministic as possible": greedy decoding.
        if body.temperature == 0:
            changes["do_sample"] = False
        else:
            changes["do_sample"] = True
            changes["temperature"] = body.temperature
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs", code="invalid_logprobs")
    if body.logprobs:
        changes["logprobs"] = True
        changes["top_logprobs"] = body.top_logprobs or 0
    if body.logit_bias:
        changes["logit_bias"] = body.logit_bias
    for name in ("top_p", "top_k", "repetition_penalty", "num_beams", "seed", "presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None:
            changes[name] = value
    try:
        return GenerationConfig(**changes)
    except ValueError as err:
        param = next(
            (n for n in ("logit_bias", "logprobs", "presence_penalty", "frequency_penalty") if n in str(err)), None
        )
        raise APIError(
            400, f"Invalid generation settings: {err}", param=param, code="invalid_generation_settings"
        ) from err


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"At most {MAX_STOP_SEQUENCES} stop sequences are supported.", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "Stop sequences must be non-empty strings.", param="stop")
    return tuple(stops)


def _load_image_part(url: str, settings: ServeSettings, param: str) -> SourceBytes:
    """The image's bytes, header-checked but not decoded: ``limits.load_request_images`` decodes once the
    whole request fits its budget."""
    head = url.lstrip()[:16].lower()
    if head.startswith("data:"):
        policy = dataclasses.replace(settings.policy, allow_urls=False)
    elif head.startswith(("http://", "https://")):
        if not settings.allow_image_urls:
            raise APIError(
                400,
                "Image URLs are disabled on this server; send the image inline as a data URL "
                "(data:image/png;base64,...), or start the server with --allow-image-urls.",
                param=param,
                code="image_url_not_allowed",
            )
        policy = dataclasses.replace(settings.policy, allow_urls=True)
    else:
        # Anything else would be read as a path or raw base64 by load_image: never from a client.
        raise APIError(
            400,
            "image_url.url must be a data URL (data:image/...;base64,...) or an http(s) URL.",
            param=param,
            code="invalid_image_url",
        )
    try:
        raw = read_source_bytes(url, policy=policy)
        probe_image(raw, policy=policy)  # the header promise, per image, so errors name the part
    except HD4KError as err:
        raise api_error_from(err, param=param) from err
    return raw


def tool_result_prefix(name: str | None) -> str:
    """The line that introduces a tool result, as ``ChatHD4K`` writes it for a ``ToolMessage``."""
    return f"Result of the tool {name}:\n" if name else "Tool result:\n"


def _tool_names(messages: Sequence[_ChatMessage]) -> dict[str, str]:
    """``tool_call_id -> function name`` from the assistant messages' ``tool_calls``."""
    names: dict[str, str] = {}
    for m in messages:
        for call in m.tool_calls or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(call.get("id"), str) and isinstance(function, dict) and isinstance(function.get("name"), str):
                names[call["id"]] = function["name"]
    return names


def _messages(body: ChatCompletionRequest, settings: ServeSettings) -> tuple[Message, ...]:
    out: list[Message] = []
    tool_names = _tool_names(body.messages)
    for i, m in enumerate(body.messages):
        role = {"developer": "system", "tool": "user"}.get(m.role, m.role)
        parts: list[Any] = []
        if m.role == "tool":
            parts.append(tool_result_prefix(m.name or tool_names.get(m.tool_call_id or "")))
        if isinstance(m.content, str):
            parts.append(m.content)
        elif m.content is not None:
            for j, part in enumerate(m.content):
                if isinstance(part, _TextPart):
                    parts.append(part.text)
                else:
                    url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                    param = f"messages.{i}.content.{j}.image_url.url"
                    if role != "user":
                        raise APIError(400, "Images are only accepted in user and tool messages.", param=param)
                    parts.append(_load_image_part(url, settings, param))
        out.append(Message(role, tuple(parts)))  # type: ignore[arg-type]
    if out[-1].role != "user":
        raise APIError(400, "The last message must be a user message (the question to answer).", param="messages")
    if any(m.role == "system" for m in out[1:]):
        raise APIError(400, "A system message is only allowed as the first message.", param="messages")
    return tuple(out)


def _refuse_tools(body: ChatCompletionRequest) -> None:
    """``tools``/``functions`` (unless ``tool_choice`` is ``"none"``) are refused. Without any tool,
    ``tool_choice`` (``"none"``, ``"auto"``, ``"required"``) selects among nothing and is a no-op: LlamaIndex's
    structured predict sends ``"required"`` with no tools (docs/decisions.md); a named function is refused
    (this model cannot call it)."""
    choice = body.tool_choice
    if (body.tools or body.functions) and choice != "none":
        raise APIError(400, TOOLS_UNSUPPORTED, param="tools", code="tools_not_supported")
    if choice is not None and choice not in ("none", "auto", "required"):
        raise APIError(400, TOOLS_UNSUPPORTED, param="tool_choice", code="tools_not_supported")


def _structured(fmt: ResponseFormat | None) -> StructuredOutput | None:
    """``response_format`` as a :class:`StructuredOutput` (``None`` for plain text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput.from_schema(None)
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
    if not isinstance(schema, dict):
        raise APIError(
            400,
            'response_format type "json_schema" needs json_schema.schema (a JSON schema object), e.g. '
            '{"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object", ...}}}.',
            param="response_format.json_schema.schema",
            code="invalid_response_format",
        )
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError, RecursionError):
        size = _MAX_SCHEMA_CHARS + 1
    if size > _MAX_SCHEMA_CHARS:
        raise APIError(
            400,
            f"response_format.json_schema.schema is longer than {_MAX_SCHEMA_CHARS:,} characters of JSON; it is "
            "shown to the model as prompt text, so send a smaller schema.",
            param="response_format.json_schema.schema",
            code="invalid_response_format",
        )
    try:
        return StructuredOutput.from_schema(schema)
    except InputError as err:
        raise APIError(400, str(err), param="response_format.json_schema.schema", code="invalid_json_schema") from err


def _family(settings: ServeSettings) -> ModelFamily:
    """The model family of the served runner (its prompt layout and planner)."""
    family = getattr(settings.runner, "family", None)
    return family if isinstance(family, ModelFamily) else DEFAULT_FAMILY


def _plans(
    body: ChatCompletionRequest,
    headers: Sequence[Any],
    gen: GenerationConfig,
    settings: ServeSettings,
    text_tokens: int,
) -> tuple[HDPlan, ...]:
    """The request's plans, made once from the image headers (before any decode), reserving the prompt's
    own ``text_tokens`` for ``"auto"``."""
    try:
        return _family(settings).plan_images(
            headers,
            body.hd_num,
            default_hd_num=settings.default_hd_num,
            context_length=settings.runner.context_length,
            max_new_tokens=gen.max_new_tokens,
            text_tokens=text_tokens,
        )
    except ContextOverflowError as err:
        raise APIError(400, str(err), param="max_tokens", code="context_length_exceeded") from err
    except InputError as err:
        raise api_error_from(err, param="hd_num") from err


def _region_boxes(body: ChatCompletionRequest, messages: Sequence[Message]) -> list[Region | None] | None:
    """The request's ``region`` as one checked box per image (``None``: the whole image), or ``None`` when
    the request has none. One box applies to every image; a list gives one per image."""
    if body.region is None:
        return None
    count = sum(1 for m in messages for p in m.content if not isinstance(p, str))
    if body.region and all(isinstance(r, list | type(None)) for r in body.region):
        boxes = list(body.region)
        if len(boxes) != count:
            raise APIError(
                400, f"{len(boxes)} regions for {count} images; give one per image, or one box.", param="region"
            )
    else:
        boxes = [body.region] * count
    try:
        return [None if b is None else check_region(b) for b in boxes]
    except InputError as err:
        raise APIError(400, str(err), param="region", code="invalid_region") from err


@dataclasses.dataclass(frozen=True)
class _Size:
    """The size an image will have once cropped (what the planner reads)."""

    width: int
    height: int


def _cropped_sizes(headers: Sequence[ImageHeader], boxes: list[Region | None] | None) -> list[Any]:
    """Each header's size after its region's crop, so the one planning (from headers) plans the crop."""
    if boxes is None:
        return list(headers)
    out: list[Any] = []
    for header, box in zip(headers, boxes, strict=True):
        if box is None:
            out.append(header)
            continue
        x0, y0, x1, y1 = region_box(header.width, header.height, box)
        out.append(_Size(x1 - x0, y1 - y0))
    return out


def _crop_regions(messages: tuple[Message, ...], boxes: list[Region | None] | None) -> tuple[Message, ...]:
    """The decoded images cropped to their boxes (pixel-exact, no resampling)."""
    if boxes is None:
        return messages
    checked = iter(boxes)
    return tuple(
        Message(m.role, tuple(crop_region(p, next(checked)) if isinstance(p, Image.Image) else p for p in m.content))
        for m in messages
    )


def _read_regions(messages: tuple[Message, ...], boxes: list[Region | None] | None) -> tuple[Region | None, ...] | None:
    """Each image's box as read: its region snapped outward to whole pixels of the image (before the crop)."""
    if boxes is None:
        return None
    images = [p for m in messages for p in m.content if isinstance(p, Image.Image)]
    return tuple(None if b is None else snap_region(i.width, i.height, b) for i, b in zip(images, boxes, strict=True))


def _parse_body(raw: bytes) -> ChatCompletionRequest:
    """The request body as a validated :class:`ChatCompletionRequest`, or a 400 naming what is wrong."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: also 4,300+ digit ints
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise APIError(400, f"The request body is not valid JSON: {reason}", code="invalid_json") from err
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        message, param = validation_message(err)
        raise APIError(400, message, param=param) from err


def prepare(raw: bytes, settings: ServeSettings) -> Prepared:
    """Parse, validate and load a request body (runs in a worker thread: JSON and image decoding are
    CPU work).

    Raises:
        APIError: anything the client must change (400/413), in OpenAI's shape.
    """
    body = _parse_body(raw)
    check_model(body.model, settings)
    body = _with_mm_processor_kwargs(body)
    if body.n not in (None, 1):
        raise APIError(400, "Only n=1 is supported: one answer per request.", param="n", code="unsupported_n")
    _refuse_tools(body)
    structured = _structured(body.response_format)
    if structured is not None and body.stop:
        raise APIError(
            400,
            "stop and a JSON response_format do not combine: a stop sequence would cut the JSON; drop stop.",
            param="stop",
            code="invalid_response_format",
        )
    gen = generation_config(body, settings.max_tokens_limit)
    stops = _stops(body.stop)
    messages = _messages(body, settings)
    boxes = _region_boxes(body, messages)
    layout = body.layout or "chat"
    try:
        text_tokens = _family(settings).prompt_text_tokens(settings.runner.count_text_tokens, messages, layout)
        messages, plans = limits.load_request_images(
            messages,
            policy=settings.policy,
            plan=lambda headers: _plans(body, _cropped_sizes(headers, boxes), gen, settings, text_tokens),
            context_length=settings.runner.context_length,
            text_tokens=text_tokens,
        )
    except HD4KError as err:
        raise api_error_from(err, param="messages") from err
    regions = _read_regions(messages, boxes)
    messages = _crop_regions(messages, boxes)
    request = GenerationRequest.planned(
        messages,
        plans,
        generation=gen,
        layout=layout,
        constraint=structured.constraint if structured is not None else None,
    )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Prepared(
        request=request,
        stream=body.stream,
        include_usage=include_usage,
        stops=stops,
        structured=structured,
        logprobs=bool(body.logprobs),
        regions=regions,
    )
