"""ChatHD4K on the tiny random checkpoint: image formats, usage, streaming, stop sequences, per-call
options, conversations, structured output and the refusal of tool calling; http(s) image URLs from a
local server; and, on a scripted runner that writes JSON, structured output that succeeds."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from image_server import local_image_server
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_hd4k import ChatHD4K
from langchain_hd4k.chat_models import check_json_schema, extract_json_object, schema_validator
from langchain_helpers import ScriptedRunner, chart_image, page_image, png_bytes
from pydantic import BaseModel
from typing_extensions import TypedDict

from hd4k_tools import HD4K, HD4KError, ImagePolicy, InputError, OutputParseError, errors, plan, to_data_url
from hd4k_tools.structured import StructuredOutputTruncatedError

MAX_NEW_TOKENS = 12


@pytest.fixture
def chat(hd4k_tiny: HD4K) -> ChatHD4K:
    return ChatHD4K(hd=hd4k_tiny, max_new_tokens=MAX_NEW_TOKENS, hd_num=1)


def chart_b64() -> str:
    return base64.b64encode(png_bytes(chart_image())).decode()


QUESTION = {"type": "text", "text": "Which quarter is highest?"}


def image_message(block: dict[str, Any]) -> HumanMessage:
    return HumanMessage(content=[QUESTION, block])


IMAGE_BLOCKS = {
    "v1-base64": {"type": "image", "base64": chart_b64(), "mime_type": "image/png"},
    "v1-data-url": {"type": "image", "url": f"data:image/png;base64,{chart_b64()}"},
    "v0-source-type": {"type": "image", "source_type": "base64", "data": chart_b64(), "mime_type": "image/png"},
    "openai-image-url": {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{chart_b64()}"}},
    "openai-image-url-str": {"type": "image_url", "image_url": f"data:image/png;base64,{chart_b64()}"},
    "anthropic": {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": chart_b64()}},
}


# ----------------------------------------------------------------------------------------------------
# Images reach the model, counted in usage
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_only_reference(hd4k_tiny: HD4K) -> AIMessage:
    return ChatHD4K(hd=hd4k_tiny, max_new_tokens=MAX_NEW_TOKENS, hd_num=1).invoke([HumanMessage(content=[QUESTION])])


@pytest.fixture(scope="module")
def image_reference(hd4k_tiny: HD4K) -> AIMessage:
    return ChatHD4K(hd=hd4k_tiny, max_new_tokens=MAX_NEW_TOKENS, hd_num=1).invoke(
        [image_message(IMAGE_BLOCKS["v1-base64"])]
    )


@pytest.mark.parametrize("fmt", list(IMAGE_BLOCKS))
def test_each_image_format_reaches_the_model(
    chat: ChatHD4K, fmt: str, text_only_reference: AIMessage, image_reference: AIMessage
) -> None:
    result = chat.invoke([image_message(IMAGE_BLOCKS[fmt])])
    expected = plan(240, 120, 1)
    usage = result.usage_metadata
    assert usage is not None
    assert usage["input_token_details"]["image"] == expected.num_tokens  # type: ignore[typeddict-item]
    plans = result.response_metadata["hd4k"]["plans"]
    assert [(p["input_size"], p["rows"], p["cols"]) for p in plans] == [((240, 120), expected.rows, expected.cols)]
    # The image's tokens come on top of the same text prompt (plus its placeholder's BOS).
    text_only = text_only_reference.usage_metadata
    assert text_only is not None
    assert usage["input_tokens"] - text_only["input_tokens"] >= expected.num_tokens
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    # All formats give the model the same pixels: the same answer as the v1 base64 block.
    assert result.content == image_reference.content
    assert usage == image_reference.usage_metadata


def test_two_images_and_their_order(chat: ChatHD4K) -> None:
    tall = page_image(1, size=(100, 400))
    message = HumanMessage(
        content=[
            {"type": "image", "base64": chart_b64(), "mime_type": "image/png"},
            {"type": "text", "text": "Compare the chart with this page:"},
            {"type": "image", "url": to_data_url(tall)},
        ]
    )
    result = chat.invoke([message], hd_num=[1, 2])
    plans = result.response_metadata["hd4k"]["plans"]
    assert [(p["input_size"], p["hd_num"]) for p in plans] == [((240, 120), 1), ((100, 400), 2)]
    assert result.usage_metadata["input_token_details"]["image"] == (  # type: ignore[index]
        plan(240, 120, 1).num_tokens + plan(100, 400, 2).num_tokens
    )


def test_per_call_hd_num_changes_input_tokens(chat: ChatHD4K) -> None:
    message = image_message(IMAGE_BLOCKS["v1-base64"])
    low = chat.invoke([message], hd_num=1)
    high = chat.invoke([message], hd_num=9)
    assert low.usage_metadata["input_token_details"]["image"] == plan(240, 120, 1).num_tokens  # type: ignore[index]
    assert high.usage_metadata["input_token_details"]["image"] == plan(240, 120, 9).num_tokens  # type: ignore[index]
    assert (
        high.usage_metadata["input_tokens"] - low.usage_metadata["input_tokens"]  # type: ignore[index]
        == plan(240, 120, 9).num_tokens - plan(240, 120, 1).num_tokens
    )
    assert high.response_metadata["hd4k"]["plans"][0]["hd_num"] == 9
    # The constructor's value applies when the call does not override it.
    assert chat.invoke([message]).usage_metadata == low.usage_metadata


def test_hd_num_auto(chat: ChatHD4K) -> None:
    result = chat.invoke([image_message(IMAGE_BLOCKS["v1-base64"])], hd_num="auto")
    assert result.response_metadata["hd4k"]["plans"][0]["hd_num"] >= 1


# ----------------------------------------------------------------------------------------------------
# Bad images: clear ValueError subclasses from hd4k_tools, never a PIL traceback
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("block", "error", "match"),
    [
        ({"type": "image", "base64": "@@not base64@@", "mime_type": "image/png"}, errors.InvalidDataURLError, "base64"),
        (
            {
                "type": "image",
                "base64": base64.b64encode(b"just some text, no image" * 4).decode(),
                "mime_type": "image/png",
            },
            errors.UnsupportedFormatError,
            "not an image",
        ),
        (
            {
                "type": "image",
                "base64": base64.b64encode(png_bytes(chart_image())[:80]).decode(),
                "mime_type": "image/png",
            },
            errors.CorruptImageError,
            "damaged or truncated",
        ),
        (
            {"type": "image", "base64": chart_b64(), "mime_type": "application/pdf"},
            errors.UnsupportedFormatError,
            "accepts images",
        ),
        ({"type": "image", "url": "https://example.com/chart.png"}, errors.URLNotAllowedError, "allow_image_urls"),
        ({"type": "image", "url": "file:///etc/passwd"}, errors.URLNotAllowedError, "only data: URLs"),
        ({"type": "image", "url": "/etc/passwd"}, errors.URLNotAllowedError, "only data: URLs"),
        ({"type": "image", "file_id": "file-123"}, InputError, "file_id"),
        ({"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}, InputError, "'audio' block"),
        (
            {"type": "file", "base64": "JVBERi0=", "mime_type": "application/pdf"},
            InputError,
            "HD4KDocumentLoader",
        ),
    ],
)
def test_bad_images_raise_clear_errors(chat: ChatHD4K, block: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match) as caught:
        chat.invoke([image_message(block)])
    assert isinstance(caught.value, HD4KError)
    assert isinstance(caught.value, ValueError)


def test_huge_image_is_refused(chat: ChatHD4K) -> None:
    from langchain_helpers import huge_png

    block = {"type": "image", "base64": base64.b64encode(huge_png()).decode(), "mime_type": "image/png"}
    with pytest.raises(errors.ImageTooLargeError):
        chat.invoke([image_message(block)])


def test_private_image_urls_are_refused_even_when_urls_are_allowed(hd4k_tiny: HD4K) -> None:
    chat = ChatHD4K(hd=hd4k_tiny, max_new_tokens=4, allow_image_urls=True)
    for url in ("http://127.0.0.1:9/chart.png", "http://169.254.169.254/latest/meta-data/"):
        with pytest.raises(errors.URLNotAllowedError, match="Only public hosts"):
            chat.invoke([image_message({"type": "image", "url": url})])


# ----------------------------------------------------------------------------------------------------
# Streaming, stop sequences, usage and metadata
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_stream_joins_to_invoke_text(chat: ChatHD4K, with_image: bool) -> None:
    messages = [image_message(IMAGE_BLOCKS["v1-base64"]) if with_image else HumanMessage("Describe a chart.")]
    invoked = chat.invoke(messages)
    chunks = list(chat.stream(messages))
    assert invoked.text  # the seed-3 weights produce text, so the comparison is not vacuous
    assert "".join(c.text for c in chunks) == invoked.text
    assert len([c for c in chunks if c.text]) > 1
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert full.usage_metadata == invoked.usage_metadata
    assert full.response_metadata["model_name"] == invoked.response_metadata["model_name"]
    assert full.response_metadata["finish_reason"] == invoked.response_metadata["finish_reason"]
    # Usage and metadata come once, on the last chunk (merging chunks would otherwise add them up).
    assert [c.usage_metadata is not None for c in chunks].count(True) == 1
    assert chunks[-1].chunk_position == "last"


async def test_async_invoke_and_stream_match_sync(chat: ChatHD4K) -> None:
    messages = [image_message(IMAGE_BLOCKS["v1-base64"])]
    invoked = chat.invoke(messages)
    ainvoked = await chat.ainvoke(messages)
    pieces = [chunk.text async for chunk in chat.astream(messages)]
    assert ainvoked.text == invoked.text
    assert ainvoked.usage_metadata == invoked.usage_metadata
    assert "".join(pieces) == invoked.text


@pytest.fixture(scope="module")
def long_answer(hd4k_tiny: HD4K) -> str:
    text = ChatHD4K(hd=hd4k_tiny, max_new_tokens=40).invoke("Describe a chart.").text
    assert len(text) > 12
    return text


def _stop_inside(text: str) -> str:
    """A stop sequence that first occurs well inside ``text``."""
    for start in range(len(text) // 3, len(text) - 3):
        candidate = text[start : start + 3]
        if candidate.strip() and text.find(candidate) == start:
            return candidate
    raise AssertionError(f"no usable stop sequence in {text!r}")


def test_stop_sequence_cuts_invoke_and_stream(hd4k_tiny: HD4K, long_answer: str) -> None:
    chat = ChatHD4K(hd=hd4k_tiny, max_new_tokens=40)
    stop = _stop_inside(long_answer)
    expected = long_answer[: long_answer.find(stop)].rstrip()
    result = chat.invoke("Describe a chart.", stop=[stop])
    assert result.text == expected
    assert result.response_metadata["finish_reason"] == "stop"
    assert result.usage_metadata is not None
    assert result.usage_metadata["output_tokens"] <= 40
    streamed = "".join(c.text for c in chat.stream("Describe a chart.", stop=[stop]))
    assert streamed == expected
    # As a field of the model, and as a sequence that never occurs (no cut).
    assert ChatHD4K(hd=hd4k_tiny, max_new_tokens=40, stop=[stop]).invoke("Describe a chart.").text == expected
    untouched = chat.invoke("Describe a chart.", stop=["\x00never\x00"])
    assert untouched.text == long_answer
    assert (
        untouched.response_metadata["finish_reason"]
        == chat.invoke("Describe a chart.").response_metadata["finish_reason"]
    )


async def test_stop_sequence_async(hd4k_tiny: HD4K, long_answer: str) -> None:
    chat = ChatHD4K(hd=hd4k_tiny, max_new_tokens=40)
    stop = _stop_inside(long_answer)
    result = await chat.ainvoke("Describe a chart.", stop=[stop])
    assert result.text == long_answer[: long_answer.find(stop)].rstrip()


def test_usage_and_response_metadata(chat: ChatHD4K, hd4k_tiny: HD4K) -> None:
    result = chat.invoke([image_message(IMAGE_BLOCKS["v1-base64"])])
    usage = result.usage_metadata
    assert usage is not None
    assert 1 <= usage["output_tokens"] <= MAX_NEW_TOKENS
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    meta = result.response_metadata
    assert meta["model_name"] == hd4k_tiny.model_id
    assert meta["finish_reason"] in ("stop", "length")
    assert meta["hd4k"]["image_tokens"] == plan(240, 120, 1).num_tokens
    assert meta["hd4k"]["timings"]["total_s"] > 0


def test_per_call_generation_options(chat: ChatHD4K) -> None:
    short = chat.invoke("Describe a chart.", max_new_tokens=3)
    assert short.usage_metadata["output_tokens"] == 3  # type: ignore[index]
    assert chat.invoke("Describe a chart.", max_tokens=2).usage_metadata["output_tokens"] == 2  # type: ignore[index]
    sampled = [chat.invoke("Describe a chart.", temperature=0.9, seed=7).text for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible
    assert chat.invoke("Describe a chart.", temperature=0).text == chat.invoke("Describe a chart.").text
    with pytest.raises(InputError, match="Unknown option"):
        chat.invoke("Describe a chart.", max_new_token=3)
    with pytest.raises(ValueError, match="top_p"):
        chat.invoke("Describe a chart.", do_sample=True, top_p=2.0)


def test_generation_options_as_fields(hd4k_tiny: HD4K) -> None:
    chat = ChatHD4K(hd=hd4k_tiny, max_tokens=5, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=1)
    assert chat.max_new_tokens == 5
    first = chat.invoke("Describe a chart.")
    assert first.usage_metadata["output_tokens"] == 5  # type: ignore[index]
    assert chat.invoke("Describe a chart.").text == first.text
    params = chat._get_ls_params()
    assert params["ls_max_tokens"] == 5
    assert params["ls_temperature"] == 0.8
    assert params["ls_provider"] == "hd4k"


# ----------------------------------------------------------------------------------------------------
# Conversations
# ----------------------------------------------------------------------------------------------------
class _RecordingHandler(BaseCallbackHandler):
    def __init__(self) -> None:
        self.calls: list[list[BaseMessage]] = []

    def on_chat_model_start(self, serialized: Any, messages: list[list[BaseMessage]], **kwargs: Any) -> None:
        self.calls.extend(messages)


def test_multi_turn_history_and_system_prompt(chat: ChatHD4K) -> None:
    history = [
        HumanMessage(content=[QUESTION, IMAGE_BLOCKS["v1-base64"]]),
        AIMessage("Q2."),
        HumanMessage("And the lowest?"),
    ]
    plain = chat.invoke(history)
    with_system = chat.invoke([SystemMessage("You read charts."), *history])
    two_systems = chat.invoke([SystemMessage("You read charts."), SystemMessage("Be brief."), *history])
    assert plain.usage_metadata["input_token_details"]["image"] == plan(240, 120, 1).num_tokens  # type: ignore[index]
    # The system prompt replaces the model's default meta instruction: different prompts, token counts.
    counts = {m.usage_metadata["input_tokens"] for m in (plain, with_system, two_systems)}  # type: ignore[index]
    assert len(counts) == 3
    # Tool results are user turns the model can read.
    with_tool = chat.invoke([*history, AIMessage("Let me check."), ToolMessage("Q1 is 40.", tool_call_id="t1")])
    assert with_tool.usage_metadata["input_tokens"] > plain.usage_metadata["input_tokens"]  # type: ignore[index]


def test_conversation_must_end_with_the_user(chat: ChatHD4K) -> None:
    with pytest.raises(InputError, match="end with a user message"):
        chat.invoke([HumanMessage("Hi"), AIMessage("Hello")])


def test_construction(hd4k_tiny: HD4K, lc_checkpoint: Any) -> None:
    wrapped = ChatHD4K(hd=hd4k_tiny.runner, model="tiny")
    assert isinstance(wrapped.hd, HD4K)
    assert wrapped.model_name == "tiny"
    assert "hd" not in wrapped.model_dump()
    assert wrapped.profile is not None
    assert wrapped.profile["image_inputs"] is True
    assert wrapped.profile["tool_calling"] is False
    assert wrapped.profile["max_input_tokens"] == hd4k_tiny.runner.context_length
    loaded = ChatHD4K.from_pretrained(str(lc_checkpoint), device="cpu", dtype="float32", max_new_tokens=4, hd_num=2)
    assert (loaded.max_new_tokens, loaded.hd_num) == (4, 2)
    assert loaded.invoke("Hi").text == ChatHD4K(hd=hd4k_tiny, max_new_tokens=4).invoke("Hi").text
    with pytest.raises(TypeError, match="hd must be"):
        ChatHD4K(hd="not a model")


# ----------------------------------------------------------------------------------------------------
# Tools: refused with an explanation
# ----------------------------------------------------------------------------------------------------
def test_bind_tools_raises_with_guidance(chat: ChatHD4K) -> None:
    with pytest.raises(NotImplementedError, match="no native tool calling") as caught:
        chat.bind_tools([])
    assert "HD4KToolkit" in str(caught.value)
    assert "no native tool calling" in (ChatHD4K.__doc__ or "")


def test_agent_factory_fails_loudly(chat: ChatHD4K) -> None:
    from langchain.agents import create_agent
    from langchain_core.tools import tool

    @tool
    def noop(x: int) -> int:
        """Return x."""
        return x

    with pytest.raises(NotImplementedError, match="HD4KToolkit"):
        create_agent(chat, tools=[noop]).invoke({"messages": [HumanMessage("hi")]})


# ----------------------------------------------------------------------------------------------------
# Structured output
# ----------------------------------------------------------------------------------------------------
class Answer(BaseModel):
    quarter: str
    value: int


class AnswerDict(TypedDict):
    quarter: str
    value: int


def test_extract_json_object() -> None:
    assert extract_json_object('{"a": 1}') == {"a": 1}
    assert extract_json_object('Sure! ```json\n{"quarter": "Q2", "value": 80}\n``` Done.') == {
        "quarter": "Q2",
        "value": 80,
    }
    assert extract_json_object('Braces {not json} then {"a": {"b": [1, 2]}} and {"c": 3}') == {"a": {"b": [1, 2]}}
    for bad in ("no json here", "[1, 2, 3]", '{"a": 1', ""):
        with pytest.raises(OutputParseError, match="no JSON object"):
            extract_json_object(bad)


def test_schema_validators() -> None:
    good = 'The answer: {"quarter": "Q2", "value": 80}'
    assert schema_validator(Answer, Answer.model_json_schema())(good) == Answer(quarter="Q2", value=80)
    assert schema_validator(AnswerDict, {})(good) == {"quarter": "Q2", "value": 80}
    schema = Answer.model_json_schema()
    assert schema_validator(schema, schema)(good) == {"quarter": "Q2", "value": 80}
    for validate in (
        schema_validator(Answer, schema),
        schema_validator(AnswerDict, {}),
        schema_validator(schema, schema),
    ):
        with pytest.raises(OutputParseError, match="value"):
            validate('{"quarter": "Q2", "value": "eighty"}')
        with pytest.raises(OutputParseError, match="quarter"):
            validate('{"value": 80}')
    assert check_json_schema({"quarter": "Q2", "value": True}, schema) == [
        "value: True is not of type 'integer'"
    ]  # the jsonschema library's messages (core structured module)
    assert (
        check_json_schema({"quarter": None, "value": 1}, {"properties": {"quarter": {"anyOf": [{"type": "null"}]}}})
        == []
    )


@pytest.mark.parametrize(
    "schema", [Answer, AnswerDict, Answer.model_json_schema()], ids=["pydantic", "typeddict", "json"]
)
def test_structured_output_is_valid_by_construction_on_random_weights(hd4k_tiny: HD4K, schema: Any) -> None:
    # Random weights answer schema-valid JSON because decoding is constrained to the schema (issue 21):
    # one model call, no retry; the schema is still shown to the model as an instruction.
    handler = _RecordingHandler()
    chat = ChatHD4K(hd=hd4k_tiny, max_new_tokens=80, hd_num=1)
    out = chat.with_structured_output(schema).invoke("Which quarter is highest?", config={"callbacks": [handler]})
    parsed = out.model_dump() if isinstance(out, Answer) else out
    assert set(parsed) >= {"quarter", "value"} and isinstance(parsed["value"], int)
    assert len(handler.calls) == 1
    assert "conforms to this JSON schema" in handler.calls[0][-1].text and '"quarter"' in handler.calls[0][-1].text


def test_structured_output_out_of_budget_is_a_typed_error(chat: ChatHD4K) -> None:
    # 12 new tokens cannot hold the JSON: a typed error, never invalid JSON (and no retry at that budget).
    with pytest.raises(StructuredOutputTruncatedError, match="max_new_tokens=12"):
        chat.with_structured_output(Answer).invoke("Which quarter is highest, and its value?")


async def test_structured_output_async_and_include_raw(hd4k_tiny: HD4K) -> None:
    chat = ChatHD4K(hd=hd4k_tiny, max_new_tokens=80, hd_num=1)
    out = await chat.with_structured_output(Answer, include_raw=True).ainvoke("Which quarter is highest?")
    assert isinstance(out["parsed"], Answer) and out["parsing_error"] is None
    assert isinstance(out["raw"], AIMessage)
    assert isinstance(await chat.with_structured_output(Answer).ainvoke("Which quarter is highest?"), Answer)


def test_structured_output_with_image_input(hd4k_tiny: HD4K) -> None:
    chat = ChatHD4K(hd=hd4k_tiny, max_new_tokens=80, hd_num=1)
    structured = chat.with_structured_output(Answer, include_raw=True)
    out = structured.invoke([image_message(IMAGE_BLOCKS["v1-base64"])])
    assert isinstance(out["parsed"], Answer)
    assert out["raw"].usage_metadata["input_token_details"]["image"] == plan(240, 120, 1).num_tokens


# ----------------------------------------------------------------------------------------------------
# Structured output that succeeds: a scripted runner answers with (eventually) valid JSON
# ----------------------------------------------------------------------------------------------------
VALID_ANSWER = '{"quarter": "Q2", "value": 80}'
WRONG_TYPE_ANSWER = '{"quarter": "Q2", "value": "eighty"}'


def scripted_chat(*answers: str) -> tuple[ChatHD4K, ScriptedRunner]:
    runner = ScriptedRunner(answers)
    return ChatHD4K(hd=HD4K(runner), max_new_tokens=MAX_NEW_TOKENS, hd_num=1), runner


STRUCTURED_SCHEMAS = {
    "pydantic": (Answer, Answer(quarter="Q2", value=80)),
    "typeddict": (AnswerDict, {"quarter": "Q2", "value": 80}),
    "json_schema": (Answer.model_json_schema(), {"quarter": "Q2", "value": 80}),
}


@pytest.mark.parametrize("schema_type", list(STRUCTURED_SCHEMAS))
def test_structured_output_parses_valid_json(schema_type: str) -> None:
    schema, expected = STRUCTURED_SCHEMAS[schema_type]
    # Prose and a code fence around the object, as real models write it.
    chat, runner = scripted_chat(f"Sure:\n```json\n{VALID_ANSWER}\n```")
    parsed = chat.with_structured_output(schema).invoke("Which quarter is highest, and its value?")
    assert parsed == expected
    assert type(parsed) is type(expected)
    assert len(runner.requests) == 1
    assert "conforms to this JSON schema" in runner.prompts[0]
    assert '"quarter"' in runner.prompts[0]


@pytest.mark.parametrize(
    ("first", "error"),
    [
        ("I think it is Q2.", "The answer contains no JSON object"),
        (WRONG_TYPE_ANSWER, "value: Input should be a valid integer"),
        ('{"value": 80}', "quarter: Field required"),
    ],
    ids=["no-json", "wrong-type", "missing-field"],
)
def test_structured_output_retry_succeeds_and_shows_the_error(first: str, error: str) -> None:
    chat, runner = scripted_chat(first, VALID_ANSWER)
    handler = _RecordingHandler()
    parsed = chat.with_structured_output(Answer).invoke("Which quarter is highest?", config={"callbacks": [handler]})
    assert parsed == Answer(quarter="Q2", value=80)
    assert len(runner.requests) == 2
    retry_prompt = runner.prompts[1]
    assert retry_prompt.startswith("Your answer was not valid: ")
    assert error in retry_prompt
    assert '"quarter"' in retry_prompt  # the schema is repeated
    # The model sees its own failed answer before the correction.
    retry = runner.requests[1].messages
    assert (retry[-2].role, retry[-2].text) == ("assistant", first)
    assert len(handler.calls) == 2


def test_structured_output_json_schema_dict_retry_names_the_bad_field() -> None:
    schema = Answer.model_json_schema()
    chat, runner = scripted_chat(WRONG_TYPE_ANSWER, VALID_ANSWER)
    assert chat.with_structured_output(schema).invoke("Which quarter?") == {"quarter": "Q2", "value": 80}
    assert "value: 'eighty' is not of type 'integer'" in runner.prompts[1]


def test_structured_output_include_raw_success_and_after_retry() -> None:
    chat, _ = scripted_chat(VALID_ANSWER)
    out = chat.with_structured_output(Answer, include_raw=True).invoke("Which quarter?")
    assert out["parsed"] == Answer(quarter="Q2", value=80)
    assert out["parsing_error"] is None
    assert isinstance(out["raw"], AIMessage)
    assert out["raw"].text == VALID_ANSWER
    assert out["raw"].response_metadata["model_name"] == ScriptedRunner.model_id

    chat, runner = scripted_chat("no json", VALID_ANSWER)
    out = chat.with_structured_output(AnswerDict, include_raw=True).invoke("Which quarter?")
    assert out == {"raw": out["raw"], "parsed": {"quarter": "Q2", "value": 80}, "parsing_error": None}
    assert out["raw"].text == VALID_ANSWER  # the raw message of the answer that parsed
    assert len(runner.requests) == 2

    chat, runner = scripted_chat("no json", WRONG_TYPE_ANSWER)
    out = chat.with_structured_output(Answer, include_raw=True).invoke("Which quarter?")
    assert out["parsed"] is None
    assert isinstance(out["parsing_error"], OutputParseError)
    assert "value" in str(out["parsing_error"])
    assert out["raw"].text == WRONG_TYPE_ANSWER


async def test_structured_output_async_retry_succeeds() -> None:
    chat, runner = scripted_chat(WRONG_TYPE_ANSWER, VALID_ANSWER)
    parsed = await chat.with_structured_output(Answer).ainvoke("Which quarter is highest?")
    assert parsed == Answer(quarter="Q2", value=80)
    assert "value: Input should be a valid integer" in runner.prompts[1]
    chat, _ = scripted_chat(VALID_ANSWER)
    out = await chat.with_structured_output(Answer.model_json_schema(), include_raw=True).ainvoke("Which quarter?")
    assert out["parsed"] == {"quarter": "Q2", "value": 80}


def test_structured_output_streams_the_parsed_object() -> None:
    chat, _ = scripted_chat(VALID_ANSWER)
    assert list(chat.with_structured_output(Answer).stream("Which quarter?")) == [Answer(quarter="Q2", value=80)]


def test_structured_output_with_an_image_keeps_the_image_in_both_attempts() -> None:
    chat, runner = scripted_chat("no json", VALID_ANSWER)
    parsed = chat.with_structured_output(Answer).invoke([image_message(IMAGE_BLOCKS["v1-base64"])])
    assert parsed == Answer(quarter="Q2", value=80)
    assert [[img.size for img in r.images] for r in runner.requests] == [[(240, 120)], [(240, 120)]]


def test_image_in_a_tool_message_reaches_the_model() -> None:
    chat, runner = scripted_chat("A bar chart.")
    messages = [
        HumanMessage("Fetch the chart and describe it."),
        AIMessage("", tool_calls=[{"type": "tool_call", "id": "t1", "name": "get_chart", "args": {}}]),
        ToolMessage(content=[IMAGE_BLOCKS["openai-image-url"]], tool_call_id="t1", name="get_chart"),
    ]
    result = chat.invoke(messages)
    assert result.text == "A bar chart."
    last = runner.requests[0].messages[-1]
    assert last.role == "user"
    assert last.text == "Result of the tool get_chart:\n"
    assert [img.size for img in last.images] == [(240, 120)]


# ----------------------------------------------------------------------------------------------------
# http(s) image URLs: fetched only when allowed, from a loopback host only when that is allowed too
# ----------------------------------------------------------------------------------------------------
URL_BLOCKS = {
    "v1-url": lambda url: {"type": "image", "url": url},
    "openai-image-url": lambda url: {"type": "image_url", "image_url": {"url": url}},
    "openai-image-url-str": lambda url: {"type": "image_url", "image_url": url},
}


@pytest.mark.parametrize("fmt", list(URL_BLOCKS))
def test_allowed_image_url_is_fetched_from_a_local_server(
    hd4k_tiny: HD4K, fmt: str, image_reference: AIMessage
) -> None:
    with local_image_server(png_bytes(chart_image())) as server:
        block = URL_BLOCKS[fmt](f"{server.url}/chart.png")
        allowed = ChatHD4K(
            hd=hd4k_tiny, max_new_tokens=MAX_NEW_TOKENS, hd_num=1, allow_image_urls=True, allow_private_urls=True
        )
        result = allowed.invoke([image_message(block)])
        assert server.hits == ["/chart.png"]
    expected = plan(240, 120, 1)
    plans = result.response_metadata["hd4k"]["plans"]
    assert [(p["input_size"], p["rows"], p["cols"]) for p in plans] == [((240, 120), expected.rows, expected.cols)]
    assert result.usage_metadata["input_token_details"]["image"] == expected.num_tokens  # type: ignore[index]
    # The downloaded pixels are the inline image's: the tiny model gives the same answer.
    assert result.text == image_reference.text


def test_loopback_host_allowed_by_name_in_the_hd4k_policy(hd4k_tiny: HD4K) -> None:
    hd = HD4K(hd4k_tiny.runner, policy=ImagePolicy(allowed_private_hosts=frozenset({"127.0.0.1"})))
    chat = ChatHD4K(hd=hd, max_new_tokens=MAX_NEW_TOKENS, hd_num=1, allow_image_urls=True)
    with local_image_server(png_bytes(chart_image())) as server:
        result = chat.invoke([image_message({"type": "image", "url": f"{server.url}/chart.png"})])
        assert server.hits == ["/chart.png"]
    assert result.response_metadata["hd4k"]["plans"][0]["input_size"] == (240, 120)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"allow_image_urls": True}, "Only public hosts"),  # URLs on, but no private-host allowance
        ({"allow_private_urls": True}, "allow_image_urls"),  # the allowance alone does not turn URLs on
        ({}, "allow_image_urls"),
    ],
    ids=["urls-only", "private-only", "neither"],
)
@pytest.mark.parametrize("fmt", list(URL_BLOCKS))
def test_local_image_url_refused_without_both_allowances(
    hd4k_tiny: HD4K, fmt: str, options: dict[str, bool], match: str
) -> None:
    chat = ChatHD4K(hd=hd4k_tiny, max_new_tokens=MAX_NEW_TOKENS, hd_num=1, **options)
    with local_image_server(png_bytes(chart_image())) as server:
        with pytest.raises(errors.URLNotAllowedError, match=match):
            chat.invoke([image_message(URL_BLOCKS[fmt](f"{server.url}/chart.png"))])
        assert server.hits == []
