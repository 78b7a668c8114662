"""The record of one ingested page, its resume key, its Arrow schema, and the typed error it carries
when it failed.

One record per PDF page or image. A record is *done* when it holds a transcription or an error that a
rerun would only repeat (the input itself is bad: corrupt, encrypted, oversized); any other error
(the engine failed, the source changed, the run was cancelled) is retried by the next run over the same
output folder.

The record's columns are declared once, here (:data:`RECORD_COLUMNS`); :func:`record_arrow_schema` turns
them into the Arrow schema every Parquet shard is written with (local and Ray writers alike), so the
shards of every run read as one table. Change a column and bump :data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hd4k_tools import errors
from hd4k_tools.runtime.engines import ENGINES as ENGINE_REGISTRY
from hd4k_tools.tasks import TASKS, document_prompt

#: Version of the record schema and output layout (``OUT/jsonl``, ``OUT/parquet``), in the manifest.
SCHEMA_VERSION = 2
RECORD_FORMAT = f"hd4k-ingest/{SCHEMA_VERSION}"
TASK = TASKS["read_document"]
#: An engine name: one of :data:`ENGINES`.
Engine = str
# The in-process engines of the registry (hd4k_tools.runtime.engines), and a remote OpenAI-compatible server.
ENGINES: tuple[str, ...] = (*ENGINE_REGISTRY, "remote")


def ingest_prompt(output: str = "markdown") -> str:
    """The transcription prompt every page gets (the ``read_document`` task's)."""
    return document_prompt(output)


def requested_hd_num(hd_num: int | str | None) -> str:
    """``hd_num`` as it enters the resume key: the task default when ``None``, ``"auto"`` as such."""
    if hd_num is None:
        return str(TASK.default_hd_num)
    return str(hd_num).strip().lower()


def record_key(content_hash: str, page: int | None, hd_num: int | str | None, model_id: str, prompt: str) -> str:
    """The resume key: a page is done once for each (content, page, hd_num, model identity, prompt).

    ``page`` is 1-based, ``None`` for a file that failed before its pages were known. ``model_id`` is the
    canonical identity of the checkpoint (:func:`hd4k_tools.ingestion.work.model_identity`), not the
    string typed, so one checkpoint named two ways keys its pages once.
    """
    parts = [content_hash, "-" if page is None else str(page), requested_hd_num(hd_num), model_id, prompt]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()


def display_path(path: str) -> tuple[str, str | None]:
    """``(source, source_bytes)`` of a file system path, as a record stores it.

    A name that is valid UTF-8 is stored as it is and ``source_bytes`` is ``None``. Any other name (bytes
    that are not UTF-8, which Python carries as lone surrogates) is stored with each such byte written
    ``\\xNN`` -- readable, and valid in JSON and Arrow -- and ``source_bytes`` holds the exact bytes of the
    path in base64, so the record names the file losslessly (:func:`source_path` gives the path back).
    """
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(path)
        return raw.decode("utf-8", "backslashreplace"), base64.b64encode(raw).decode("ascii")
    return path, None


def printable(text: str) -> str:
    """``text`` with the bytes of non-UTF-8 file names (lone surrogates) written ``\\xNN``, as
    :func:`display_path` does: valid in JSON and Arrow."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text


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
        return cls(type=type(err).__name__, message=printable(" ".join(str(err).split())), final=final)


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
    image) and ``None`` only for a file that failed before its pages could be counted. ``source`` is the
    absolute path as given (symlinks not resolved); see :func:`display_path` for names that are not UTF-8.
    ``model`` is the model as given, ``model_id`` its canonical identity (what the resume key uses).
    """

    key: str
    source: str
    source_bytes: str | None = None
    content_hash: str
    page: int | None
    page_count: int | None
    hd_num: int | None = None
    grid: str | None = None
    tokens: RecordTokens = Field(default_factory=RecordTokens)
    text: str = ""
    model: str
    model_id: str = ""
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

    def source_path(self) -> str:
        """The file system path of the source (exact, also for names that are not UTF-8)."""
        if self.source_bytes is None:
            return self.source
        return os.fsdecode(base64.b64decode(self.source_bytes))

    def sort_key(self) -> tuple[str, int]:
        return (self.source, self.page or 0)

    def content(self) -> dict[str, object]:
        """Everything but timings: what two runs over the same corpus must agree on."""
        return self.model_dump(exclude={"timings"})


# The Arrow columns of a record, declared once: (name, type), where a type is an Arrow type name or a
# list of (name, type) for a struct. Every column may be null except the key, source and model.
RECORD_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("key", "string"),
    ("source", "string"),
    ("source_bytes", "string"),
    ("content_hash", "string"),
    ("page", "int64"),
    ("page_count", "int64"),
    ("hd_num", "int64"),
    ("grid", "string"),
    ("tokens", (("image", "int64"), ("prompt", "int64"), ("completion", "int64"))),
    ("text", "string"),
    ("model", "string"),
    ("model_id", "string"),
    ("finish_reason", "string"),
    (
        "timings",
        (
            ("render_s", "float64"),
            ("vision_s", "float64"),
            ("prefill_s", "float64"),
            ("decode_s", "float64"),
            ("model_s", "float64"),
        ),
    ),
    ("error", (("type", "string"), ("message", "string"), ("final", "bool_"))),
)
_REQUIRED = frozenset({"key", "source", "content_hash", "model"})


def record_arrow_schema() -> Any:
    """The ``pyarrow.Schema`` of every Parquet shard (schema version in its metadata).

    Raises:
        ImportError: pyarrow is not installed.
    """
    import pyarrow as pa

    def arrow_type(spec: Any) -> Any:
        if isinstance(spec, str):
            return getattr(pa, spec)()
        return pa.struct([pa.field(name, arrow_type(sub)) for name, sub in spec])

    fields = [pa.field(name, arrow_type(spec), nullable=name not in _REQUIRED) for name, spec in RECORD_COLUMNS]
    return pa.schema(fields, metadata={"hd4k-ingest-schema": str(SCHEMA_VERSION)})
