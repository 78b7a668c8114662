"""The framework-neutral structured-output kit (hd4k_tools.structured)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel
from typing_extensions import TypedDict

from hd4k_tools.errors import InputError, OutputParseError
from hd4k_tools.structured import (
    StructuredOutput,
    agenerate_structured,
    check_json_schema,
    extract_json_object,
    generate_structured,
    json_instruction,
    make_validator,
)


class Invoice(BaseModel):
    total: float
    currency: str


class Point(TypedDict):
    x: int
    y: int


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "kind": {"enum": ["a", "b"]},
        "child": {"$ref": "#/$defs/Child"},
        "maybe": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    },
    "required": ["name"],
    "additionalProperties": False,
    "$defs": {"Child": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}},
}


@pytest.mark.parametrize(
    "text",
    ['{"a": 1}', 'Sure! {"a": 1} hope it helps', '```json\n{"a": 1}\n```', '{bad} then {"a": 1}'],
)
def test_extract_json_object_finds_the_object(text: str) -> None:
    assert extract_json_object(text) == {"a": 1}


@pytest.mark.parametrize("text", ["", "no json here", "[1, 2]", "{unclosed"])
def test_extract_json_object_refuses(text: str) -> None:
    with pytest.raises(OutputParseError, match="no JSON object"):
        extract_json_object(text)


def test_check_json_schema_nested_refs_enums_unions() -> None:
    assert check_json_schema({"name": "x", "tags": ["a"], "kind": "a", "child": {"n": 1}, "maybe": None}, SCHEMA) == []
    problems = check_json_schema({"tags": ["a", 3], "kind": "z", "child": {}, "maybe": "s", "extra": 1}, SCHEMA)
    joined = "; ".join(problems)
    for fragment in (
        "(root): 'name' is a required property",
        "tags.1: 3 is not of type 'string'",
        "kind: 'z' is not one of",
        "child: 'n' is a required property",
        "maybe: 's' is not valid under any of the given schemas",
        "('extra' was unexpected)",
    ):
        assert fragment in joined
    assert check_json_schema({"name": True}, SCHEMA) == ["name: True is not of type 'string'"]
    assert check_json_schema({"n": True}, {"properties": {"n": {"type": "integer"}}}) == [
        "n: True is not of type 'integer'"
    ]


def test_bad_schema_references_are_input_errors() -> None:
    with pytest.raises(InputError, match="local"):
        check_json_schema({"a": 1}, {"properties": {"a": {"$ref": "http://x/s.json"}}})
    with pytest.raises(InputError, match="points nowhere"):
        check_json_schema({"a": 1}, {"properties": {"a": {"$ref": "#/$defs/Nope"}}})
    loop = {"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/A"}}}
    with pytest.raises(InputError, match="64 levels"):
        check_json_schema({}, loop)


def test_validators_for_each_schema_kind() -> None:
    assert make_validator(Invoice)('{"total": 3.5, "currency": "EUR"}') == Invoice(total=3.5, currency="EUR")
    assert make_validator(Point)('{"x": 1, "y": 2}') == {"x": 1, "y": 2}
    assert make_validator(SCHEMA)('{"name": "n"}') == {"name": "n"}
    assert make_validator(None)('x {"any": [1]}') == {"any": [1]}
    for schema, text in ((Invoice, '{"total": "lots"}'), (Point, '{"x": 1}'), (SCHEMA, '{"name": 1}')):
        with pytest.raises(OutputParseError):
            make_validator(schema)(text)


def test_instruction_carries_the_schema() -> None:
    spec = StructuredOutput.from_schema(Invoice)
    assert '"currency"' in spec.instruction and "JSON schema" in spec.instruction
    assert "JSON object" in json_instruction(None) and "schema" not in json_instruction(None)
    assert "was not valid: boom" in spec.retry(OutputParseError("boom"))


def _script(answers: list[str]) -> tuple[list[list[tuple[str, str]]], Any]:
    seen: list[list[tuple[str, str]]] = []

    def call(conversation: list[tuple[str, str]]) -> str:
        seen.append(list(conversation))
        return answers[len(seen) - 1]

    return seen, call


def _run(spec: StructuredOutput, answers: list[str]) -> tuple[Any, list[list[tuple[str, str]]]]:
    seen, call = _script(answers)
    out = generate_structured(
        spec,
        [("user", "q")],
        call,
        text_of=lambda r: r,
        user=lambda t: ("user", t),
        assistant=lambda r: ("assistant", r),
    )
    return out, seen


def test_first_answer_valid_is_one_call() -> None:
    out, seen = _run(StructuredOutput.from_schema(Invoice), ['{"total": 1, "currency": "X"}'])
    assert out.value() == Invoice(total=1, currency="X") and out.attempts == 1 and len(seen) == 1
    assert seen[0][-1][1].startswith("Answer with a single JSON object")


def test_one_retry_carries_the_error_and_the_answer() -> None:
    out, seen = _run(StructuredOutput.from_schema(Invoice), ['{"total": 1}', '{"total": 2, "currency": "Y"}'])
    assert out.value() == Invoice(total=2, currency="Y") and out.attempts == 2
    retry = seen[1]
    assert retry[-2] == ("assistant", '{"total": 1}')
    assert "currency" in retry[-1][1] and "Field required" in retry[-1][1]


def test_two_failures_raise_output_parse_error() -> None:
    out, seen = _run(StructuredOutput.from_schema(Invoice), ["prose", "more prose"])
    assert len(seen) == 2 and out.parsed is None and out.raw == "more prose"
    with pytest.raises(OutputParseError, match="after one retry"):
        out.value()


def test_async_loop_matches_sync() -> None:
    answers = ['{"total": 1}', '{"total": 2, "currency": "Y"}']
    calls: list[int] = []

    async def call(conversation: list[tuple[str, str]]) -> str:
        calls.append(len(conversation))
        return answers[len(calls) - 1]

    out = asyncio.run(
        agenerate_structured(
            StructuredOutput.from_schema(Invoice),
            [("user", "q")],
            call,
            text_of=lambda r: r,
            user=lambda t: ("user", t),
            assistant=lambda r: ("assistant", r),
        )
    )
    assert out.value() == Invoice(total=2, currency="Y") and calls == [2, 4]


# -- issue 21: a well-kept validator; invalid schemas and non-finite numbers refused --------------------------
@pytest.mark.parametrize(
    "schema, keyword",
    [
        ({"required": 5}, "required"),
        ({"type": {}}, "type"),
        ({"allOf": 5}, "allOf"),
        ({"required": [["a"]]}, "required"),
        ({"type": ["object", []]}, "type"),
        ({"properties": {"a": {"minimum": "3"}}}, "minimum"),
    ],
)
def test_invalid_json_schemas_are_input_errors_naming_the_keyword(schema: dict[str, Any], keyword: str) -> None:
    from hd4k_tools.structured import JSONConstraint, check_schema

    for build in (check_schema, JSONConstraint.of, StructuredOutput.from_schema, make_validator):
        with pytest.raises(InputError, match=f"not valid JSON Schema.*keyword '{keyword}'"):
            build(schema)
    with pytest.raises(InputError):
        check_json_schema({}, schema)


@pytest.mark.parametrize("text", ['{"a": NaN}', '{"a": -Infinity}', '{"a": [Infinity]}'])
def test_nan_and_infinity_are_not_json(text: str) -> None:
    from hd4k_tools.structured import loads_json

    with pytest.raises(OutputParseError, match="not JSON"):
        extract_json_object(text)
    with pytest.raises(OutputParseError, match="not JSON"):
        loads_json(text)
    with pytest.raises(OutputParseError, match="not JSON"):
        make_validator({"type": "object"})(text)


def test_dumps_json_never_writes_nan() -> None:
    from hd4k_tools.structured import dumps_json

    assert dumps_json({"a": 1.5, "b": "é"}) == '{"a": 1.5, "b": "é"}'
    assert dumps_json(Invoice(total=2, currency="EUR")) == '{"total": 2.0, "currency": "EUR"}'
    with pytest.raises(OutputParseError, match="non-finite"):
        dumps_json({"a": float("nan")})


def test_constraint_keeps_the_schema_as_compact_json() -> None:
    from hd4k_tools.structured import JSONConstraint

    c = JSONConstraint.of({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert c.schema_json == '{"type":"object","properties":{"a":{"type":"integer"}}}'
    assert c.response_format()["json_schema"]["schema"] == c.schema
    assert JSONConstraint.of(None).response_format() == {"type": "json_object"}
    assert StructuredOutput.from_schema(Invoice).constraint.schema == Invoice.model_json_schema()
