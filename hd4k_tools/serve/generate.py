"""Running a prepared request on the runner, off the event loop: whole answers (cut at stop sequences) and
JSON ``response_format`` answers (the structured-output loop of :mod:`hd4k_tools.structured` over requests
that carry the :class:`~hd4k_tools.structured.JSONConstraint`, so the engine decodes valid JSON; the
validation and its one retry remain for what a grammar does not enforce). Plain functions of the runner and
a cancel event; the routes call them in a worker thread."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

from hd4k_tools.errors import CancelledError, OutputParseError
from hd4k_tools.results import Usage
from hd4k_tools.runtime.runner import GenerationRequest, Message, Runner, RunnerResult
from hd4k_tools.runtime.stops import StopFilter
from hd4k_tools.serve.chat import Prepared
from hd4k_tools.serve.errors import APIError
from hd4k_tools.structured import StructuredOutputTruncatedError, dumps_json, generate_structured

__all__ = ["Answer", "answer", "structured_answer"]


@dataclasses.dataclass(frozen=True)
class Answer:
    """A finished answer: its text, whether a stop sequence cut it, the runner's result (usage summed over
    every model call) and, for structured output, the number of model calls."""

    text: str
    stopped: bool
    result: RunnerResult
    attempts: int | None = None


def answer(runner: Runner, prep: Prepared, cancel: threading.Event) -> Answer:
    """The whole answer to ``prep`` (structured when it has a ``response_format``)."""
    if prep.structured is not None:
        return structured_answer(runner, prep, cancel)
    if not prep.stops:
        result = runner.generate(prep.request, cancel=cancel)
        return Answer(result.text, False, result)
    # Stream internally so generation stops as soon as a stop sequence appears.
    stream = runner.stream(prep.request, cancel=cancel)
    filt = StopFilter(prep.stops)
    pieces: list[str] = []
    try:
        for delta in stream:
            pieces.append(filt.feed(delta))
            if filt.stopped:
                break
    finally:
        stream.close()
    pieces.append(filt.finish())
    if stream.result is None:  # pragma: no cover - a runner that produced no result without raising
        raise RuntimeError("the runner's stream ended without a result")
    return Answer("".join(pieces), filt.stopped, stream.result)


def _summed(results: Sequence[RunnerResult]) -> RunnerResult:
    last = results[-1]
    total = Usage(
        prompt_tokens=sum(r.usage.prompt_tokens for r in results),
        image_tokens=sum(r.usage.image_tokens for r in results),
        completion_tokens=sum(r.usage.completion_tokens for r in results),
    )
    return dataclasses.replace(last, usage=total)


def structured_answer(runner: Runner, prep: Prepared, cancel: threading.Event) -> Answer:
    """A JSON answer for ``prep.structured``: the validated object, serialised.

    Raises:
        APIError: 422 ``structured_output_invalid`` when the answer and its one retry do not validate.
        CancelledError: the client went away.
    """
    spec = prep.structured
    assert spec is not None
    base = prep.request
    plans = base.plans()
    results: list[RunnerResult] = []

    def call(messages: list[Message]) -> RunnerResult:
        if cancel.is_set():
            raise CancelledError("The request was cancelled.")
        request = GenerationRequest.planned(
            tuple(messages), plans, generation=base.generation, layout=base.layout, constraint=base.constraint
        )
        try:
            result = runner.generate(request, cancel=cancel)
        except StructuredOutputTruncatedError as err:
            raise APIError(400, str(err), param="max_tokens", code="structured_output_truncated") from err
        if result.finish_reason == "cancelled" or cancel.is_set():
            raise CancelledError("The request was cancelled.")
        results.append(result)
        return result

    outcome = generate_structured(
        spec,
        base.messages,
        call,
        text_of=lambda r: r.text,
        user=lambda text: Message.user(text),
        assistant=lambda r: Message("assistant", (r.text,)),
    )
    if outcome.error is not None:
        raise APIError(
            422,
            f"The model did not produce JSON that matches response_format: {outcome.error}",
            param="response_format",
            code="structured_output_invalid",
            type="invalid_response_error",
        )
    try:
        text = dumps_json(outcome.parsed)  # never NaN/Infinity (loads_json refused them on the way in)
    except OutputParseError as err:  # pragma: no cover - a parsed answer holds JSON values only
        raise APIError(422, str(err), param="response_format", code="structured_output_invalid") from err
    return Answer(text, False, _summed(results), outcome.attempts)
