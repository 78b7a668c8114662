"""HD4KMultiModalLLM on the tiny checkpoint: image blocks, URL policy, streaming, usage, structured output."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from image_server import local_image_server
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    DocumentBlock,
    ImageBlock,
    MessageRole,
    TextBlock,
)
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.prompts import ChatPromptTemplate, PromptTemplate
from llama_index.core.schema import ImageDocument
from llama_index_hd4k import HD4KMultiModalLLM, json_instruction, parse_structured_output
from llamaindex_support import RecordingRunner, file_hash, png_bytes, write_image
from pydantic import BaseModel, ValidationError

from hd4k_tools import HD4K, ImagePolicy, OutputParseError, errors, image_content_hash, load_image
from hd4k_tools import to_data_url as image_to_data_url
from hd4k_tools.structured import StructuredOutputTruncatedError

MAX_NEW_TOKENS = 8
SAMPLED = {"do_sample": True, "seed": 0}


@pytest.fixture
def llm(runner: RecordingRunner) -> HD4KMultiModalLLM:
    return HD4KMultiModalLLM(hd=HD4K(runner), hd_num=1, max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    return write_image(tmp_path / "allowed" / "photo.png", (200, 60, 60), label="cat")


def ask(*blocks: TextBlock | ImageBlock) -> list[ChatMessage]:
    return [ChatMessage(role=MessageRole.USER, blocks=list(blocks))]


def question(photo: Path) -> list[ChatMessage]:
    return ask(ImageBlock(path=photo), TextBlock(text="What is in the picture?"))


# ----------------------------------------------------------------------------------------------------
# Metadata and construction
# ----------------------------------------------------------------------------------------------------
def test_metadata(llm: HD4KMultiModalLLM, runner: RecordingRunner) -> None:
    meta = llm.metadata
    assert meta.context_window == runner.context_length == runner.inner.context_length
    assert meta.num_output == MAX_NEW_TOKENS
    assert meta.is_chat_model is True
    assert meta.is_function_calling_model is False
    assert meta.model_name == "tiny-ixc2-4khd"
    assert HD4KMultiModalLLM(hd=runner, model_name="ixc").metadata.model_name == "ixc"  # a bare Runner works too
    assert HD4KMultiModalLLM.class_name() == "HD4KMultiModalLLM"


def test_invalid_generation_settings_fail_at_construction(runner: RecordingRunner) -> None:
    with pytest.raises(ValidationError, match="beam"):
        HD4KMultiModalLLM(hd=runner, do_sample=True, num_beams=3)
    with pytest.raises(ValidationError):
        HD4KMultiModalLLM(hd=runner, max_new_tokens=0)


# ----------------------------------------------------------------------------------------------------
# Image blocks
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["path", "bytes", "base64", "data_url"])
def test_chat_image_block_reaches_the_model(
    llm: HD4KMultiModalLLM, runner: RecordingRunner, photo: Path, kind: str
) -> None:
    data = photo.read_bytes()
    block = {
        "path": lambda: ImageBlock(path=photo),
        "bytes": lambda: ImageBlock(image=data),
        "base64": lambda: ImageBlock(image=base64.b64encode(data)),
        "data_url": lambda: ImageBlock(url=image_to_data_url(load_image(photo))),
    }[kind]()
    response = llm.chat(ask(block, TextBlock(text="What is in the picture?")))
    assert runner.image_hashes() == [file_hash(photo)]
    assert isinstance(response, ChatResponse) and response.message.role == MessageRole.ASSISTANT
    usage = response.additional_kwargs
    assert response.raw["usage"] == usage
    assert usage["image_tokens"] == response.raw["plans"][0]["image_tokens"] > 0
    assert usage["prompt_tokens"] > usage["image_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= MAX_NEW_TOKENS
    assert response.raw["model"] == "tiny-ixc2-4khd" and response.raw["plans"][0]["hd_num"] == 1
    request = runner.requests[0]
    assert request.messages[-1].text == "What is in the picture?"
    assert request.generation.max_new_tokens == MAX_NEW_TOKENS and request.generation.do_sample is False


def test_url_block_refused_by_default_and_nothing_fetched(llm: HD4KMultiModalLLM, runner: RecordingRunner) -> None:
    with local_image_server(png_bytes((0, 0, 255))) as server:
        with pytest.raises(errors.URLNotAllowedError, match="allow_image_urls=True"):
            llm.chat(ask(ImageBlock(url=f"{server.url}/cat.png"), TextBlock(text="What is it?")))
        assert server.hits == []
    assert runner.requests == []


def test_url_block_allowed_goes_through_the_guarded_fetcher(runner: RecordingRunner) -> None:
    body = png_bytes((0, 0, 255))
    with local_image_server(body) as server:
        # allow_image_urls alone keeps the private-address guard: 127.0.0.1 is still refused.
        guarded = HD4KMultiModalLLM(hd=HD4K(runner), hd_num=1, allow_image_urls=True)
        with pytest.raises(errors.URLNotAllowedError):
            guarded.chat(ask(ImageBlock(url=f"{server.url}/cat.png"), TextBlock(text="What is it?")))
        assert server.hits == []

        local = HD4K(runner, policy=ImagePolicy(allowed_private_hosts=frozenset({"127.0.0.1"})))
        llm = HD4KMultiModalLLM(hd=local, hd_num=1, max_new_tokens=MAX_NEW_TOKENS, allow_image_urls=True)
        llm.chat(ask(ImageBlock(url=f"{server.url}/cat.png"), TextBlock(text="What is it?")))
        assert server.hits == ["/cat.png"]
    assert runner.image_hashes() == [image_content_hash(load_image(body))]


def test_allowed_root_limits_paths(runner: RecordingRunner, photo: Path, tmp_path: Path) -> None:
    outside = write_image(tmp_path / "elsewhere" / "secret.png", (1, 2, 3))
    llm = HD4KMultiModalLLM(hd=HD4K(runner), hd_num=1, max_new_tokens=MAX_NEW_TOKENS, allowed_root=photo.parent)
    with pytest.raises(errors.PathNotAllowedError):
        llm.chat(ask(ImageBlock(path=outside), TextBlock(text="What is it?")))
    assert runner.requests == []
    llm.chat(question(photo))
    assert runner.image_hashes() == [file_hash(photo)]


def test_unreadable_blocks_are_refused(llm: HD4KMultiModalLLM, photo: Path) -> None:
    with pytest.raises(errors.InputError, match="not document blocks"):
        llm.chat(
            ask(TextBlock(text="Read this."), DocumentBlock(data=b"%PDF-1.4 fake", document_mimetype="application/pdf"))
        )
    with pytest.raises(errors.InputError, match="system message cannot hold images"):
        llm.chat([ChatMessage(role=MessageRole.SYSTEM, blocks=[ImageBlock(path=photo)]), *question(photo)])


def test_system_prompt_and_history(llm: HD4KMultiModalLLM, runner: RecordingRunner, photo: Path) -> None:
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="You are terse."),
        ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(path=photo), TextBlock(text="What is this?")]),
        ChatMessage(role=MessageRole.ASSISTANT, content="A red square."),
        ChatMessage(role=MessageRole.SYSTEM, content="Answer in English."),
        ChatMessage(role=MessageRole.USER, content="And its colour?"),
    ]
    llm.chat(messages)
    sent = runner.requests[0].messages
    assert [m.role for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[0].content == ("You are terse.\n\nAnswer in English.",)
    assert [image_content_hash(img) for img in sent[1].images] == [file_hash(photo)]
    assert sent[1].text == "What is this?"
    assert sent[2].content == ("A red square.",)
    assert sent[3].content == ("And its colour?",)


def test_per_call_hd_num_changes_image_tokens(llm: HD4KMultiModalLLM, runner: RecordingRunner, tmp_path: Path) -> None:
    wide = write_image(tmp_path / "wide.png", (30, 160, 90), size=(700, 340))
    one = llm.chat(ask(ImageBlock(path=wide), TextBlock(text="Describe.")))  # the LLM's hd_num=1
    six = llm.chat(ask(ImageBlock(path=wide), TextBlock(text="Describe.")), hd_num=6)
    assert [r.hd_nums for r in runner.requests] == [(1,), (6,)]
    assert one.raw["plans"][0]["num_tiles"] == 1 and six.raw["plans"][0]["num_tiles"] > 1
    assert six.additional_kwargs["image_tokens"] > one.additional_kwargs["image_tokens"]
    assert six.additional_kwargs["image_tokens"] == six.raw["plans"][0]["image_tokens"]


# ----------------------------------------------------------------------------------------------------
# complete() and the legacy image_documents argument
# ----------------------------------------------------------------------------------------------------
def test_complete_with_image_documents(llm: HD4KMultiModalLLM, runner: RecordingRunner, photo: Path) -> None:
    other = photo.with_name("other.png")
    write_image(other, (20, 20, 220))
    by_path = ImageDocument(image_path=str(photo), text="a photo")
    inline = ImageDocument(image=base64.b64encode(other.read_bytes()).decode(), text="another")
    response = llm.complete("Compare the two pictures.", image_documents=[by_path, inline])
    assert runner.image_hashes() == [file_hash(photo), file_hash(other)]
    assert runner.requests[0].messages[-1].text == "Compare the two pictures."
    assert response.additional_kwargs["image_tokens"] == sum(p["image_tokens"] for p in response.raw["plans"])

    runner.requests.clear()
    legacy = llm.complete("Describe.", [by_path])  # MultiModalLLM.complete(prompt, image_documents)
    assert runner.image_hashes() == [file_hash(photo)]
    assert legacy.text == llm.complete("Describe.", image_documents=[by_path]).text


async def test_async_complete_and_stream_complete(llm: HD4KMultiModalLLM, runner: RecordingRunner, photo: Path) -> None:
    docs = [ImageDocument(image_path=str(photo), text="a photo")]
    sync = llm.complete("Describe.", image_documents=docs)
    assert sync.text
    assert (await llm.acomplete("Describe.", image_documents=docs)).text == sync.text
    chunks = list(llm.stream_complete("Describe.", image_documents=docs))
    assert "".join(c.delta or "" for c in chunks) == chunks[-1].text == sync.text
    achunks = [c async for c in await llm.astream_complete("Describe.", image_documents=docs)]
    assert "".join(c.delta or "" for c in achunks) == sync.text
    assert achunks[-1].additional_kwargs == sync.additional_kwargs
    assert runner.image_hashes() == [file_hash(photo)] * 4


# ----------------------------------------------------------------------------------------------------
# Streaming and async
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoding", [{}, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_stream_chat_deltas_join_to_chat_text(llm: HD4KMultiModalLLM, photo: Path, decoding: dict[str, Any]) -> None:
    full = llm.chat(question(photo), **decoding)
    chunks = list(llm.stream_chat(question(photo), **decoding))
    *pieces, last = chunks
    assert all(c.delta for c in pieces)  # no empty deltas before the final usage chunk
    assert "".join(c.delta for c in pieces) == full.message.content
    assert [c.message.content for c in pieces] == [
        "".join(c.delta for c in pieces[: i + 1]) for i in range(len(pieces))
    ]
    assert last.delta == "" and last.message.content == full.message.content
    assert last.additional_kwargs == full.additional_kwargs
    assert full.message.content, "the tiny model answers in visible text"


async def test_achat_and_astream_chat(llm: HD4KMultiModalLLM, runner: RecordingRunner, photo: Path) -> None:
    full = llm.chat(question(photo))
    assert full.message.content
    assert (await llm.achat(question(photo))).message.content == full.message.content
    chunks = [c async for c in await llm.astream_chat(question(photo))]
    assert "".join(c.delta or "" for c in chunks) == full.message.content
    assert chunks[-1].raw["usage"] == full.raw["usage"]
    assert runner.image_hashes() == [file_hash(photo)] * 3


async def test_astream_chat_closed_early(llm: HD4KMultiModalLLM, photo: Path) -> None:
    stream = await llm.astream_chat(question(photo))
    first = await anext(stream)
    assert first.delta
    await stream.aclose()  # stops the generation; must not hang or raise


def test_token_counting_handler_sees_usage(runner: RecordingRunner, photo: Path) -> None:
    counter = TokenCountingHandler()
    llm = HD4KMultiModalLLM(
        hd=HD4K(runner), hd_num=1, max_new_tokens=MAX_NEW_TOKENS, callback_manager=CallbackManager([counter])
    )
    response = llm.chat(question(photo))
    assert counter.prompt_llm_token_count == response.additional_kwargs["prompt_tokens"]
    assert counter.completion_llm_token_count == response.additional_kwargs["completion_tokens"]


# ----------------------------------------------------------------------------------------------------
# Structured output
# ----------------------------------------------------------------------------------------------------
class Invoice(BaseModel):
    number: str
    total: float
    paid: bool = False


@pytest.mark.parametrize(
    "text",
    [
        '{"number": "A-7", "total": 12.5}',
        'Here you go:\n```json\n{"number": "A-7", "total": 12.5}\n```\nAnything else?',
        'The invoice {see below} is: {"number": "A-7", "total": "12.5", "note": "} not a brace {"}',
        '{"number": "A-7", "total": 12.5, "paid": false} trailing words',
    ],
)
def test_parser_accepts_json_in_answers(text: str) -> None:
    assert parse_structured_output(text, Invoice) == Invoice(number="A-7", total=12.5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("The total is 12.5 euros.", "contains no JSON object"),
        ('{"number": "A-7", "total": 12.5,}', "not valid JSON"),
        ('{"number": "A-7"}', "total: Field required"),
        ('{"number": "A-7", "total": "twelve"}', "total: Input should be a valid number"),
        ("[1, 2, 3]", "contains no JSON object"),
    ],
)
def test_parser_rejects_bad_answers_with_actionable_text(text: str, message: str) -> None:
    with pytest.raises(OutputParseError) as info:
        parse_structured_output(text, Invoice)
    assert message in str(info.value)
    assert "Invoice" in str(info.value) and "Reply with" in str(info.value)


def test_json_instruction_carries_the_schema() -> None:
    instruction = json_instruction(Invoice)
    assert '"total"' in instruction and '"required":["number","total"]' in instruction


def test_structured_predict_is_valid_by_construction(
    llm: HD4KMultiModalLLM, runner: RecordingRunner, photo: Path
) -> None:
    prompt = ChatPromptTemplate(
        message_templates=[
            ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(path=photo), TextBlock(text="Read the {what}.")])
        ]
    )
    # Decoding is constrained to the schema (issue 21): random weights fill an Invoice in one call.
    roomy_runner = RecordingRunner(runner.inner, max_new_tokens=80)
    roomy = HD4KMultiModalLLM(hd=HD4K(roomy_runner), hd_num=1, max_new_tokens=80)
    assert isinstance(roomy.structured_predict(Invoice, PromptTemplate("Read the {what}."), what="invoice"), Invoice)
    (text_only,) = roomy_runner.requests
    assert text_only.constraint is not None and text_only.constraint.schema == Invoice.model_json_schema()
    # With the image the tiny model's context leaves 12 new tokens: too few for the JSON, a typed error
    # (never invalid JSON), without a retry.
    with pytest.raises(StructuredOutputTruncatedError, match="max_new_tokens"):
        llm.structured_predict(Invoice, prompt, what="invoice")
    (first,) = runner.requests
    assert [image_content_hash(i) for i in first.images] == [file_hash(photo)]
    # The core's structured-output loop (hd4k_tools.structured, shared with LangChain and the server): the
    # prompt, then the JSON instruction as the next user turn (the prompt joins consecutive user turns).
    assert first.messages[-2].text == "Read the invoice."
    assert first.messages[-1].text.startswith("Answer with a single JSON object that conforms")


class ScriptedAnswers(HD4KMultiModalLLM):
    """Replays fixed answers instead of running the model: tests only the structured-output loop."""

    answers: list[str] = []  # noqa: RUF012 - a pydantic field, copied per instance
    seen: list[list[ChatMessage]] = []  # noqa: RUF012

    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        self.seen.append(list(messages))
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=self.answers.pop(0)))

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self.chat(messages, **kwargs)


async def test_structured_predict_recovers_on_retry(runner: RecordingRunner) -> None:
    answers = ["Total: 12.5", '```json\n{"number": "A-7", "total": 12.5}\n```']
    llm = ScriptedAnswers(hd=runner, answers=list(answers))
    prompt = PromptTemplate("Extract the invoice from: {text}")
    assert llm.structured_predict(Invoice, prompt, text="A-7, 12.5 EUR") == Invoice(number="A-7", total=12.5)
    retry = llm.seen[1]
    # prompt, JSON instruction, the failed answer, the retry carrying the complaint (the core loop)
    assert [m.role for m in retry] == [MessageRole.USER, MessageRole.USER, MessageRole.ASSISTANT, MessageRole.USER]
    assert retry[2].content == "Total: 12.5" and "contains no JSON object" in (retry[3].content or "")

    llm = ScriptedAnswers(hd=runner, answers=['{"number": "B-1", "total": 3}'])
    assert await llm.astructured_predict(Invoice, prompt, text="B-1") == Invoice(number="B-1", total=3)
    assert len(llm.seen) == 1
