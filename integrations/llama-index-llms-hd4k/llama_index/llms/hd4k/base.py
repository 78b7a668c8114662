"""``HD4KMultiModalLLM``: InternLM-XComposer2-4KHD as a LlamaIndex ``LLM`` that reads images.

LlamaIndex passes images to LLMs as ``ImageBlock``\\ s inside ``ChatMessage(blocks=[...])`` (the old
``MultiModalLLM`` classes are legacy). This class turns those blocks into RGB images through
:meth:`hd4k_tools.HD4K.load` (so the core's size and URL rules apply), builds an
:class:`hd4k_tools.Message` conversation and runs it with :meth:`hd4k_tools.HD4K.run`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from llama_index.core.base.llms.types import (
    AudioBlock,
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    DocumentBlock,
    ImageBlock,
    LLMMetadata,
    MessageRole,
    TextBlock,
    VideoBlock,
)
from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr, model_validator
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.llm import (
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictStartEvent,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.llm import LLM
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.schema import ImageNode
from PIL import Image

from hd4k_tools import (
    HD4K,
    GenerationConfig,
    GenerationRequest,
    ImagePolicy,
    Message,
    OutputParseError,
    Runner,
    RunnerResult,
    TextStream,
    errors,
)
from hd4k_tools.adapters import as_hd4k, assemble_messages, filter_stream
from hd4k_tools.structured import StructuredAnswer, StructuredOutput, agenerate_structured, generate_structured

__all__ = ["HD4KMultiModalLLM", "json_instruction", "parse_structured_output"]

Model = TypeVar("Model", bound=BaseModel)

dispatcher = get_dispatcher(__name__)

_ROLES: dict[str, Literal["system", "user", "assistant"]] = {
    MessageRole.SYSTEM.value: "system",
    MessageRole.DEVELOPER.value: "system",
    MessageRole.USER.value: "user",
    MessageRole.ASSISTANT.value: "assistant",
    MessageRole.CHATBOT.value: "assistant",
    MessageRole.MODEL.value: "assistant",
    # The model has no tool role: tool results are read like user text.
    MessageRole.TOOL.value: "user",
    MessageRole.FUNCTION.value: "user",
}
_GENERATION_FIELDS = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "num_beams",
    "seed",
)
_DONE = object()


def json_instruction(output_cls: type[BaseModel]) -> str:
    """The instruction appended to a prompt to ask for a JSON object matching ``output_cls``
    (:func:`hd4k_tools.structured.json_instruction`, shared with LangChain and the server)."""
    return StructuredOutput.from_schema(output_cls).instruction


def parse_structured_output(text: str, output_cls: type[Model]) -> Model:
    """Extract the JSON object from a model answer and validate it as ``output_cls``
    (:func:`hd4k_tools.structured.make_validator`). Raises :class:`hd4k_tools.OutputParseError` with a
    message that can be shown to the model for a retry (it names the class and what to send instead)."""
    try:
        return StructuredOutput.from_schema(output_cls).validate(text)
    except OutputParseError as err:
        reason = str(err)
        start = text.find("{")
        if "no JSON object" in reason and start != -1:
            try:
                json.JSONDecoder().raw_decode(text, start)
            except json.JSONDecodeError as decode_error:
                reason = f"it is not valid JSON ({decode_error})"
        raise OutputParseError(
            f"The answer cannot be read as {output_cls.__name__}: {reason}. Reply with only a corrected JSON "
            "object that conforms to the schema."
        ) from err


def _usage(result: RunnerResult) -> dict[str, int]:
    u = result.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "image_tokens": u.image_tokens,
    }


def _raw(result: RunnerResult) -> dict[str, Any]:
    return {
        "model": result.model,
        "finish_reason": result.finish_reason,
        "usage": _usage(result),
        "plans": [p.model_dump() for p in result.plans],
        "timings": result.timings.model_dump(),
    }


# ----------------------------------------------------------------------------------------------------
# The LLM
# ----------------------------------------------------------------------------------------------------
class HD4KMultiModalLLM(LLM):
    """InternLM-XComposer2-4KHD as a LlamaIndex chat LLM that sees ``ImageBlock``\\ s.

    Images come from ``ChatMessage(blocks=[TextBlock(...), ImageBlock(...)])`` (or, for code written
    against the legacy ``MultiModalLLM`` interface, from ``complete(prompt, image_documents=[...])``):

    * ``ImageBlock(image=...)`` (bytes, base64) and ``data:`` URLs are decoded under the ``HD4K``
      object's :class:`~hd4k_tools.ImagePolicy` (byte and pixel limits).
    * ``ImageBlock(path=...)``: paths come from application code and are trusted by default; set
      ``allowed_root`` to accept only files inside that folder (symlinks resolved).
    * ``ImageBlock(url="http(s)://...")`` is refused unless ``allow_image_urls=True``; then it is fetched
      by the core's guarded fetcher (private and link-local hosts refused, size and time bounded),
      never by LlamaIndex.

    Per call, ``hd_num`` and the generation fields (``max_new_tokens``, ``temperature``...) may be
    passed as keyword arguments. Token usage is in ``response.raw["usage"]`` and
    ``response.additional_kwargs`` (``prompt_tokens``, ``completion_tokens``, ``total_tokens``,
    ``image_tokens``); the HD-N plans and timings in ``response.raw``.

    >>> llm = HD4KMultiModalLLM(hd=HD4K.from_pretrained("internlm/internlm-xcomposer2-4khd-7b"))  # doctest: +SKIP
    >>> llm.chat([ChatMessage(role="user", blocks=[ImageBlock(path="chart.png"),
    ...                                          TextBlock(text="What is the highest bar?")])])  # doctest: +SKIP
    """

    model_name: str | None = Field(default=None, description="Model name for metadata; default: the runner's id.")
    hd_num: int | Literal["auto"] | None = Field(
        default=None,
        description="Max 336x336 tiles per image (1-100), 'auto' to fit the context, None for the chat default (25).",
    )
    max_new_tokens: int = Field(default=512, ge=1, description="Maximum tokens generated per call.")
    do_sample: bool = Field(default=False, description="Sample instead of greedy/beam decoding.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling; 1.0 disables it.")
    top_k: int = Field(default=0, ge=0, description="Top-k sampling; 0 disables it.")
    repetition_penalty: float = Field(default=1.0, gt=0, description="1.0 disables it.")
    num_beams: int = Field(default=1, ge=1, description="Beam search width (greedy when 1).")
    seed: int | None = Field(default=None, ge=0, description="Seed for sampling.")
    allow_image_urls: bool = Field(
        default=False, description="Fetch http(s) image URLs (with the core's SSRF guard); off by default."
    )
    allowed_root: Path | None = Field(
        default=None, description="If set, ImageBlock paths must resolve inside this folder; None trusts all paths."
    )

    _hd: HD4K = PrivateAttr()

    def __init__(self, hd: HD4K | Runner, **kwargs: Any) -> None:
        """Wrap ``hd`` (an :class:`hd4k_tools.HD4K`, or a :class:`hd4k_tools.Runner` to wrap in one)."""
        super().__init__(**kwargs)
        self._hd = as_hd4k(hd)

    @model_validator(mode="after")
    def _check_generation(self) -> HD4KMultiModalLLM:
        # Fail at construction, not at the first call, on e.g. do_sample with num_beams > 1.
        GenerationConfig(**{name: getattr(self, name) for name in _GENERATION_FIELDS})
        return self

    @classmethod
    def class_name(cls) -> str:
        return "HD4KMultiModalLLM"

    @property
    def hd(self) -> HD4K:
        """The wrapped :class:`hd4k_tools.HD4K`."""
        return self._hd

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self._hd.runner.context_length,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=self.model_name or self._hd.model_id,
        )

    # -- images --------------------------------------------------------------------------------------
    def _policy(self) -> ImagePolicy:
        return self._hd.policy

    def _path_policy(self) -> ImagePolicy:
        if self.allowed_root is None:
            return self._policy()
        return dataclasses.replace(self._policy(), allowed_roots=(self.allowed_root,))

    def _load_url(self, url: str) -> Image.Image:
        if url[:5].lower() == "data:":
            return self._hd.load(url, self._policy())
        if not self.allow_image_urls:
            raise errors.URLNotAllowedError(
                f"Image URLs are disabled for this LLM ({url[:80]!r} was not fetched). Pass the image as a "
                "path or bytes, or create HD4KMultiModalLLM(..., allow_image_urls=True) to fetch public URLs."
            )
        return self._hd.load(url, dataclasses.replace(self._policy(), allow_urls=True))

    def _load_block(self, block: ImageBlock) -> Image.Image:
        if block.image is not None:
            # With inline data present resolve_image() only decodes it; it never touches path or url.
            return self._hd.load(block.resolve_image().read(), self._policy())
        if block.path is not None:
            return self._hd.load(Path(block.path), self._path_policy())
        if block.url is not None:
            # Never block.resolve_image() here: LlamaIndex would fetch the URL with no SSRF guard.
            return self._load_url(str(block.url))
        raise errors.InputError("An ImageBlock has no image data, path or url; give it one of them.")

    def _load_node(self, node: ImageNode) -> Image.Image:
        if node.image:
            try:
                data = base64.b64decode(node.image, validate=True)
            except (binascii.Error, ValueError) as err:
                raise errors.InvalidBase64Error(
                    "The image document's 'image' field is not valid base64; store base64-encoded bytes."
                ) from err
            return self._hd.load(data, self._policy())
        path = node.image_path or node.metadata.get("file_path")
        if path:
            return self._hd.load(Path(path), self._path_policy())
        if node.image_url:
            return self._load_url(node.image_url)
        raise errors.InputError("An image document has no image, image_path or image_url; give it one of them.")

    # -- requests ------------------------------------------------------------------------------------
    def _to_messages(
        self, messages: Sequence[ChatMessage], image_documents: Sequence[ImageNode] | None
    ) -> list[Message]:
        turns: list[tuple[Any, list[str | Image.Image]]] = []
        for message in messages:
            role_value = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
            role = _ROLES.get(role_value)
            if role is None:
                raise errors.InputError(f"Unsupported message role {role_value!r}; use system, user or assistant.")
            parts: list[str | Image.Image] = []
            for block in message.blocks:
                if isinstance(block, TextBlock):
                    parts.append(block.text)
                elif isinstance(block, ImageBlock):
                    parts.append(self._load_block(block))
                elif isinstance(block, AudioBlock | VideoBlock | DocumentBlock):
                    raise errors.InputError(
                        f"HD4KMultiModalLLM reads text and images, not {block.block_type} blocks. For PDFs, "
                        "render the pages with HD4KReader or hd.read_document first."
                    )
                # Other blocks (thinking, tool calls, cache points) carry nothing the model can read.
            turns.append((role, parts))
        out = assemble_messages(turns)
        if image_documents:
            images = tuple(self._load_node(node) for node in image_documents)
            if out and out[-1].role == "user":
                out[-1] = Message("user", images + out[-1].content)
            else:
                out.append(Message("user", images))
        return out

    def _request(
        self,
        messages: Sequence[ChatMessage],
        kwargs: Mapping[str, Any],
        image_documents: Sequence[ImageNode] | None = None,
    ) -> GenerationRequest:
        generation = {name: kwargs.get(name, getattr(self, name)) for name in _GENERATION_FIELDS}
        hd_num = kwargs.get("hd_num", self.hd_num)
        image_documents = image_documents if image_documents is not None else kwargs.get("image_documents")
        request = self._hd.build_request(
            self._to_messages(messages, image_documents), hd_num=hd_num, generation=generation
        )
        # structured_predict's constrained decoding (a JSONConstraint), handed down through chat's kwargs.
        constraint = kwargs.get("hd4k_constraint")
        return dataclasses.replace(request, constraint=constraint) if constraint is not None else request

    def _completion_input(
        self, prompt: str, formatted: Any, image_documents: Sequence[ImageNode] | None
    ) -> tuple[list[ChatMessage], Any]:
        """The one user turn a completion call asks (``completion_to_prompt`` unless ``formatted``) and its
        image documents."""
        if not isinstance(formatted, bool):
            # MultiModalLLM.complete(prompt, image_documents) passed the documents positionally.
            formatted, image_documents = False, formatted if image_documents is None else image_documents
        text = prompt if formatted else self.completion_to_prompt(prompt)
        return [ChatMessage(role=MessageRole.USER, content=text)], image_documents

    # -- chat ----------------------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer a conversation whose messages may hold ``ImageBlock``\\ s."""
        result = self._hd.run(self._request(messages, kwargs))
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text),
            raw=_raw(result),
            additional_kwargs=_usage(result),
        )

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Async :meth:`chat`: image loading and the model call run in worker threads."""
        request = await asyncio.to_thread(self._request, messages, kwargs)
        result = await self._hd.arun(request)
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text),
            raw=_raw(result),
            additional_kwargs=_usage(result),
        )

    @staticmethod
    def _final_chat(stream: TextStream, text: str) -> ChatResponse:
        result = stream.result
        if result is None:
            return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta="")
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text),
            delta="",
            raw=_raw(result),
            additional_kwargs=_usage(result),
        )

    def _stream(self, request: GenerationRequest) -> ChatResponseGen:
        def gen() -> ChatResponseGen:
            # Started on first iteration, so an unread generator costs no model time.
            stream = self._hd.runner.stream(request)
            text = ""
            try:
                for delta in filter_stream(stream):
                    text += delta
                    yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)
                yield self._final_chat(stream, text)
            finally:
                stream.close()

        return gen()

    async def _astream(self, request: GenerationRequest) -> ChatResponseAsyncGen:
        stream = await asyncio.to_thread(self._hd.runner.stream, request)
        deltas = filter_stream(stream)
        text = ""
        try:
            while True:
                delta = await asyncio.to_thread(next, deltas, _DONE)
                if delta is _DONE:
                    break
                text += delta
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)
            yield self._final_chat(stream, text)
        finally:
            await asyncio.to_thread(stream.close)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream the answer: ``ChatResponse(message=<text so far>, delta=<new text>)``; a last response
        with ``delta=""`` carries the usage. The deltas join to what :meth:`chat` returns."""
        return self._stream(self._request(messages, kwargs))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        """Async :meth:`stream_chat`; closing the generator early stops the generation."""
        request = await asyncio.to_thread(self._request, messages, kwargs)
        return self._astream(request)

    # -- completion (also the legacy MultiModalLLM interface) ---------------------------------------
    @staticmethod
    def _to_completion(response: ChatResponse) -> CompletionResponse:
        return CompletionResponse(
            text=response.message.content or "",
            delta=response.delta,
            raw=response.raw,
            additional_kwargs=response.additional_kwargs,
        )

    @llm_completion_callback()
    def complete(
        self,
        prompt: str,
        formatted: bool = False,
        image_documents: Sequence[ImageNode] | None = None,
        **kwargs: Any,
    ) -> CompletionResponse:
        """Complete ``prompt``, looking at ``image_documents`` (``ImageDocument``/``ImageNode``) if given.

        ``complete(prompt, image_documents)`` (positional, as in the legacy ``MultiModalLLM``) also works.
        """
        messages, image_documents = self._completion_input(prompt, formatted, image_documents)
        result = self._hd.run(self._request(messages, kwargs, image_documents))
        return CompletionResponse(text=result.text, raw=_raw(result), additional_kwargs=_usage(result))

    @llm_completion_callback()
    async def acomplete(
        self,
        prompt: str,
        formatted: bool = False,
        image_documents: Sequence[ImageNode] | None = None,
        **kwargs: Any,
    ) -> CompletionResponse:
        """Async :meth:`complete`."""
        messages, image_documents = self._completion_input(prompt, formatted, image_documents)
        request = await asyncio.to_thread(self._request, messages, kwargs, image_documents)
        result = await self._hd.arun(request)
        return CompletionResponse(text=result.text, raw=_raw(result), additional_kwargs=_usage(result))

    @llm_completion_callback()
    def stream_complete(
        self,
        prompt: str,
        formatted: bool = False,
        image_documents: Sequence[ImageNode] | None = None,
        **kwargs: Any,
    ) -> CompletionResponseGen:
        """Streaming :meth:`complete` (``CompletionResponse(text=<so far>, delta=<new>)``)."""
        messages, image_documents = self._completion_input(prompt, formatted, image_documents)
        chunks = self._stream(self._request(messages, kwargs, image_documents))

        def gen() -> CompletionResponseGen:
            for chunk in chunks:
                yield self._to_completion(chunk)

        return gen()

    @llm_completion_callback()
    async def astream_complete(
        self,
        prompt: str,
        formatted: bool = False,
        image_documents: Sequence[ImageNode] | None = None,
        **kwargs: Any,
    ) -> CompletionResponseAsyncGen:
        """Async :meth:`stream_complete`."""
        messages, image_documents = self._completion_input(prompt, formatted, image_documents)
        request = await asyncio.to_thread(self._request, messages, kwargs, image_documents)
        chunks = self._astream(request)

        async def gen() -> CompletionResponseAsyncGen:
            async for chunk in chunks:
                yield self._to_completion(chunk)

        return gen()

    # -- structured output ---------------------------------------------------------------------------
    def _structured_messages(self, prompt: BasePromptTemplate, prompt_args: Mapping[str, Any]) -> list[ChatMessage]:
        # The JSON instruction is appended by the core loop as a user turn; consecutive user turns are joined.
        return self._extend_messages(prompt.format_messages(llm=self, **prompt_args))

    @staticmethod
    def _assistant(response: ChatResponse) -> ChatMessage:
        return ChatMessage(role=MessageRole.ASSISTANT, content=response.message.content or "")

    @staticmethod
    def _text(response: ChatResponse) -> str:
        return response.message.content or ""

    @staticmethod
    def _user(text: str) -> ChatMessage:
        return ChatMessage(role=MessageRole.USER, content=text)

    @dispatcher.span
    def structured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """Fill ``output_cls`` from the model's answer to ``prompt``.

        The prompt (a ``PromptTemplate``, or a ``ChatPromptTemplate`` whose messages may hold images)
        gets a JSON-schema instruction and decoding is constrained to the schema (the answer is valid
        JSON of it by construction); the answer's JSON is extracted and validated. On a failure the grammar
        did not prevent, the model is asked once more, shown the error; a second failure raises
        :class:`hd4k_tools.OutputParseError`. ``llm_kwargs`` go to :meth:`chat` (e.g. ``hd_num``,
        ``max_new_tokens``, ``image_documents``).
        """
        dispatcher.event(
            LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt, template_args=prompt_args)
        )
        messages = self._structured_messages(prompt, prompt_args)
        spec = StructuredOutput.from_schema(output_cls)
        options = {**(llm_kwargs or {}), "hd4k_constraint": spec.constraint}
        answer: StructuredAnswer[ChatResponse] = generate_structured(
            spec,
            messages,
            lambda conversation: self.chat(conversation, **options),
            text_of=self._text,
            user=self._user,
            assistant=self._assistant,
        )
        result = answer.value()
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    @dispatcher.span
    async def astructured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """Async :meth:`structured_predict`."""
        dispatcher.event(
            LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt, template_args=prompt_args)
        )
        messages = self._structured_messages(prompt, prompt_args)
        spec = StructuredOutput.from_schema(output_cls)
        options = {**(llm_kwargs or {}), "hd4k_constraint": spec.constraint}

        async def call(conversation: list[ChatMessage]) -> ChatResponse:
            return await self.achat(conversation, **options)

        answer: StructuredAnswer[ChatResponse] = await agenerate_structured(
            spec,
            messages,
            call,
            text_of=self._text,
            user=self._user,
            assistant=self._assistant,
        )
        result = answer.value()
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result
