"""The Runner protocol: one object that owns a model (or a connection to one) and answers a conversation
with images. Torch-free: engines live in their own modules.

Engines: :class:`~hd4k_tools.runtime.local.LocalRunner` (the native model in this process),
:class:`~hd4k_tools.runtime.remote.RemoteRunner` (an OpenAI-compatible server). Each takes a
:class:`GenerationRequest` (messages whose content mixes text and already-loaded RGB images, one resolved
``hd_num`` per image, generation settings, layout) and returns a :class:`RunnerResult`. An engine that
can answer several requests together also implements :class:`BatchRunner`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from PIL import Image

from hd4k_tools.errors import InputError
from hd4k_tools.models.registry import DEFAULT_FAMILY, HDPlan, Layout
from hd4k_tools.results import PlanSummary, Timings, Usage
from hd4k_tools.runtime.generation_config import GenerationConfig
from hd4k_tools.structured import JSONConstraint

Role = Literal["system", "user", "assistant"]
Part = str | Image.Image


@dataclass(frozen=True)
class Message:
    """One turn: text and images in the order they appear."""

    role: Role
    content: tuple[Part, ...]

    @classmethod
    def user(cls, *parts: Part) -> Message:
        return cls("user", tuple(parts))

    @property
    def text(self) -> str:
        return "".join(p for p in self.content if isinstance(p, str))

    @property
    def images(self) -> list[Image.Image]:
        return [p for p in self.content if isinstance(p, Image.Image)]


@dataclass(frozen=True)
class GenerationRequest:
    """What a runner is asked: messages, one ``hd_num`` per image (in order), generation settings.

    ``layout="chat"`` is the official ``chat()`` format (meta instruction as system turn, images inside
    the user turn, BOS before every text part). ``layout="eval"`` is the authors' evaluation format
    (BOS, the images, then the user turn; no system prompt). Remote runners leave layout to the server.
    """

    messages: tuple[Message, ...]
    hd_nums: tuple[int, ...] = ()
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    layout: Layout = "chat"
    # The plans the facade made (``plan_images``); they travel with the request down to the engine, which
    # never plans. A request built from ``hd_nums`` alone is planned here, once, at construction.
    hd_plans: tuple[HDPlan, ...] = ()
    #: Constrained decoding: the answer must be one JSON object (matching the schema, if any). Engines
    #: enforce it token by token (native: llguidance; vLLM: its structured outputs; remote: the server's
    #: ``response_format``).
    constraint: JSONConstraint | None = None

    def __post_init__(self) -> None:
        if self.hd_plans:
            return
        images = self.images
        if len(images) != len(self.hd_nums):
            raise InputError(f"{len(images)} images but {len(self.hd_nums)} hd_num values; give one per image.")
        if images:
            plans = DEFAULT_FAMILY.plan_images(
                images, list(self.hd_nums), default_hd_num=1, context_length=0, max_new_tokens=0
            )
            object.__setattr__(self, "hd_plans", plans)  # frozen: set once, here

    @classmethod
    def planned(
        cls,
        messages: tuple[Message, ...],
        plans: Sequence[HDPlan],
        *,
        generation: GenerationConfig,
        layout: Layout = "chat",
        constraint: JSONConstraint | None = None,
    ) -> GenerationRequest:
        """A request whose images are already planned (one plan per image, in order)."""
        plans = tuple(plans)
        return cls(messages, tuple(p.hd_num for p in plans), generation, layout, plans, constraint)

    @property
    def images(self) -> list[Image.Image]:
        return [img for m in self.messages for img in m.images]

    def plans(self) -> list[HDPlan]:
        """The request's plans, one per image, as made once (checked against the images; never re-planned)."""
        images = self.images
        if len(images) != len(self.hd_nums):
            raise InputError(f"{len(images)} images but {len(self.hd_nums)} hd_num values; give one per image.")
        if [(p.width, p.height, p.hd_num) for p in self.hd_plans] != [
            (img.width, img.height, n) for img, n in zip(images, self.hd_nums, strict=True)
        ]:
            raise InputError("The request's plans do not match its images; plan them with plan_images().")
        return list(self.hd_plans)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token in OpenAI's ``logprobs.content[]`` shape: its text, log-probability, UTF-8
    bytes (a byte-fallback piece is one byte of a character, so ``token`` may be U+FFFD) and the most likely
    alternatives (entries without alternatives of their own)."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top_logprobs: tuple[TokenLogprob, ...] = ()

    def to_openai(self) -> dict[str, object]:
        """The JSON object OpenAI's API answers for this token."""
        return {
            "token": self.token,
            "logprob": self.logprob,
            "bytes": list(self.bytes),
            "top_logprobs": [
                {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in self.top_logprobs
            ],
        }


@dataclass
class RunnerResult:
    """A runner's answer."""

    text: str
    model: str
    finish_reason: str = "stop"
    plans: list[PlanSummary] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    #: Things the caller should know, e.g. that the device ran out of memory and the answer was produced
    #: at a smaller hd_num (the plans show the hd_num actually used).
    warnings: list[str] = field(default_factory=list)
    #: One entry per generated token when the request asked for ``logprobs``; else ``None``.
    logprobs: list[TokenLogprob] | None = None


class TextStream:
    """An iterator of text deltas; after it is exhausted, :attr:`result` holds the full answer.

    Closing it early (``close()``, ``break`` out of a ``for`` loop and dropping it) cancels the
    generation between two tokens.
    """

    def __init__(
        self,
        deltas: Iterator[str],
        result_box: list[RunnerResult],
        cancel: threading.Event,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        self._deltas = deltas
        self._box = result_box
        self._cancel = cancel
        self._exhausted = False
        #: With ``logprobs`` requested: the entries of the tokens generated so far, appended by the engine
        #: as it goes (a token's entry is there before the delta that holds its text is yielded).
        self.logprobs: list[TokenLogprob] = logprobs if logprobs is not None else []

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._deltas)
        except StopIteration:
            self._exhausted = True
            raise

    @property
    def result(self) -> RunnerResult | None:
        return self._box[0] if self._box else None

    def close(self) -> None:
        # A finished stream leaves ``cancel`` alone: the caller's event may go on to guard more work
        # (e.g. the next page of a document).
        if not self._exhausted:
            self._cancel.set()
        close = getattr(self._deltas, "close", None)
        if close is not None:
            close()


@runtime_checkable
class Runner(Protocol):
    """What every backend offers."""

    @property
    def model_id(self) -> str: ...

    @property
    def context_length(self) -> int:
        """Total tokens (prompt, images and answer) one call may use."""
        ...

    def count_text_tokens(self, text: str) -> int:
        """Tokens of ``text`` (an estimate where the tokenizer is remote)."""
        ...

    def generate(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult: ...

    def stream(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> TextStream: ...

    def close(self) -> None: ...


@runtime_checkable
class BatchRunner(Runner, Protocol):
    """A runner that answers several requests together (continuous batching, or at least concurrently).

    ``generate_batch`` returns one result per request, in order; ``cancel`` stops all of them."""

    def generate_batch(
        self, requests: Sequence[GenerationRequest], *, cancel: threading.Event | None = None
    ) -> list[RunnerResult]: ...


def generate_all(
    runner: Runner, requests: Sequence[GenerationRequest], *, cancel: threading.Event | None = None
) -> list[RunnerResult]:
    """Answer ``requests`` with ``runner``: together where it is a :class:`BatchRunner`, else one by one."""
    if isinstance(runner, BatchRunner):
        return runner.generate_batch(requests, cancel=cancel)
    return [runner.generate(r, cancel=cancel) for r in requests]


def stream_in_thread(
    produce: callable,  # type: ignore[valid-type]
    cancel: threading.Event | None,
    logprobs: list[TokenLogprob] | None = None,
) -> TextStream:
    """Run ``produce(emit, cancel) -> RunnerResult`` in a worker thread and expose its deltas.

    The worker owns the model call from start to end (and any lock it takes), so a consumer that
    stops reading can never leave a lock held: closing the stream sets ``cancel`` and the worker
    returns at the next token.
    """
    cancel = cancel or threading.Event()
    q: queue.Queue[tuple[str, object]] = queue.Queue()
    box: list[RunnerResult] = []

    def work() -> None:
        try:
            result = produce(lambda delta: q.put(("delta", delta)), cancel)
            box.append(result)
            q.put(("done", None))
        except BaseException as err:  # handed to the consumer's thread and re-raised there
            q.put(("error", err))

    worker = threading.Thread(target=work, name="hd4k-stream", daemon=True)
    worker.start()

    def deltas() -> Iterator[str]:
        done = False
        try:
            while True:
                kind, value = q.get()
                if kind == "delta":
                    yield value  # type: ignore[misc]
                elif kind == "error":
                    done = True
                    raise value  # type: ignore[misc]
                else:
                    done = True
                    return
        finally:
            if not done:  # abandoned mid-stream: stop the worker at its next token
                cancel.set()
            worker.join()

    return TextStream(deltas(), box, cancel, logprobs)


__all__ = [
    "BatchRunner",
    "GenerationRequest",
    "Message",
    "Runner",
    "RunnerResult",
    "TextStream",
    "TokenLogprob",
    "generate_all",
    "stream_in_thread",
]
