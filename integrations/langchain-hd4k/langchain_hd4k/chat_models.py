"""``ChatHD4K``: InternLM-XComposer2-4KHD as a LangChain multimodal chat model."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    convert_to_messages,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from PIL import Image
from pydantic import AliasChoices, Field, field_validator

from hd4k_tools import (
    HD4K,
    GenerationRequest,
    ImagePolicy,
    InputError,
    Message,
    RunnerResult,
    StopFilter,
    errors,
)
from hd4k_tools.adapters import as_hd4k, assemble_messages, count_message_tokens, tool_result_parts
from hd4k_tools.runtime.generation_config import generation_keywords
from hd4k_tools.structured import (
    StructuredAnswer,
    StructuredOutput,
    agenerate_structured,
    check_json_schema,
    extract_json_object,
    generate_structured,
    make_validator,
)

# Per-call keyword arguments of invoke/stream that map onto GenerationConfig fields.
_GENERATION_FIELDS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "num_beams",
    "do_sample",
    "seed",
)
# Keyword arguments LangChain itself may forward to _generate/_stream; they carry no model option.
_IGNORED_CALL_KWARGS = frozenset({"stream", "ls_structured_output_format", "structured_output_format", "strict"})
# The JSONConstraint a structured call hands down to the request (constrained decoding in the engine).
_CONSTRAINT_KWARG = "hd4k_constraint"


def _package_version() -> str:
    try:
        return _metadata.version("langchain-hd4k")
    except _metadata.PackageNotFoundError:  # pragma: no cover - imported from a source tree
        from langchain_hd4k import __version__

        return __version__


def model_display_name(model_id: str) -> str:
    """The model's name for traces: a checkpoint folder's name (never its path), a hub id as is."""
    path = Path(model_id)
    if path.is_absolute() or model_id.startswith((".", "~")) or path.exists():
        return path.name or model_id
    return model_id


def _response_format_schema(response_format: Any) -> StructuredOutput:
    """The structured-output spec of an OpenAI-style ``response_format`` (what ``create_agent`` binds)."""
    if isinstance(response_format, Mapping):
        kind = response_format.get("type")
        if kind == "json_object":
            return StructuredOutput.from_schema(None)
        if kind == "json_schema" and isinstance(response_format.get("json_schema"), Mapping):
            schema = response_format["json_schema"].get("schema")
            if isinstance(schema, Mapping):
                return StructuredOutput.from_schema(schema)
    raise InputError(
        f"Unsupported response_format {response_format!r}; use {{'type': 'json_object'}} or "
        "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}."
    )


class ChatHD4K(BaseChatModel):
    """InternLM-XComposer2-4KHD (high-resolution document, chart and image understanding) as a
    LangChain chat model.

    Messages may carry images in any LangChain format, read through ``message.content_blocks``: v1
    standard blocks (``{"type": "image", "base64": ..., "mime_type": ...}`` or ``"url"``), the older
    ``source_type`` blocks and OpenAI ``image_url`` blocks. ``data:`` URLs always work; ``http(s)``
    image URLs only with ``allow_image_urls=True`` (and private/loopback hosts only with
    ``allow_private_urls=True``); local file paths are never read from messages. Each image is cut
    into up to ``hd_num`` 336x336 tiles (``"auto"`` fits the context).

    Multi-turn history (human/AI pairs) and system messages are supported (several system messages
    are joined into one leading system prompt). ``hd_num`` and the generation options can be changed
    per call, e.g. ``model.invoke(messages, hd_num=9, max_new_tokens=20)``. ``stop`` sequences cut
    the answer. ``usage_metadata`` counts image tokens in ``input_tokens`` (also reported as
    ``input_token_details["image"]``); ``response_metadata["hd4k"]`` holds the tile plans and timings.

    Tool calling: the model has **no native tool calling**, so :meth:`bind_tools` raises
    ``NotImplementedError``. To let an agent see documents and images, give a tool-calling LLM the
    tools from :class:`langchain_hd4k.HD4KToolkit`. :meth:`with_structured_output` works through
    JSON-constrained prompting (one retry with the validation error).

    Example:
        .. code-block:: python

            from langchain_core.messages import HumanMessage
            from langchain_hd4k import ChatHD4K

            chat = ChatHD4K.from_pretrained("internlm/internlm-xcomposer2-4khd-7b", hd_num=16)
            msg = HumanMessage(content_blocks=[
                {"type": "text", "text": "What is the total on this invoice?"},
                {"type": "image", "base64": b64_png, "mime_type": "image/png"},
            ])
            chat.invoke([msg]).text
    """

    hd: HD4K = Field(exclude=True)
    """The :class:`hd4k_tools.HD4K` that runs the model (a bare ``Runner`` is wrapped)."""
    model_name: str | None = Field(default=None, validation_alias=AliasChoices("model_name", "model"))
    """Name reported in metadata and traces; defaults to the runner's model id."""
    hd_num: int | Literal["auto"] | None = None
    """Maximum tiles per image (1-100), ``"auto"`` to fit the context, ``None`` for the default (25)."""
    max_new_tokens: int | None = Field(default=None, validation_alias=AliasChoices("max_new_tokens", "max_tokens"))
    """Most tokens to generate (``None``: 512)."""
    temperature: float | None = None
    """Sampling temperature; ``0`` means greedy. A positive value turns sampling on unless
    ``do_sample`` says otherwise."""
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    num_beams: int | None = None
    do_sample: bool | None = None
    seed: int | None = None
    """Seed for sampling, for reproducible samples."""
    stop: list[str] | None = Field(default=None, validation_alias=AliasChoices("stop", "stop_sequences"))
    """Stop sequences: the answer is cut before the first one."""
    allow_image_urls: bool = False
    """Fetch ``http(s)`` image URLs found in messages (off: only inline images are accepted)."""
    allow_private_urls: bool = False
    """With ``allow_image_urls``: also fetch from loopback, private and link-local addresses."""
    streaming: bool = False
    """Whether ``invoke`` streams internally (for callbacks that want tokens)."""

    @field_validator("hd", mode="before")
    @classmethod
    def _validate_hd(cls, value: Any) -> HD4K:
        return as_hd4k(value)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        quantization: str | None = None,
        policy: ImagePolicy | None = None,
        **kwargs: Any,
    ) -> ChatHD4K:
        """Load the model from a checkpoint folder or hub id and wrap it; ``kwargs`` are fields of
        this class (``hd_num``, ``max_new_tokens``, ...)."""
        hd = HD4K.from_pretrained(path_or_hub_id, device=device, dtype=dtype, quantization=quantization, policy=policy)
        return cls(hd=hd, **kwargs)

    # -- LangChain metadata --------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "hd4k"

    @property
    def _resolved_model_name(self) -> str:
        return self.model_name or model_display_name(self.hd.model_id)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self._resolved_model_name,
            "hd_num": self.hd_num,
            **{name: getattr(self, name) for name in _GENERATION_FIELDS},
        }

    def _resolve_model_profile(self) -> ModelProfile | None:
        return ModelProfile(
            open_weights=True,
            max_input_tokens=self.hd.runner.context_length,
            text_inputs=True,
            image_inputs=True,
            image_url_inputs=self.allow_image_urls,
            pdf_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            text_outputs=True,
            tool_calling=False,
            tool_choice=False,
            # Constrained decoding with validation (response_format / with_structured_output).
            structured_output=True,
        )

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="hd4k",
            ls_model_name=kwargs.get("model") if isinstance(kwargs.get("model"), str) else self._resolved_model_name,
            ls_model_type="chat",
            ls_integration=f"langchain-hd4k/{_package_version()}",
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_new_tokens", kwargs.get("max_tokens", self.max_new_tokens))
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stop = stop or self.stop
        if stop:
            params["ls_stop"] = list(stop)
        return params

    # -- requests ------------------------------------------------------------------------------------
    def _image_policy(self) -> ImagePolicy:
        # Images in messages come from users and LLMs: never read them as file paths.
        return dataclasses.replace(
            self.hd.policy,
            allowed_roots=(),
            allow_urls=self.allow_image_urls,
            allow_private_urls=self.allow_private_urls,
        )

    def _generation(self, options: Mapping[str, Any]) -> dict[str, Any]:
        values = {name: options.get(name, getattr(self, name)) for name in _GENERATION_FIELDS}
        if "max_tokens" in options and "max_new_tokens" not in options:
            values["max_new_tokens"] = options["max_tokens"]
        # The same reading of the keywords as HD4K's task methods (temperature 0 = greedy, ...).
        return generation_keywords(values)

    def _build_request(self, messages: Sequence[BaseMessage], kwargs: Mapping[str, Any]) -> GenerationRequest:
        unknown = (
            set(kwargs)
            - set(_GENERATION_FIELDS)
            - {"hd_num", "max_tokens", "response_format", _CONSTRAINT_KWARG}
            - _IGNORED_CALL_KWARGS
        )
        if unknown:
            raise InputError(
                f"Unknown option(s) for ChatHD4K: {sorted(unknown)}. Valid per-call options: "
                f"{['hd_num', 'max_tokens', *_GENERATION_FIELDS]}."
            )
        hd_num = kwargs.get("hd_num", self.hd_num)
        converted = convert_messages(messages, self._image_policy(), self.hd)
        request = self.hd.build_request(converted, hd_num=hd_num, generation=self._generation(kwargs))
        constraint = kwargs.get(_CONSTRAINT_KWARG)
        return dataclasses.replace(request, constraint=constraint) if constraint is not None else request

    def _stop_sequences(self, stop: list[str] | None) -> list[str]:
        return [s for s in (stop if stop is not None else self.stop) or [] if s]

    def _ai_message(self, text: str, result: RunnerResult, finish_reason: str) -> AIMessage:
        return AIMessage(
            content=text,
            usage_metadata=usage_metadata(result),
            response_metadata=response_metadata(result, finish_reason),
        )

    # -- generation ----------------------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if kwargs.get("response_format") is not None:
            return self._structured_result(self._structured_answer(messages, stop, kwargs))
        stops = self._stop_sequences(stop)
        if stops:
            # The streaming path cuts at a stop sequence and stops generating right there.
            chunks = list(self._stream(messages, stop=stops, run_manager=run_manager, **kwargs))
            return _result_from_chunks(chunks)
        result = self.hd.run(self._build_request(messages, kwargs))
        message = self._ai_message(result.text, result, result.finish_reason)
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if kwargs.get("response_format") is not None:
            return self._structured_result(await self._astructured_answer(messages, stop, kwargs))
        stops = self._stop_sequences(stop)
        if stops:
            chunks = [c async for c in self._astream(messages, stop=stops, run_manager=run_manager, **kwargs)]
            return _result_from_chunks(chunks)
        result = await self.hd.arun(self._build_request(messages, kwargs))
        message = self._ai_message(result.text, result, result.finish_reason)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        if kwargs.get("response_format") is not None:
            # A validated JSON answer exists only once complete: one chunk.
            yield _chunk_of(self._structured_result(self._structured_answer(messages, stop, kwargs)))
            return
        request = self._build_request(messages, kwargs)
        assembler = StopFilter(self._stop_sequences(stop))
        stream = self.hd.runner.stream(request)
        try:
            for delta in stream:
                piece = assembler.feed(delta)
                if piece:
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                    if run_manager:
                        run_manager.on_llm_new_token(piece, chunk=chunk)
                    yield chunk
                if assembler.stopped:
                    break
        finally:
            # Closing cancels the generation between two tokens (after a stop sequence, or when the
            # consumer stops reading) and waits for the worker, so the result below is complete.
            stream.close()
        yield self._final_chunk(assembler, stream.result)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        if kwargs.get("response_format") is not None:
            yield _chunk_of(self._structured_result(await self._astructured_answer(messages, stop, kwargs)))
            return
        request = self._build_request(messages, kwargs)
        assembler = StopFilter(self._stop_sequences(stop))
        cancel = threading.Event()
        stream = await asyncio.to_thread(self.hd.runner.stream, request, cancel=cancel)
        done = object()
        try:
            while True:
                delta = await asyncio.to_thread(next, stream, done)
                if delta is done:
                    break
                piece = assembler.feed(delta)  # type: ignore[arg-type]
                if piece:
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                    if run_manager:
                        await run_manager.on_llm_new_token(piece, chunk=chunk)
                    yield chunk
                if assembler.stopped:
                    break
        finally:
            cancel.set()
            await asyncio.to_thread(stream.close)
        yield self._final_chunk(assembler, stream.result)

    def _final_chunk(self, assembler: StopFilter, result: RunnerResult | None) -> ChatGenerationChunk:
        """The last chunk: held-back text, usage and metadata (set once, so merging never doubles it)."""
        tail = assembler.finish()
        if result is None:  # pragma: no cover - the runner always leaves a result after close()
            return ChatGenerationChunk(message=AIMessageChunk(content=tail, chunk_position="last"))
        finish_reason = "stop" if assembler.stopped else result.finish_reason
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content=tail,
                usage_metadata=usage_metadata(result),
                response_metadata=response_metadata(result, finish_reason),
                chunk_position="last",
            )
        )

    # -- response_format (constrained decoding through the core's structured-output loop) ------------
    def _plain_call(self, stop: list[str] | None, kwargs: Mapping[str, Any], spec: StructuredOutput) -> Any:
        options = {k: v for k, v in kwargs.items() if k != "response_format"}
        options[_CONSTRAINT_KWARG] = spec.constraint
        return lambda conversation: self._generate(conversation, stop, **options).generations[0].message

    def _structured_answer(
        self, messages: Sequence[BaseMessage], stop: list[str] | None, kwargs: Mapping[str, Any]
    ) -> StructuredAnswer[Any]:
        spec = _response_format_schema(kwargs["response_format"])
        return generate_structured(
            spec,
            list(messages),
            self._plain_call(stop, kwargs, spec),
            text_of=_text_of,
            user=HumanMessage,
            assistant=_same,
        )

    async def _astructured_answer(
        self, messages: Sequence[BaseMessage], stop: list[str] | None, kwargs: Mapping[str, Any]
    ) -> StructuredAnswer[Any]:
        spec = _response_format_schema(kwargs["response_format"])
        options = {k: v for k, v in kwargs.items() if k != "response_format"}
        options[_CONSTRAINT_KWARG] = spec.constraint

        async def call(conversation: list[BaseMessage]) -> AIMessage:
            return (await self._agenerate(conversation, stop, **options)).generations[0].message  # type: ignore[return-value]

        return await agenerate_structured(
            spec, list(messages), call, text_of=_text_of, user=HumanMessage, assistant=_same
        )

    @staticmethod
    def _structured_result(answer: StructuredAnswer[Any]) -> ChatResult:
        """The validated JSON object as the message text (what ``create_agent``'s ProviderStrategy parses);
        the model's own text stays in ``response_metadata["hd4k"]["raw_text"]``."""
        parsed = answer.value()
        raw: AIMessage = answer.raw
        metadata = dict(raw.response_metadata)
        metadata["hd4k"] = {**metadata.get("hd4k", {}), "raw_text": raw.text, "attempts": answer.attempts}
        message = AIMessage(
            content=json.dumps(parsed, ensure_ascii=False),
            usage_metadata=raw.usage_metadata,
            response_metadata=metadata,
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    # -- token counts --------------------------------------------------------------------------------
    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's InternLM2 tokenizer (in-process runners only)."""
        tokenizer = getattr(self.hd.runner, "tokenizer", None)
        if tokenizer is None or not hasattr(tokenizer, "encode"):
            raise NotImplementedError(
                "Token ids need the model's tokenizer in this process; this runner has none (e.g. a remote "
                "server). get_num_tokens still works (the runner's own count)."
            )
        return list(tokenizer.encode(text, add_bos=False))

    def get_num_tokens(self, text: str) -> int:
        """Tokens of ``text``: the InternLM2 tokenizer in process (a remote runner estimates)."""
        return self.hd.runner.count_text_tokens(text)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Prompt tokens of ``messages`` as the model reads them: turn markers and the meta instruction
        (or the system message), text with the InternLM2 tokenizer, and each image's tokens from its HD-N
        plan at this model's ``hd_num``. So ``trim_messages(..., token_counter=chat)`` budgets images too."""
        if tools:
            raise NotImplementedError("ChatHD4K has no tool calling; there are no tool schemas to count.")
        converted = convert_messages(messages, self._image_policy(), self.hd)
        return count_message_tokens(self.hd, converted, self.hd_num, self._generation({}) or None)

    # -- tools and structured output -----------------------------------------------------------------
    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any) -> Runnable:
        """No native tool calling: only an empty tool list with a ``response_format`` is accepted (what
        ``create_agent(ChatHD4K(...), tools=[], response_format=Schema)`` binds; answered by constrained decoding).

        Raises:
            NotImplementedError: for any tool. Use a tool-calling chat model as the agent's LLM and give it
                the tools of ``HD4KToolkit(hd).get_tools()`` so it can look at documents and images.
        """
        if not tools and kwargs.get("response_format") is not None and tool_choice in (None, "none", "auto"):
            # No tool to call, only a response format: answered by constrained decoding (see _generate).
            return self.bind(**kwargs)
        raise NotImplementedError(
            "ChatHD4K cannot call tools: InternLM-XComposer2-4KHD has no native tool calling. Use a "
            "tool-calling chat model (e.g. ChatOpenAI, ChatOllama) as the agent's LLM and give it the "
            "vision tools from langchain_hd4k.HD4KToolkit(hd).get_tools() (read_document, "
            "answer_chart_question, describe_image). For structured answers use "
            "ChatHD4K.with_structured_output(schema)."
        )

    def with_structured_output(
        self,
        schema: Mapping[str, Any] | type,
        *,
        include_raw: bool = False,
        method: Literal["json_schema", "json_mode", "function_calling"] = "json_schema",
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """A runnable that answers with an instance of ``schema`` (a pydantic model class, a
        TypedDict class or a JSON-schema dict; dicts come back for the latter two).

        Every ``method`` works the same way: decoding is constrained to the schema (the engine only
        lets the model pick tokens that keep the answer valid JSON of it), the schema is also appended to
        the conversation as an instruction, and the answer is validated with ``jsonschema``/pydantic. If
        it still fails (a keyword the grammar does not enforce) the model is asked once more, with the
        error in the prompt; if that fails too, :class:`hd4k_tools.OutputParseError` is raised (or, with
        ``include_raw=True``, returned as ``parsing_error``). ``strict`` is accepted for API compatibility
        (answers are always strict).
        """
        if kwargs:
            raise TypeError(f"Unexpected arguments for with_structured_output: {sorted(kwargs)}")
        spec = StructuredOutput.from_schema(schema)
        llm = self.bind(
            ls_structured_output_format={"kwargs": {"method": method, "strict": strict}, "schema": schema},
            **{_CONSTRAINT_KWARG: spec.constraint},
        )

        def shaped(answer: StructuredAnswer[Any]) -> Any:
            if include_raw:
                return {"raw": answer.raw, "parsed": answer.parsed, "parsing_error": answer.error}
            return answer.value()

        def run(value: LanguageModelInput, config: RunnableConfig) -> Any:
            return shaped(
                generate_structured(
                    spec,
                    _input_messages(value),
                    lambda conversation: llm.invoke(conversation, config),
                    text_of=_text_of,
                    user=HumanMessage,
                    assistant=_same,
                )
            )

        async def arun(value: LanguageModelInput, config: RunnableConfig) -> Any:
            async def call(conversation: list[BaseMessage]) -> BaseMessage:
                return await llm.ainvoke(conversation, config)

            return shaped(
                await agenerate_structured(
                    spec, _input_messages(value), call, text_of=_text_of, user=HumanMessage, assistant=_same
                )
            )

        return RunnableLambda(run, afunc=arun, name="ChatHD4KStructuredOutput")


# ----------------------------------------------------------------------------------------------------
# Messages -> hd4k_tools.Message
# ----------------------------------------------------------------------------------------------------
def convert_messages(messages: Sequence[BaseMessage], policy: ImagePolicy, hd: HD4K) -> list[Message]:
    """LangChain messages as ``hd4k_tools.Message`` objects with their images loaded under ``policy``.

    System messages are joined into one leading system message; tool results become user turns
    (:func:`hd4k_tools.adapters.assemble_messages`, shared with the LlamaIndex LLM).
    """
    turns: list[tuple[Any, list[str | Image.Image]]] = []
    for message in messages:
        if isinstance(message, SystemMessage) or (isinstance(message, ChatMessage) and message.role == "system"):
            turns.append(("system", [message.text]))
        elif isinstance(message, AIMessage) or (
            isinstance(message, ChatMessage) and message.role in ("assistant", "ai")
        ):
            turns.append(("assistant", [message.text]))
        elif isinstance(message, ToolMessage):
            turns.append(("user", tool_result_parts(message.name, _content_parts(message, policy, hd))))
        else:
            turns.append(("user", _content_parts(message, policy, hd)))
    return assemble_messages(turns)


def _content_parts(message: BaseMessage, policy: ImagePolicy, hd: HD4K) -> list[str | Image.Image]:
    parts: list[str | Image.Image] = []
    for block in message.content_blocks:
        kind = block.get("type")
        if kind == "text":
            parts.append(block.get("text", ""))
        elif kind == "image":
            parts.append(load_image_block(block, policy, hd))
        elif kind == "non_standard" and _legacy_image_url(block) is not None:
            parts.append(load_image_block({"type": "image", "url": _legacy_image_url(block)}, policy, hd))
        elif kind == "text-plain" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif kind in ("reasoning", "tool_call", "tool_call_chunk", "invalid_tool_call"):
            continue
        else:
            raise InputError(
                f"ChatHD4K reads text and images only; the message has a {kind!r} block. Convert PDFs "
                "to page images (or use HD4KDocumentLoader / the read_document tool) and drop other media."
            )
    return parts


def _legacy_image_url(block: Mapping[str, Any]) -> str | None:
    """The URL of an OpenAI ``image_url`` block in its short form (``"image_url": "<url>"``), which
    ``content_blocks`` leaves as a non-standard block."""
    value = block.get("value")
    if isinstance(value, Mapping) and value.get("type") == "image_url" and isinstance(value.get("image_url"), str):
        return value["image_url"]
    return None


def load_image_block(block: Mapping[str, Any], policy: ImagePolicy, hd: HD4K) -> Image.Image:
    """Decode a v1 image content block (``base64`` + ``mime_type``, or ``url``) under ``policy``.

    ``data:`` URLs are decoded; ``http(s)`` URLs are fetched only when ``policy.allow_urls``; any
    other URL (``file:``, a bare path) is refused. Errors are :class:`hd4k_tools.InputError`
    subclasses (so also ``ValueError``) with a message that says what to change.
    """
    if block.get("base64"):
        mime = str(block.get("mime_type") or "image/png")
        if not mime.startswith("image/"):
            raise errors.UnsupportedFormatError(
                f"The image block has mime_type {mime!r}; ChatHD4K accepts images (image/png, image/jpeg, ...)."
            )
        return hd.load(f"data:{mime};base64,{block['base64']}", policy)
    url = block.get("url")
    if isinstance(url, str) and url:
        lowered = url[:16].lower()
        if lowered.startswith("data:"):
            return hd.load(url, policy)
        if lowered.startswith(("http://", "https://")):
            if not policy.allow_urls:
                raise errors.URLNotAllowedError(
                    "Image URLs are disabled for this ChatHD4K (allow_image_urls=False); send the image "
                    "inline as base64 or a data: URL, or create the model with allow_image_urls=True."
                )
            return hd.load(url, policy)
        raise errors.URLNotAllowedError(
            f"Unsupported image URL {url[:40]!r}: only data: URLs (and http(s) URLs when allowed) are read."
        )
    if block.get("file_id"):
        raise InputError("Image blocks with a file_id are not supported; send the image as base64 or a data: URL.")
    raise InputError("The image block has no data; give it 'base64' (with 'mime_type') or 'url'.")


# ----------------------------------------------------------------------------------------------------
# Results -> LangChain metadata
# ----------------------------------------------------------------------------------------------------
def usage_metadata(result: RunnerResult) -> UsageMetadata:
    """LangChain usage of a runner result; ``input_tokens`` includes the image tokens."""
    usage = result.usage
    return UsageMetadata(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        input_token_details={"image": usage.image_tokens},  # type: ignore[typeddict-unknown-key]
    )


def response_metadata(result: RunnerResult, finish_reason: str) -> dict[str, Any]:
    """``model_name``, ``finish_reason`` and the hd4k details (plans, usage, timings)."""
    return {
        "model_name": result.model,
        "finish_reason": finish_reason,
        "model_provider": "hd4k",
        "hd4k": {
            "plans": [p.model_dump() for p in result.plans],
            "image_tokens": result.usage.image_tokens,
            "timings": result.timings.model_dump(),
        },
    }


def _result_from_chunks(chunks: Sequence[ChatGenerationChunk]) -> ChatResult:
    message = chunks[0].message
    for chunk in chunks[1:]:
        message = message + chunk.message
    assert isinstance(message, AIMessageChunk)
    ai = AIMessage(
        content=message.content,
        usage_metadata=message.usage_metadata,
        response_metadata=message.response_metadata,
    )
    return ChatResult(generations=[ChatGeneration(message=ai)])


# ----------------------------------------------------------------------------------------------------
# Structured output helpers (the loop itself is hd4k_tools.structured, shared with LlamaIndex and the server)
# ----------------------------------------------------------------------------------------------------
def schema_validator(schema: Mapping[str, Any] | type, json_schema: Mapping[str, Any] | None = None) -> Any:
    """A function ``text -> parsed value`` for ``schema`` that raises :class:`OutputParseError`
    (:func:`hd4k_tools.structured.make_validator`; ``json_schema`` is accepted for compatibility)."""
    return make_validator(schema)


def _text_of(message: BaseMessage) -> str:
    return message.text


def _same(message: BaseMessage) -> BaseMessage:
    return message


def _chunk_of(result: ChatResult) -> ChatGenerationChunk:
    message = result.generations[0].message
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content=message.content,
            usage_metadata=getattr(message, "usage_metadata", None),
            response_metadata=message.response_metadata,
            chunk_position="last",
        )
    )


def _input_messages(value: LanguageModelInput) -> list[BaseMessage]:
    if isinstance(value, str):
        return [HumanMessage(value)]
    if isinstance(value, PromptValue):
        return value.to_messages()
    return list(convert_to_messages(value))


__all__ = ["ChatHD4K", "check_json_schema", "extract_json_object", "model_display_name", "schema_validator"]
