"""The API's request and response shapes (OpenAI chat completions plus the hd4k extensions).

The request models validate client input (:class:`ChatCompletionRequest`); the response models document
what the server answers in ``/openapi.json`` (the handlers build the JSON themselves, so streaming and
OpenAI-shaped errors stay under their control).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from hd4k_tools.runtime.generation_config import MAX_NUM_BEAMS, MAX_TOP_LOGPROBS

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "Completion",
    "CompletionRequest",
    "ErrorBody",
    "Health",
    "MMProcessorKwargs",
    "ModelCard",
    "ModelList",
    "ResponseFormat",
]


# ----------------------------------------------------------------------------------------------------
# Request
# ----------------------------------------------------------------------------------------------------
class _ImageURL(BaseModel):
    url: str
    detail: str | None = None


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: _ImageURL | str


_Part = Annotated[_TextPart | _ImagePart, Field(discriminator="type")]


class _ChatMessage(BaseModel):
    """One message. ``tool`` messages (results of a tool an agent ran) are read as ChatHD4K reads a
    LangChain ``ToolMessage``: a user turn that starts with "Result of the tool NAME:". An assistant
    message's ``tool_calls`` are accepted and not shown to the model (it cannot call tools)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_Part] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class _StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _JSONSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None

    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(BaseModel):
    """``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema":
    {"name", "schema", "strict"}}``. JSON formats are produced by constrained decoding (the engine only
    lets the model pick tokens that keep the answer valid JSON of the schema), then validated with
    ``jsonschema`` (:mod:`hd4k_tools.structured`)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JSONSchemaFormat | None = None


_HDNumValue = StrictInt | Literal["auto"] | list[StrictInt | Literal["auto"]]


class MMProcessorKwargs(BaseModel):
    """``mm_processor_kwargs``: the per-request keys the vLLM plugin accepts (``hd_num``, ``layout``;
    ``REQUEST_KWARGS`` of :mod:`hd4k_tools.models.xcomposer2_4khd.vllm.processor`), so one client recipe
    (``extra_body={"mm_processor_kwargs": {"hd_num": 9}}``) works on both engines. Other keys are refused,
    as the plugin refuses them."""

    model_config = ConfigDict(extra="forbid")

    hd_num: _HDNumValue | None = None
    layout: Literal["chat", "eval"] | None = None


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` (unknown OpenAI fields are accepted and ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[_ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: StrictInt | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    n: StrictInt | None = Field(default=None, ge=1)
    stream: StrictBool = False
    stream_options: _StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    response_format: ResponseFormat | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # hd4k extensions
    hd_num: _HDNumValue | None = None
    region: list[float] | list[list[float] | None] | None = Field(
        default=None,
        description="hd4k extension: look at part of the image(s) only, [x0, y0, x1, y1] in fractions of the "
        "image (one box for every image, or one per image, null for a whole one); the part gets the whole hd_num. "
        "OpenAI clients send it in extra_body.",
    )
    top_k: StrictInt | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    num_beams: StrictInt | None = Field(default=None, ge=1, le=MAX_NUM_BEAMS)
    layout: Literal["chat", "eval"] | None = None
    # vLLM's spelling of the two above (what the vLLM engine reads), accepted here too
    mm_processor_kwargs: MMProcessorKwargs | None = None


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``: a text ``prompt`` (one string), answered as one user turn.
    Every other field is a chat-completion field and means the same (``max_tokens``, ``temperature``,
    ``stop``, ``stream``, the hd4k extensions...); the completion-only options this server cannot honour
    (``echo``, ``suffix``, ``best_of`` > 1, ``logprobs``) are refused with a 400."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | list[str]
    echo: StrictBool | None = None
    suffix: str | None = None
    best_of: StrictInt | None = Field(default=None, ge=1)
    logprobs: StrictInt | None = Field(default=None, ge=0)


# ----------------------------------------------------------------------------------------------------
# Responses (documentation of what the handlers send)
# ----------------------------------------------------------------------------------------------------
class _Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _HD4KExtension(BaseModel):
    """Tile plans, image tokens and timings of the answer (hd4k extension)."""

    hd_nums: list[int]
    plans: list[dict[str, Any]]
    image_tokens: int
    timings: dict[str, Any] | None
    structured_attempts: int | None = None
    regions: list[list[float] | None] | None = None
    """With ``region``: the box read of each image, snapped outward to whole pixels (``null``: all of it)."""


class _AnswerMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class _TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class _TokenLogprob(_TopLogprob):
    top_logprobs: list[_TopLogprob]


class _Logprobs(BaseModel):
    """``logprobs: true``: one entry per generated token (raw model log-probabilities)."""

    content: list[_TokenLogprob] | None


class _Choice(BaseModel):
    index: int
    message: _AnswerMessage
    finish_reason: Literal["stop", "length"]
    logprobs: _Logprobs | None = None


class ChatCompletion(BaseModel):
    """A whole answer (``stream`` false)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[_Choice]
    usage: _Usage
    hd4k: _HD4KExtension


class _ChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]
    finish_reason: Literal["stop", "length"] | None
    logprobs: _Logprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer (``data: {...}``); the stream ends with
    ``data: [DONE]``. Lines starting with ``:`` are keep-alive comments sent during long prefills."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[_ChunkChoice]
    usage: _Usage | None = None
    hd4k: _HD4KExtension | None = None


class _CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Completion(BaseModel):
    """A ``/v1/completions`` answer (``object`` ``text_completion``; streamed as chunks of the same shape)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[_CompletionChoice]
    usage: _Usage | None = None
    hd4k: _HD4KExtension | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    """``GET /health``; with ``?verbose=true`` also the server's state and cache statistics."""

    status: Literal["ok"]
    model: str
    state: Literal["idle", "busy"] | None = None
    queue_depth: int | None = None
    active_requests: int | None = None
    uptime_s: float | None = None
    context_length: int | None = None
    caches: dict[str, dict[str, int]] | None = None


class _ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error, in OpenAI's shape."""

    error: _ErrorDetail
