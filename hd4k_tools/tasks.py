"""The three tasks (read document, answer chart question, describe image) and free chat.

Each task is one prompt template, a default ``hd_num`` and generation settings taken from the authors'
evaluation where one exists, and a pydantic result carrying the answer with what produced it (hd_num,
tile plan, token usage, timings, model id, page number).

Sources for the prompts and settings (see docs/model.md §4):
- VQA prompt ``"Answer the question using a single word or phrase."`` + question, greedy, 3 beams,
  100 new tokens, image before the user turn, no system prompt: VLMEvalKit ``xcomposer2_4KHD.py``
  (``build_prompt`` / ``model_gen``), written by the 4KHD authors.
- hd_num per dataset in that evaluation: documents (DocVQA/InfoVQA/OCRBench) 55, charts and everything
  else 25, general images (MMBench/MM-Vet/MMMU) 16.
- ``"Illustrate the fine details present in the image"`` with 3 beams and greedy decoding: the
  InternLM-XComposer README example for this checkpoint.
There is no published transcription prompt; ours is marked as our own below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hd4k_tools.errors import InputError
from hd4k_tools.models.registry import Layout

TaskName = Literal["read_document", "answer_chart_question", "describe_image", "chat"]
DocumentOutput = Literal["markdown", "text"]
Detail = Literal["brief", "detailed"]


# ----------------------------------------------------------------------------------------------------
# Agent-facing argument schemas (what an LLM fills in when it calls a task as a tool)
# ----------------------------------------------------------------------------------------------------
_IMAGE_ARG_DESCRIPTION = (
    "The image to look at: a file path relative to the allowed folder (PNG, JPEG, WebP, TIFF, BMP, GIF"
    "{pdf}), or a reference like 'image://img-1' to an image from the conversation, or a 'data:' URL"
    "{urls}. Do not paste raw base64."
)
_HD_NUM_DESCRIPTION = (
    "Optional resolution budget: the maximum number of 336x336 tiles the image is cut into (1-100). "
    "Omit it for the task's default ({default}); raise it to read smaller text, lower it to save tokens."
)
# Largest hd_num a tool call may ask for (HD-100 fills the 16k context with one image).
MAX_TOOL_HD_NUM = 100


def _image_field(*, pdf: bool) -> Any:
    return Field(
        description=_IMAGE_ARG_DESCRIPTION.format(
            pdf=", or a PDF" if pdf else "", urls=", or an http(s) URL when URLs are enabled"
        ),
        min_length=1,
        max_length=8192,
    )


def _hd_num_field(default: int) -> Any:
    return Field(default=None, ge=1, le=MAX_TOOL_HD_NUM, description=_HD_NUM_DESCRIPTION.format(default=default))


@dataclass(frozen=True)
class TaskSpec:
    """One task, written once: every surface (HD4K, agent tools, both framework toolkits, CLI, MCP) reads it.

    ``name`` is also the name of the :class:`~hd4k_tools.hd4k.HD4K` method that runs it (and of the agent
    tool); ``args`` is the agent-facing argument schema (``None``: not offered as a tool); ``description``
    is what an LLM reads about the tool.
    """

    name: TaskName
    default_hd_num: int
    layout: Layout
    max_new_tokens: int
    num_beams: int
    description: str = ""
    args: type[BaseModel] | None = None


# Default hd_num per task, from the authors' evaluation (docs/model.md §1.10).
_HD_DOCUMENT, _HD_CHART, _HD_IMAGE, _HD_CHAT = 55, 25, 16, 25


class ReadDocumentArgs(BaseModel):
    """Arguments of the read-document tool."""

    model_config = ConfigDict(extra="forbid")

    image: str = _image_field(pdf=True)
    pages: str | None = Field(
        default=None,
        description="PDF pages to read, 1-based: '1', '2-4', '1,3,5'. Omit for all pages (up to the limit).",
        max_length=200,
    )
    hd_num: int | None = _hd_num_field(_HD_DOCUMENT)


class ChartQuestionArgs(BaseModel):
    """Arguments of the chart-question tool."""

    model_config = ConfigDict(extra="forbid")

    image: str = _image_field(pdf=False)
    question: str = Field(description="The question to answer about the chart.", min_length=1, max_length=2000)
    hd_num: int | None = _hd_num_field(_HD_CHART)


class DescribeImageArgs(BaseModel):
    """Arguments of the describe-image tool."""

    model_config = ConfigDict(extra="forbid")

    image: str = _image_field(pdf=False)
    detail: Detail = Field(
        default="detailed", description="'detailed' for a full description, 'brief' for one or two sentences."
    )
    hd_num: int | None = _hd_num_field(_HD_IMAGE)


TASKS: dict[str, TaskSpec] = {
    # Documents: hd 55 as for DocVQA-val/InfoVQA/OCRBench. Transcriptions are long, so one beam.
    "read_document": TaskSpec(
        "read_document",
        _HD_DOCUMENT,
        "eval",
        max_new_tokens=1024,
        num_beams=1,
        description=(
            "Read a document image or PDF at high resolution (InternLM-XComposer2-4KHD, up to 4K) and return "
            "its text as Markdown, page by page. Use it for scans, screenshots, forms, slides and small print."
        ),
        args=ReadDocumentArgs,
    ),
    # Charts: hd 25, VQA settings of the authors' evaluation (3 beams, 100 new tokens).
    "answer_chart_question": TaskSpec(
        "answer_chart_question",
        _HD_CHART,
        "eval",
        max_new_tokens=100,
        num_beams=3,
        description=(
            "Answer a question about a chart, plot, table image or infographic, reading its labels and values "
            "at high resolution. Returns a short answer (a word, number or phrase)."
        ),
        args=ChartQuestionArgs,
    ),
    # General images: hd 16; the README example decodes greedily with 3 beams.
    "describe_image": TaskSpec(
        "describe_image",
        _HD_IMAGE,
        "chat",
        max_new_tokens=512,
        num_beams=3,
        description="Describe an image (photo, screenshot, diagram) in detail or briefly, at high resolution.",
        args=DescribeImageArgs,
    ),
    # Free chat: not a tool (an agent asks questions through the three tools).
    "chat": TaskSpec("chat", _HD_CHAT, "chat", max_new_tokens=512, num_beams=1),
}


def tool_specs() -> dict[str, TaskSpec]:
    """The tasks offered to agents as tools, by tool name."""
    return {name: spec for name, spec in TASKS.items() if spec.args is not None}


VQA_PREFIX = "Answer the question using a single word or phrase."

# Our own prompts (no published transcription/table prompt exists for this checkpoint).
DOCUMENT_PROMPTS: dict[str, str] = {
    "markdown": (
        "Transcribe all the text in this document as Markdown, in reading order. Keep headings, "
        "lists and tables (as Markdown tables). Do not summarise or add anything."
    ),
    "text": "Transcribe all the text in this document as plain text, in reading order. Do not summarise.",
}
DESCRIBE_PROMPTS: dict[str, str] = {
    "detailed": "Illustrate the fine details present in the image",  # IXC README example prompt
    "brief": "Describe the image in one or two sentences.",
}
TABLE_PROMPT = (
    "Convert the chart into a data table in Markdown format. The first row is the header "
    "(the category label, then one column per data series); one row per category."
)


def document_prompt(output: str) -> str:
    """The transcription prompt for ``output`` ("markdown" or "text")."""
    try:
        return DOCUMENT_PROMPTS[output]
    except KeyError:
        raise InputError(f"output={output!r} is not supported; use 'markdown' or 'text'.") from None


def chart_prompt(question: str) -> str:
    """The authors' VQA prompt: the fixed prefix directly followed by the question (VLMEvalKit)."""
    question = question.strip()
    if not question:
        raise InputError("The chart question is empty; pass the question to answer about the chart.")
    return f"{VQA_PREFIX}{question}"


def describe_prompt(detail: str) -> str:
    """The description prompt for ``detail`` ("detailed" or "brief")."""
    if not isinstance(detail, str) or detail not in DESCRIBE_PROMPTS:
        raise InputError(f"detail={detail!r} is not supported; use 'detailed' or 'brief'.")
    return DESCRIBE_PROMPTS[detail]
