"""Real OpenAI clients against a real ``hd4k serve`` process on the tiny random checkpoint (issue 21): the
official ``openai`` client (structured output, logprobs, penalties, logit_bias, streaming),
``langchain_openai.ChatOpenAI.with_structured_output`` (json_schema, json_mode, include_raw) and LlamaIndex
``OpenAILike`` (structured_predict, as_structured_llm). Random weights: every structured answer parses and
validates only because decoding is constrained."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field
from servers import hd4k_serve

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")

MODEL = "tiny-ixc2"


class Invoice(BaseModel):
    """An invoice's key fields."""

    total: float = Field(ge=0, le=1000)
    currency: Literal["EUR", "USD"]
    paid: bool
    lines: list[str] = Field(max_length=2)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``hd4k serve`` on 127.0.0.1 with the tiny checkpoint, as a real process; yields its /v1 base URL."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with hd4k_serve("--model", str(tiny_checkpoint), "--served-model-name", MODEL, log_path=log_path) as live:
        yield f"{live.base}/v1"


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)


# -- the official client --------------------------------------------------------------------------------
def test_json_schema_answer_parses_and_validates(client) -> None:
    schema = Invoice.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": schema, "strict": True}}
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "The invoice?"}], response_format=fmt, max_tokens=200
    )
    data = json.loads(answer.choices[0].message.content)
    jsonschema.validate(data, schema)
    parsed = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "The invoice?"}], response_format=Invoice, max_tokens=200
    )
    assert isinstance(parsed.choices[0].message.parsed, Invoice)


def test_json_object_answer_streams_as_json(client) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Any object"}],
        response_format={"type": "json_object"},
        max_tokens=120,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    "schema, keyword",
    [
        ({"required": 5}, "required"),
        ({"type": {}}, "type"),
        ({"allOf": 5}, "allOf"),
        ({"required": [["a"]]}, "required"),
        ({"type": ["object", []]}, "type"),
        ({"type": "object", "dependentSchemas": {"a": {}}}, "dependentSchemas"),
    ],
)
def test_bad_schemas_are_400_naming_the_keyword(client, schema: dict, keyword: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}], response_format=fmt)
    assert keyword in info.value.body["message"]


def test_logprobs_whole_and_streamed(client) -> None:
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, logprobs=True, top_logprobs=3, temperature=0
    )
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 3 and e.bytes is not None for e in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, logprobs=True, top_logprobs=3, temperature=0, stream=True
    )
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_penalties_and_logit_bias_change_the_answer(client) -> None:
    messages = [{"role": "user", "content": "hello"}]

    def ids(**extra) -> list[str]:
        answer = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, logprobs=True, temperature=0, **extra
        )
        return [e.token for e in answer.choices[0].logprobs.content]

    base = ids()
    forced = ids(logit_bias={"100": 100})
    assert set(forced) == {ids_token(client, 100)} and forced != base
    assert ids(frequency_penalty=2.0) != base or ids(presence_penalty=2.0) != base
    assert ids(presence_penalty=0.0, frequency_penalty=0.0) == base


def ids_token(client, token_id: int) -> str:
    """The text of one token id, as logprobs report it (through a logit_bias that forces it)."""
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=1,
        logprobs=True,
        logit_bias={str(token_id): 100},
    )
    return answer.choices[0].logprobs.content[0].token


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, None),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ],
)
def test_out_of_range_options_are_400(client, extra: dict, param: str | None) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "?"}], max_tokens=2, extra_body=extra
        )
    if param is not None:
        assert param in json.dumps(info.value.body)


# -- LangChain's ChatOpenAI -------------------------------------------------------------------------------
def test_chat_openai_with_structured_output(server: str) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=server, api_key="unused", max_tokens=200, max_retries=0)
    out = llm.with_structured_output(Invoice, method="json_schema").invoke("The invoice as JSON?")
    assert isinstance(out, Invoice)
    raw = llm.with_structured_output(Invoice, method="json_schema", include_raw=True).invoke("The invoice?")
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], Invoice)
    assert json.loads(raw["raw"].content) == raw["parsed"].model_dump()
    # json_mode sends {"type": "json_object"} without the schema (the prompt must describe it): the answer is
    # always a JSON object; random weights do not guess the fields, which LangChain reports as parsing_error.
    mode = llm.with_structured_output(Invoice, method="json_mode", include_raw=True).invoke("The invoice as JSON?")
    assert isinstance(json.loads(mode["raw"].content), dict)
    assert isinstance(mode["parsed"], Invoice) or mode["parsing_error"] is not None


# -- LlamaIndex OpenAILike ---------------------------------------------------------------------------------
def test_llamaindex_openai_like_structured_predict(server: str) -> None:
    pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage
    from llama_index.core.prompts import PromptTemplate
    from llama_index.llms.openai_like import OpenAILike

    common = {"model": MODEL, "api_base": server, "api_key": "unused", "is_chat_model": True, "max_tokens": 200}
    # Configured as a user would for a server with structured outputs: response_format json_schema.
    llm = OpenAILike(**common, should_use_structured_outputs=True, max_retries=0)
    out = llm.structured_predict(Invoice, PromptTemplate("The invoice of {name}?"), name="ACME")
    assert isinstance(out, Invoice)
    response = llm.as_structured_llm(Invoice).chat([ChatMessage(role="user", content="The invoice?")])
    assert isinstance(response.raw, Invoice)
    # The default configuration prompts for JSON and sends tool_choice "required" without tools: accepted
    # as the no-op it is (no 400); random weights then write prose, which LlamaIndex's parser refuses.
    plain = OpenAILike(**common, max_retries=0)
    with pytest.raises(ValueError, match="json") as info:
        plain.structured_predict(Invoice, PromptTemplate("The invoice of {name}?"), name="ACME")
    assert not isinstance(info.value, openai.APIError)
