"""Structured output: one framework-neutral implementation for every front end.

The engines constrain decoding to the schema (:class:`JSONConstraint` on the request: llguidance in the
native engine, vLLM's structured outputs, a server's ``response_format``), so the answer is JSON of the
schema by construction. Around that: :func:`json_instruction` turns the schema into an instruction appended
to the conversation (the model should know what it is writing), the answer's first JSON object is extracted
(:func:`extract_json_object`; ``NaN``/``Infinity`` are refused, :func:`dumps_json` never writes them) and
validated with the ``jsonschema`` library (a pydantic model, a ``TypedDict`` or a plain JSON schema, see
:func:`make_validator`; schemas themselves are checked against the meta-schema by :func:`check_schema`).
An answer that still does not validate (a keyword the grammar does not enforce, or an engine without
constraints) gets **one** retry that shows the model its answer and the error (:func:`retry_instruction`); a
second failure raises :class:`~hd4k_tools.errors.OutputParseError`.

:class:`StructuredOutput` bundles the three steps; :func:`generate_structured` /
:func:`agenerate_structured` run the loop over any message type, so ``ChatHD4K`` (LangChain messages),
the LlamaIndex LLM (``ChatMessage``) and ``hd4k serve`` (``response_format``, on
:class:`~hd4k_tools.runtime.runner.Message`) share it. Nothing here imports a framework.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import jsonschema
import referencing.exceptions
from pydantic import BaseModel, TypeAdapter, ValidationError

from hd4k_tools.errors import InputError, OutputParseError

__all__ = [
    "JSONConstraint",
    "StructuredAnswer",
    "StructuredOutput",
    "StructuredOutputTruncatedError",
    "agenerate_structured",
    "check_json_schema",
    "check_schema",
    "dumps_json",
    "extract_json_object",
    "generate_structured",
    "json_instruction",
    "json_schema_of",
    "loads_json",
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


class _NonFiniteNumber(ValueError):
    """``NaN``, ``Infinity`` or ``-Infinity`` in a text: Python's json reads them, JSON does not have them."""


class StructuredOutputTruncatedError(OutputParseError):
    """Constrained decoding ran out of ``max_new_tokens`` before the JSON answer was complete: the answer
    would not parse, so none is returned. Allow more new tokens or ask for a smaller object."""


def _reject_constant(name: str) -> Any:
    raise _NonFiniteNumber(name)


def loads_json(text: str) -> Any:
    """``json.loads`` that refuses ``NaN``/``Infinity``/``-Infinity`` (not JSON; most clients reject them).

    Raises:
        OutputParseError: the text is not JSON, or holds one of those constants.
    """
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except _NonFiniteNumber as err:
        raise OutputParseError(f"The JSON holds {err}, which is not JSON: {_shown(text)}") from err
    except (json.JSONDecodeError, RecursionError, ValueError) as err:
        raise OutputParseError(f"Not JSON ({err}): {_shown(text)}") from err


def dumps_json(value: Any) -> str:
    """``value`` as JSON text for clients: never ``NaN``/``Infinity`` (``allow_nan=False``); pydantic models
    as their JSON dump.

    Raises:
        OutputParseError: the value holds a non-finite float.
    """
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError as err:
        raise OutputParseError(
            f"The structured answer holds a non-finite number, which JSON cannot carry: {err}"
        ) from err


def extract_json_object(text: str) -> dict[str, Any]:
    """The first JSON object (``{...}``) in ``text``: bare, inside a Markdown code fence, or in prose.

    Raises:
        OutputParseError: there is no decodable JSON object in the text.
    """
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except _NonFiniteNumber as err:
            raise OutputParseError(f"The answer's JSON holds {err}, which is not JSON: {_shown(text)}") from err
        except (json.JSONDecodeError, RecursionError, ValueError):
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)  # pragma: no cover - raw_decode at '{' only yields dicts
    raise OutputParseError(f"The answer contains no JSON object: {_shown(text)}")


# ----------------------------------------------------------------------------------------------------
# JSON-schema checking (the ``jsonschema`` library)
# ----------------------------------------------------------------------------------------------------
def _walk_refs(node: Any, depth: int = 0) -> Iterator[str]:
    """Every ``$ref`` string in a schema (bounded depth: a schema is data from a client)."""
    if depth > _MAX_DEPTH:
        raise InputError(f"The JSON schema nests deeper than {_MAX_DEPTH} levels; send a flatter schema.")
    if isinstance(node, Mapping):
        ref = node.get("$ref")
        if isinstance(ref, str):
            yield ref
        for value in node.values():
            yield from _walk_refs(value, depth + 1)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_refs(value, depth + 1)


def _resolve_local(ref: str, root: Mapping[str, Any]) -> Any:
    node: Any = root
    for part in ref[2:].split("/") if ref not in ("#", "#/") else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            raise InputError(f"The JSON schema reference {ref!r} points nowhere.")
    return node


def _check_refs(schema: Mapping[str, Any]) -> None:
    """Only local references that resolve, and no reference that only ever leads to itself (a loop)."""
    for ref in _walk_refs(schema):
        if ref != "#" and not ref.startswith("#/"):
            raise InputError(f"Only local JSON-schema references ('#/...') are supported, got {ref!r}.")
        seen = {ref}
        node = _resolve_local(ref, schema)
        while isinstance(node, Mapping) and set(node) == {"$ref"} and isinstance(node["$ref"], str):
            nxt = node["$ref"]
            if nxt in seen:
                raise InputError(
                    f"The JSON schema reference {ref!r} refers to itself in a loop (no schema behind it after "
                    f"following up to {_MAX_DEPTH} levels)."
                )
            if nxt != "#" and not nxt.startswith("#/"):
                raise InputError(f"Only local JSON-schema references ('#/...') are supported, got {nxt!r}.")
            seen.add(nxt)
            node = _resolve_local(nxt, schema)


def _schema_path(path: Sequence[Any]) -> str:
    return "/".join(str(p) for p in path) or "(root)"


def check_schema(json_schema: Any) -> dict[str, Any]:
    """``json_schema`` checked against its JSON Schema meta-schema (draft 2020-12 unless ``$schema`` names
    another) and for local, resolvable ``$ref`` s; returned as a plain dict.

    Raises:
        InputError: not a JSON object, not valid JSON Schema (the message names the keyword and where it
            is, e.g. ``{"required": 5}``), a remote or dangling ``$ref``, a reference loop, or a schema that
            is not plain JSON (NaN, non-string keys).
    """
    if not isinstance(json_schema, Mapping):
        raise InputError(f"A JSON schema must be a JSON object, got {type(json_schema).__name__}.")
    schema = dict(json_schema)
    try:
        json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InputError(f"The JSON schema is not plain JSON: {err}") from err
    except RecursionError as err:
        raise InputError(f"The JSON schema nests deeper than {_MAX_DEPTH} levels; send a flatter schema.") from err
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        error = jsonschema.exceptions.best_match(cls(cls.META_SCHEMA).iter_errors(schema))
    except RecursionError as err:
        raise InputError(f"The JSON schema nests deeper than {_MAX_DEPTH} levels; send a flatter schema.") from err
    if error is not None:
        keyword = next((str(p) for p in reversed(error.absolute_path) if isinstance(p, str)), error.validator)
        raise InputError(
            f"The JSON schema is not valid JSON Schema: {_shown_error(error.message)} (keyword {keyword!r} at "
            f"{_schema_path(error.absolute_path)})."
        )
    _check_refs(schema)
    return schema


def _shown_error(message: str) -> str:
    return message if len(message) <= _SHOWN_CHARS else message[:_SHOWN_CHARS] + "..."


def check_json_schema(data: Any, json_schema: Mapping[str, Any]) -> list[str]:
    """Problems of ``data`` against ``json_schema`` (empty: valid), as ``"where: what"`` lines, checked by
    the ``jsonschema`` library (every keyword of the schema's draft; ``format`` is not asserted).

    Raises:
        InputError: the schema itself cannot be used (see :func:`check_schema`).
    """
    schema = check_schema(json_schema)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    out: list[str] = []
    try:
        errors = sorted(cls(schema).iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
        for err in errors[:_MAX_PROBLEMS]:
            where = ".".join(str(p) for p in err.absolute_path) or "(root)"
            out.append(f"{where}: {_shown_error(err.message)}")
    except RecursionError as err:
        raise InputError(
            f"The JSON schema nests deeper than {_MAX_DEPTH} levels (or refers to itself in a loop)."
        ) from err
    except referencing.exceptions.Unresolvable as err:  # pragma: no cover - _check_refs resolves them first
        raise InputError(f"The JSON schema has a reference that points nowhere: {err}") from err
    return out


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
        json_schema = check_schema(schema)

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
class JSONConstraint:
    """What constrained decoding must produce: one JSON object (``schema_json`` ``None``: OpenAI's
    ``json_object``) or an instance of a JSON schema, kept as compact JSON text (hashable, and what grammar
    engines and servers take). Build it with :meth:`of`, which checks the schema first."""

    schema_json: str | None = None

    @classmethod
    def of(cls, schema: Mapping[str, Any] | None) -> JSONConstraint:
        """The constraint for a JSON schema (checked by :func:`check_schema`) or ``None`` (any JSON object).

        Raises:
            InputError: the schema is not valid JSON Schema.
        """
        if schema is None:
            return cls(None)
        return cls(json.dumps(check_schema(schema), ensure_ascii=False, separators=(",", ":"), allow_nan=False))

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema (``None``: any JSON object)."""
        return json.loads(self.schema_json) if self.schema_json is not None else None

    def response_format(self) -> dict[str, Any]:
        """As an OpenAI ``response_format`` (what a remote server is sent)."""
        if self.schema_json is None:
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": self.schema, "strict": True}}


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
        return cls(check_schema(json_schema_of(schema)), make_validator(schema))

    @property
    def constraint(self) -> JSONConstraint:
        """What the engine's constrained decoding must produce (the grammar of this schema)."""
        return JSONConstraint.of(self.json_schema)

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
