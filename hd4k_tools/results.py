"""What a task returns: pydantic results carrying the answer with what produced it (hd_num, tile plan,
token usage, timings, model id, page number), rendered as HTML in notebooks; and the chart-table parser."""

from __future__ import annotations

import base64
import html
import io
import re

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from hd4k_tools.errors import TableParseError
from hd4k_tools.zoom import DetailLoss


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------
class PlanSummary(BaseModel):
    """The HD-N plan of one image, as reported in results."""

    model_config = ConfigDict(frozen=True)

    hd_num: int
    rows: int
    cols: int
    num_tiles: int
    image_tokens: int
    input_size: tuple[int, int]
    padded_size: tuple[int, int]

    @property
    def grid(self) -> str:
        return f"{self.rows}x{self.cols}"

    @classmethod
    def from_plan(cls, plan: object) -> PlanSummary:
        """Build from a :class:`hd4k_tools.models.xcomposer2_4khd.tiling.HDPlan`."""
        return cls(
            hd_num=plan.hd_num,  # type: ignore[attr-defined]
            rows=plan.rows,  # type: ignore[attr-defined]
            cols=plan.cols,  # type: ignore[attr-defined]
            num_tiles=plan.num_tiles,  # type: ignore[attr-defined]
            image_tokens=plan.num_tokens,  # type: ignore[attr-defined]
            input_size=(plan.width, plan.height),  # type: ignore[attr-defined]
            padded_size=tuple(plan.padded_size),  # type: ignore[attr-defined]
        )


class Timings(BaseModel):
    """Where the time went, in seconds (``decode_tokens_per_s`` in tokens per second)."""

    load_s: float = 0.0
    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0
    vision_cache_hits: int = 0
    prefix_cache_hit: bool = False
    """The decoder K/V of the prompt up to the last image came from the prefix KV cache (the vision tower
    and that part of the prefill were skipped)."""


class Usage(BaseModel):
    """Token counts; ``prompt_tokens`` includes ``image_tokens``."""

    prompt_tokens: int = 0
    image_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TaskResult(BaseModel):
    """The answer of one model call and what produced it."""

    task: str
    text: str
    model: str
    hd_num: int | None = None
    plans: list[PlanSummary] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    timings: Timings = Field(default_factory=Timings)
    finish_reason: str = "stop"
    page: int | None = None
    source: str | None = None
    thumbnail: str | None = Field(default=None, exclude=True, repr=False)
    """A small JPEG data URL of the (first) image, for notebooks; not serialised."""
    warnings: list[str] = Field(default_factory=list)
    """E.g. that the device ran out of memory and ``hd_num`` was lowered (``plans`` show the one used)."""
    region: tuple[float, float, float, float] | None = None
    """The part of the page read (``[x0, y0, x1, y1]`` page fractions); ``None``: all of it. This is the box
    actually read: the requested region snapped outward to whole pixels of the page as rendered, so it may
    be a hair larger than the one asked for (``requested_region``)."""
    requested_region: tuple[float, float, float, float] | None = None
    """The region asked for (for a window of a page read in windows: the window as planned); ``None``: none."""
    detail: DetailLoss | None = None
    """How much the source was shrunk to fit the plan (source pixels per model pixel; for PDFs the render
    scale and the effective dpi); for a page read in windows, the window that lost the most."""
    windows: list[TaskResult] = Field(default_factory=list)
    """A page read in windows (``read_document(windows=...)``): each window's own result, in reading order;
    ``text`` is their merge."""

    @property
    def plan(self) -> PlanSummary | None:
        """The plan of the first image (most tasks have exactly one)."""
        return self.plans[0] if self.plans else None

    def __str__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        rows = [("task", self.task), ("model", self.model)]
        if self.page is not None:
            rows.append(("page", str(self.page)))
        for p in self.plans:
            rows.append(("plan", f"HD-{p.hd_num}: {p.grid} tiles + global, {p.image_tokens} image tokens"))
        if self.region is not None:
            rows.append(("region", "[" + ", ".join(f"{v:g}" for v in self.region) + "]"))
        if self.detail is not None:
            d = self.detail
            dpi = f", {d.effective_dpi:g} dpi effective" if d.effective_dpi is not None else ""
            rows.append(("detail", f"{d.scale:.2f} source px per model px{dpi}"))
        t = self.timings
        rows.append(
            (
                "timings",
                f"vision {t.vision_s:.2f} s · prefill {t.prefill_s:.2f} s · "
                f"decode {t.decode_s:.2f} s ({t.decode_tokens_per_s:.1f} tok/s)",
            )
        )
        rows.append(
            (
                "tokens",
                f"{self.usage.prompt_tokens} in ({self.usage.image_tokens} image) · {self.usage.completion_tokens} out",
            )
        )
        cells = "".join(
            f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
            f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
            for k, v in rows
        )
        answer = html.escape(self.text).replace("\n", "<br>")
        thumb = (
            f"<img src='{self.thumbnail}' style='float:left;max-width:160px;margin-right:10px' alt='input'>"
            if self.thumbnail
            else ""
        )
        return (
            f"<div class='hd4k-result' style='overflow:auto'>{thumb}"
            f"<div style='border-left:3px solid #4a7;padding:4px 8px;margin-bottom:6px'>{answer}</div>"
            f"<table style='font-size:smaller'>{cells}</table></div>"
        )


class ChartTable(BaseModel):
    """A chart's data as parsed from the model's Markdown table."""

    columns: list[str]
    rows: list[list[str]]

    def as_dicts(self) -> list[dict[str, str]]:
        """One dict per row, keyed by column name."""
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


class ChartResult(TaskResult):
    """Answer to a chart question, and the data table when ``extract_table=True``."""

    question: str = ""
    table: ChartTable | None = None

    def _repr_html_(self) -> str:
        parts = []
        if self.question:
            parts.append(f"<div><b>Q:</b> {html.escape(self.question)}</div>")
        parts.append(super()._repr_html_())
        if self.table is not None:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in self.table.columns)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.table.rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return "".join(parts)


class DocumentResult(BaseModel):
    """A transcribed document: one :class:`TaskResult` per page (one page for an image)."""

    source: str
    pages: list[TaskResult]

    @property
    def text(self) -> str:
        """All pages' text, separated by blank lines."""
        return "\n\n".join(p.text for p in self.pages)

    def __str__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        parts = [f"<h4>{html.escape(self.source)} — {len(self.pages)} page(s)</h4>"]
        parts.extend(p._repr_html_() for p in self.pages)
        return "".join(parts)


def thumbnail_data_url(image: Image.Image, size: int = 160) -> str:
    """A small JPEG data URL of ``image`` (for HTML display of results)."""
    thumb = image.copy()
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.convert("RGB").save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------------
# Table parsing for ``extract_table=True``
# ----------------------------------------------------------------------------------------------------
_SEPARATOR_CELL = re.compile(r"^:?-{2,}:?$")


def _split_row(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|"):
        line = line[:-1]
    return [cell.strip() for cell in line.split("|")]


def parse_table(text: str) -> ChartTable:
    """Parse the first Markdown table (or ``|``-separated block) in ``text``.

    Raises :class:`TableParseError` when there is no table with a header and at least one data row,
    or when rows have inconsistent widths.
    """
    lines = [ln for ln in text.splitlines() if ln.count("|") >= 1 and ln.strip()]
    if len(lines) < 2:
        raise TableParseError(
            "The model's answer is not a table (no '|'-separated rows found). "
            f"Answer was: {text[:200]!r}. Retry with a larger hd_num or ask a question instead."
        )
    rows = [_split_row(ln) for ln in lines]
    header, body = rows[0], rows[1:]
    if body and all(_SEPARATOR_CELL.match(c) for c in body[0] if c):
        body = body[1:]
    if not body:
        raise TableParseError(f"The model's table has a header but no data rows: {text[:200]!r}.")
    width = len(header)
    bad = [i for i, r in enumerate(body) if len(r) != width]
    if bad:
        raise TableParseError(
            f"The model's table has rows of different widths (header has {width} columns, "
            f"rows {bad[:5]} differ): {text[:200]!r}."
        )
    return ChartTable(columns=header, rows=body)
