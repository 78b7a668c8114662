"""Structured output by JSON prompting: one framework-neutral implementation for every front end.

IXC2-4KHD has no constrained decoding, so structured output is asked for in words and checked after the
fact: :func:`json_instruction` turns a JSON schema into an instruction appended to the conversation, the
answer's first JSON object is extracted (:func:`extract_json_object`: bare, inside a Markdown fence or
surrounded by prose) and validated (a pydantic model, a ``TypedDict`` or a plain JSON schema, see
:func:`make_validator`). An answer that does not validate gets **one** retry that shows the model its
answer and the validation error (:func:`retry_instruction`); a second failure raises
:class:`~hd4k_tools.errors.OutputParseError`.

:class:`StructuredOutput` bundles the three steps; :func:`generate_structured` /
:func:`agenerate_structured` run the loop over any message type, so ``ChatHD4K`` (LangChain messages),
the LlamaIndex LLM (``ChatMessage``) and ``hd4k serve`` (``response_format``, on
:class:`~hd4k_tools.runtime.runner.Message`) share it. Nothing here imports a framework.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from hd4k_tools.errors import InputError, OutputParseError

__all__ = [
    "StructuredAnswer",
    "StructuredOutput",
    "agenerate_structured",
    "check_json_schema",
    "extract_json_object",
    "generate_structured",
    "json_instruction",
    "json_schema_of",
    "make_validator",
    "retry_instruction",
]

M = TypeVar("M")  # a message type of the caller's framework
R = TypeVar("R")  # what the caller's model call returns (an AIMessage, a RunnerResult, ...)

_SHOWN_CHARS = 300
_MAX_PROBLEMS = 10
_MAX_DEPTH = 64


# ----------------------------------------------------------------------------------------------------
# Instructions
# ----------------------------------------------------------------------------------------------------
def _schema_text(json_schema: Mapping[str, Any]) -> str:
    return json.dumps(json_schema, ensure_ascii=False, separators=(",", ":"))


def json_instruction(json_schema: Mapping[str, Any] | None) -> str:
    """The instruction appended to the conversation: one JSON object (conforming to ``json_schema`` when
    one is given), nothing else."""
    if json_schema is None:
        return "Answer with a single JSON object and nothing else (no prose, no code fence)."
    return (
        "Answer with a single JSON object that conforms to this JSON schema, and nothing else "
        f"(no prose, no code fence):\n{_schema_text(json_schema)}"
    )


def retry_instruction(error: Exception, json_schema: Mapping[str, Any] | None) -> str:
    """The follow-up instruction after an answer that did not validate (it carries the error)."""
    want = (
        f"a JSON object that conforms to this JSON schema:\n{_schema_text(json_schema)}"
        if json_schema is not None
        else "a JSON object."
    )
    return f"Your answer was not valid: {error}\nReply again with only {want}"


# ----------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------
def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")


def extract_json_object(text: str) -> dict[str, Any]:
    """The first JSON object (``{...}``) in ``text``: bare, inside a Markdown code fence, or in prose.

    Raises:
        OutputParseError: there is no decodable JSON object in the text.
    """
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except (json.JSONDecodeError, RecursionError, ValueError):
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)  # pragma: no cover - raw_decode at '{' only yields dicts
    raise OutputParseError(f"The answer contains no JSON object: {_shown(text)}")


# ----------------------------------------------------------------------------------------------------
# JSON-schema checking (the subset model answers need; no extra dependency)
# ----------------------------------------------------------------------------------------------------
_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and math.isfinite(v) and v.is_integer())
    ),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def _resolve(spec: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """``spec`` with its local ``$ref`` chain followed."""
    for _ in range(_MAX_DEPTH):
        ref = spec.get("$ref")
        if not isinstance(ref, str):
            return spec
        if not ref.startswith("#/") and ref != "#":
            raise InputError(f"Only local JSON-schema references ('#/...') are supported, got {ref!r}.")
        node: Any = root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, Mapping) or part not in node:
                raise InputError(f"The JSON schema reference {ref!r} points nowhere.")
            node = node[part]
        if not isinstance(node, Mapping):
            raise InputError(f"The JSON schema reference {ref!r} is not a schema.")
        spec = node
    raise InputError(f"The JSON schema nests deeper than {_MAX_DEPTH} levels (or refers to itself in a loop).")


def _check(value: Any, spec: Any, root: Mapping[str, Any], where: str, out: list[str], depth: int) -> None:
    if not isinstance(spec, Mapping) or len(out) >= _MAX_PROBLEMS:
        return
    if depth > _MAX_DEPTH:
        raise InputError(f"The JSON schema nests deeper than {_MAX_DEPTH} levels (or refers to itself in a loop).")
    spec = _resolve(spec, root)
    label = where or "(root)"
    for key in ("anyOf", "oneOf"):
        branches = spec.get(key)
        if (
            isinstance(branches, list)
            and branches
            and not any(not _problems_of(value, b, root, depth + 1) for b in branches)
        ):
            out.append(f"{label}: matches none of the allowed schemas")
            return
    for sub in spec.get("allOf") or []:
        _check(value, sub, root, where, out, depth + 1)
    if "const" in spec and value != spec["const"]:
        out.append(f"{label}: must be {spec['const']!r}")
    if isinstance(spec.get("enum"), list) and value not in spec["enum"]:
        out.append(f"{label}: must be one of {spec['enum']!r}")
    kind = spec.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_JSON_TYPES.get(k, lambda _: True)(value) for k in kinds):
            out.append(f"{label}: expected {' or '.join(map(str, kinds))}, got {_json_type(value)}")
            return
    if isinstance(value, dict):
        props = spec.get("properties") if isinstance(spec.get("properties"), Mapping) else {}
        for name in spec.get("required") or []:
            if name not in value:
                out.append(f"{_join(where, name)}: Field required")
        for name, item in value.items():
            if name in props:
                _check(item, props[name], root, _join(where, name), out, depth + 1)
            elif spec.get("additionalProperties") is False:
                out.append(f"{_join(where, name)}: unexpected property")
            elif isinstance(spec.get("additionalProperties"), Mapping):
                _check(item, spec["additionalProperties"], root, _join(where, name), out, depth + 1)
    if isinstance(value, list):
        if isinstance(spec.get("minItems"), int) and len(value) < spec["minItems"]:
            out.append(f"{label}: needs at least {spec['minItems']} items")
        if isinstance(spec.get("maxItems"), int) and len(value) > spec["maxItems"]:
            out.append(f"{label}: allows at most {spec['maxItems']} items")
        if isinstance(spec.get("items"), Mapping):
            for i, item in enumerate(value):
                _check(item, spec["items"], root, _join(where, str(i)), out, depth + 1)


def _problems_of(value: Any, spec: Any, root: Mapping[str, Any], depth: int) -> list[str]:
    out: list[str] = []
    _check(value, spec, root, "", out, depth)
    return out


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else str(name)


def _json_type(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _JSON_TYPES[name](value):
            return name
    return type(value).__name__  # pragma: no cover - json.loads yields JSON types only


def check_json_schema(data: Any, json_schema: Mapping[str, Any]) -> list[str]:
    """Problems of ``data`` against ``json_schema`` (empty: valid).

    Covers what model answers need: ``type``, ``properties``/``required``/``additionalProperties``,
    ``items``/``minItems``/``maxItems``, ``enum``, ``const``, ``anyOf``/``oneOf``/``allOf`` and local
    ``$ref`` (``#/$defs/...``). Other keywords (formats, string patterns, numeric bounds) are not checked.

    Raises:
        InputError: the schema itself cannot be used (a remote ``$ref``, a dangling reference, a loop).
    """
    return _problems_of(data, json_schema, json_schema, 0)


# ----------------------------------------------------------------------------------------------------
# Schemas and validators
# ----------------------------------------------------------------------------------------------------
def _is_model(schema: Any) -> bool:
    return isinstance(schema, type) and issubclass(schema, BaseModel)


def json_schema_of(schema: Mapping[str, Any] | type) -> dict[str, Any]:
    """The JSON schema of a pydantic model, a ``TypedDict`` (or any type pydantic knows), or a dict
    schema as given."""
    if isinstance(schema, Mapping):
        return dict(schema)
    if _is_model(schema):
        return schema.model_json_schema()  # type: ignore[union-attr]
    if isinstance(schema, type) and hasattr(schema, "schema") and hasattr(schema, "parse_obj"):  # pydantic.v1
        return dict(schema.schema())  # type: ignore[attr-defined]
    return TypeAdapter(schema).json_schema()


def _short_validation_error(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
        for e in err.errors(include_url=False)[:_MAX_PROBLEMS]
    )


def make_validator(schema: Mapping[str, Any] | type | None) -> Callable[[str], Any]:
    """A function ``answer text -> parsed value`` that raises :class:`OutputParseError`.

    ``None``: any JSON object (a dict). A pydantic model: an instance of it. A pydantic.v1 model: the
    same through ``parse_obj``. Another type (a ``TypedDict``): the validated dict. A mapping: a JSON
    schema, checked by :func:`check_json_schema`; the dict is returned.
    """
    if schema is None:
        return extract_json_object
    if _is_model(schema):
        model: Any = schema

        def validate_model(text: str) -> Any:
            try:
                return model.model_validate(extract_json_object(text))
            except ValidationError as err:
                raise OutputParseError(_short_validation_error(err)) from err

        return validate_model
    if isinstance(schema, type) and hasattr(schema, "parse_obj"):  # pydantic.v1 models
        v1: Any = schema

        def validate_v1(text: str) -> Any:
            data = extract_json_object(text)
            try:
                return v1.parse_obj(data)
            except Exception as err:  # pydantic.v1.ValidationError
                raise OutputParseError(str(err)) from err

        return validate_v1
    if isinstance(schema, Mapping):
        json_schema = dict(schema)

        def validate_schema(text: str) -> Any:
            data = extract_json_object(text)
            problems = check_json_schema(data, json_schema)
            if problems:
                raise OutputParseError("; ".join(problems))
            return data

        return validate_schema
    adapter = TypeAdapter(schema)

    def validate_type(text: str) -> Any:
        data = extract_json_object(text)
        try:
            adapter.validate_python(data)
        except ValidationError as err:
            raise OutputParseError(_short_validation_error(err)) from err
        return data

    return validate_type


@dataclass(frozen=True)
class StructuredOutput:
    """What to ask for and how to check it: the JSON schema shown to the model (``None``: any JSON
    object, OpenAI's ``json_object`` mode) and the validator for the answer."""

    json_schema: dict[str, Any] | None
    validate: Callable[[str], Any]

    @classmethod
    def from_schema(cls, schema: Mapping[str, Any] | type | None) -> StructuredOutput:
        """For a pydantic model, a ``TypedDict``, a JSON schema dict, or ``None`` (any JSON object)."""
        if schema is None:
            return cls(None, make_validator(None))
        return cls(json_schema_of(schema), make_validator(schema))

    @property
    def instruction(self) -> str:
        """The instruction appended after the conversation."""
        return json_instruction(self.json_schema)

    def retry(self, error: Exception) -> str:
        """The follow-up instruction after ``error``."""
        return retry_instruction(error, self.json_schema)


@dataclass(frozen=True)
class StructuredAnswer(Generic[R]):
    """The outcome: the last raw answer, the parsed value (``None`` on failure), the error (``None`` on
    success) and how many model calls it took (1 or 2)."""

    raw: R
    parsed: Any
    error: OutputParseError | None
    attempts: int

    def value(self) -> Any:
        """The parsed value, or the error raised."""
        if self.error is not None:
            raise self.error
        return self.parsed


def _final_error(err: OutputParseError) -> OutputParseError:
    return OutputParseError(f"No valid structured output after one retry: {err}")


def generate_structured(
    spec: StructuredOutput,
    messages: Sequence[M],
    call: Callable[[list[M]], R],
    *,
    text_of: Callable[[R], str],
    user: Callable[[str], M],
    assistant: Callable[[R], M],
) -> StructuredAnswer[R]:
    """Ask ``call`` for structured output over ``messages`` (any message type), retrying once.

    ``user(text)`` builds the caller's user message (the instruction), ``assistant(raw)`` the caller's
    assistant message for a failed answer, ``text_of(raw)`` the answer's text.
    """
    conversation = [*messages, user(spec.instruction)]
    raw = call(conversation)
    try:
        return StructuredAnswer(raw, spec.validate(text_of(raw)), None, 1)
    except OutputParseError as first:
        conversation = [*conversation, assistant(raw), user(spec.retry(first))]
    raw = call(conversation)
    try:
        return StructuredAnswer(raw, spec.validate(text_of(raw)), None, 2)
    except OutputParseError as err:
        return StructuredAnswer(raw, None, _final_error(err), 2)


async def agenerate_structured(
    spec: StructuredOutput,
    messages: Sequence[M],
    call: Callable[[list[M]], Awaitable[R]],
    *,
    text_of: Callable[[R], str],
    user: Callable[[str], M],
    assistant: Callable[[R], M],
) -> StructuredAnswer[R]:
    """:func:`generate_structured` with an async ``call``."""
    conversation = [*messages, user(spec.instruction)]
    raw = await call(conversation)
    try:
        return StructuredAnswer(raw, spec.validate(text_of(raw)), None, 1)
    except OutputParseError as first:
        conversation = [*conversation, assistant(raw), user(spec.retry(first))]
    raw = await call(conversation)
    try:
        return StructuredAnswer(raw, spec.validate(text_of(raw)), None, 2)
    except OutputParseError as err:
        return StructuredAnswer(raw, None, _final_error(err), 2)
