"""The record of one ingested page, its resume key, and the typed error it carries when it failed.

One record per PDF page or image. A record is *done* when it holds a transcription or an error that a
rerun would only repeat (the input itself is bad: corrupt, encrypted, oversized); any other error
(the engine failed, the run was cancelled) is retried by the next run over the same output folder.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hd4k_tools import errors
from hd4k_tools.runtime.engines import ENGINES as ENGINE_REGISTRY
from hd4k_tools.tasks import TASKS, document_prompt

RECORD_FORMAT = "hd4k-ingest/1"
TASK = TASKS["read_document"]
Engine = Literal["native", "vllm", "remote"]
# The in-process engines of the registry, and a remote OpenAI-compatible server.
ENGINES: tuple[str, ...] = (*ENGINE_REGISTRY, "remote")


def ingest_prompt(output: str = "markdown") -> str:
    """The transcription prompt every page gets (the ``read_document`` task's)."""
    return document_prompt(output)


def requested_hd_num(hd_num: int | str | None) -> str:
    """``hd_num`` as it enters the resume key: the task default when ``None``, ``"auto"`` as such."""
    if hd_num is None:
        return str(TASK.default_hd_num)
    return str(hd_num).strip().lower()


def record_key(content_hash: str, page: int | None, hd_num: int | str | None, model: str, prompt: str) -> str:
    """The resume key: a page is done once for each (content, page, hd_num, model, prompt).

    ``page`` is 1-based, ``None`` for a file that failed before its pages were known.
    """
    parts = [content_hash, "-" if page is None else str(page), requested_hd_num(hd_num), model, prompt]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()


class RecordError(BaseModel):
    """Why a page (or a whole file) has no transcription."""

    model_config = ConfigDict(frozen=True)

    type: str = Field(description="the hd4k_tools.errors class name, e.g. 'EncryptedPDFError'")
    message: str
    final: bool = Field(description="true when the input itself is bad, so a rerun would fail the same way")

    @classmethod
    def from_exception(cls, err: BaseException) -> RecordError:
        # Bad input, or a page that cannot fit the context at this hd_num: the same every time.
        final = isinstance(err, errors.InputError | errors.ContextOverflowError) and not isinstance(
            err, errors.URLFetchError
        )
        return cls(type=type(err).__name__, message=" ".join(str(err).split()), final=final)


class RecordTokens(BaseModel):
    """Token counts of the model call (``prompt`` includes ``image``)."""

    image: int = 0
    prompt: int = 0
    completion: int = 0


class RecordTimings(BaseModel):
    """Seconds spent on the page: rendering (CPU) and the model call's parts."""

    render_s: float = 0.0
    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    model_s: float = 0.0


class PageRecord(BaseModel):
    """One ingested page (or one image): the transcription and what produced it.

    ``text`` is the page's Markdown; it is empty when ``error`` is set. ``page`` is 1-based (1 for an
    image) and ``None`` only for a file that failed before its pages could be counted.
    """

    key: str
    source: str
    content_hash: str
    page: int | None
    page_count: int | None
    hd_num: int | None = None
    grid: str | None = None
    tokens: RecordTokens = Field(default_factory=RecordTokens)
    text: str = ""
    model: str
    finish_reason: str | None = None
    timings: RecordTimings = Field(default_factory=RecordTimings)
    error: RecordError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def done(self) -> bool:
        """A rerun skips this page: it succeeded, or its input is bad for good."""
        return self.error is None or self.error.final

    def sort_key(self) -> tuple[str, int]:
        return (self.source, self.page or 0)

    def content(self) -> dict[str, object]:
        """Everything but timings: what two runs over the same corpus must agree on."""
        return self.model_dump(exclude={"timings"})
