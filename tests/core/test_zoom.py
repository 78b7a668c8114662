"""Regions, detail loss and windows (issue: look closer): crops pixel-exact, PDF regions re-rendered from the
vector page, window coverage and overlap merging, region validation on every surface."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from hd4k_tools import HD4K, AgentTools, ToolSettings
from hd4k_tools.errors import InputError, InvalidRegionError
from hd4k_tools.inputs.pdf import render_pages
from hd4k_tools.mcp.server import tool_definitions
from hd4k_tools.results import PlanSummary, TaskResult
from hd4k_tools.runtime.runner import GenerationRequest, RunnerResult, TextStream
from hd4k_tools.tasks import TASKS
from hd4k_tools.testing import pdf_file
from hd4k_tools.tiling import plan
from hd4k_tools.zoom import (
    DETAIL_LOSS_THRESHOLD,
    MAX_WINDOWS,
    WINDOW_OVERLAP,
    Region,
    check_region,
    crop_region,
    detail_loss,
    detail_note,
    merge_window_texts,
    plan_windows,
    region_box,
)


class ImageRunner:
    """Keeps each request's image; answers with the image size (so merged texts are predictable)."""

    model_id = "images"
    context_length = 16384

    def __init__(self) -> None:
        self.images: list[Image.Image] = []

    def count_text_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult:
        image = request.images[0]
        self.images.append(image)
        plans = [PlanSummary.from_plan(p) for p in request.plans()]
        return RunnerResult(text=f"{image.width}x{image.height}", model=self.model_id, plans=plans)

    def stream(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> TextStream:
        result = self.generate(request)
        return TextStream(iter([result.text]), [result], threading.Event())

    def close(self) -> None:
        pass


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _vector_pdf(width_pt: float, height_pt: float, *, strokes: bool = True) -> bytes:
    """A one-page PDF of vector content only (filled boxes, thin lines, 4-pt Helvetica text), written by
    hand; ``strokes=False`` leaves the lines unpainted (``n`` instead of ``S``)."""
    ops = ["0.2 0.4 0.8 rg"]
    for i in range(12):
        ops.append(f"{30 + i * 45} {40 + i * 30} 20 12 re f")
    ops.append("0 0 0 RG 0.3 w")
    for i in range(20):
        ops.append(f"10 {20 + i * 23.3:.1f} m {width_pt - 10} {30 + i * 21.7:.1f} l {'S' if strokes else 'n'}")
    ops.append("BT /F1 4 Tf 0 0 0 rg")
    for i in range(30):
        ops.append(f"1 0 0 1 {15 + (i % 5) * 100} {height_pt - 20 - i * 12} Tm (label {i} small print) Tj")
    ops.append("ET")
    return _pdf_bytes(f"/MediaBox [0 0 {width_pt} {height_pt}]", "\n".join(ops))


def _pdf_bytes(boxes: str, content: str, resources: str = "", objects: Sequence[bytes] = ()) -> bytes:
    """A one-page PDF: page ``boxes`` (``/MediaBox [...]``, ``/CropBox``, ``/Rotate``), the ``content``
    stream, Helvetica as ``/F1`` plus ``resources`` (entries of the resource dictionary) naming ``objects``
    (numbered from 6 on)."""
    stream = content.encode()
    bodies = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        (
            f"<< /Type /Page /Parent 2 0 R {boxes} /Resources << /Font << /F1 5 0 R >> {resources} >> "
            "/Contents 4 0 R >>"
        ).encode(),
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        *objects,
    ]
    return pdf_file(bodies)


def _stress_pdf(rotate: int = 0, cropbox: tuple[float, float, float, float] | None = None) -> bytes:
    """A page that hits every way a region's edge can cut content: strokes through a grid of centres at 16
    angles each (widths 0 = hairline to 2 pt, butt/round/square caps, some dashed), Bezier curves, filled
    triangles and boxes, an interpolated image, an axial shading in a clip, transparent fills, and 4-pt
    text, some of it rotated; optionally with ``/Rotate`` and a ``/CropBox`` offset on a larger MediaBox."""
    width, height = (700.0, 900.0) if cropbox else (612.0, 792.0)
    ops = ["0.2 0.4 0.8 rg"] + [f"{30 + i * 45} {40 + i * 30} 20 12 re f" for i in range(12)]
    ops.append("0.8 0.3 0.1 rg")
    for i in range(8):
        x, y = 20 + i * 70, 60 + i * 85
        ops.append(f"{x} {y} m {x + 180.3} {y + 37.7} l {x + 61.1} {y + 141.9} l h f")
    k = 0
    for cy in range(60, int(height), 90):
        for cx in range(50, int(width), 110):
            for angle in range(0, 180, 11):
                t, length = math.radians(angle + 0.37 * k), 300 + (k % 5) * 60
                dash = "[3 2] 0.7 d" if k % 7 == 3 else "[] 0 d"
                ends = f"{cx - length * math.cos(t):.3f} {cy - length * math.sin(t):.3f} m "
                ends += f"{cx + length * math.cos(t):.3f} {cy + length * math.sin(t):.3f} l S"
                width_pt = (0, 0.1, 0.25, 0.5, 1, 2)[k % 6]
                ops.append(
                    f"{k * 37 % 100 / 100:.2f} 0 {k * 53 % 100 / 100:.2f} RG {width_pt} w {k % 3} J {dash} {ends}"
                )
                k += 1
    ops.append("[] 0 d 0 0.5 0 RG 0.6 w")
    for i in range(15):
        x, y = 10 + i * 40, 30 + i * 50
        ops.append(f"{x} {y} m {x + 250} {y + 400} {x + 350} {y - 200} {x + 520} {y + 130} c S")
    ops.append(f"q 150.7 0 0 120.3 {width * 0.35:.2f} {height * 0.4:.2f} cm /Im1 Do Q")
    # A 4x4 image through a scaled Form XObject, 300 pt wide: far more upscaled than the one above.
    ops.append(f"q 3.75 0 0 3.75 {width * 0.45:.2f} {height * 0.05:.2f} cm /Fm1 Do Q")
    ops.append(f"q {width * 0.05:.2f} {height * 0.7:.2f} 260.5 90.25 re W n /Sh1 sh Q")
    ops.append("q /GS1 gs 0 0.6 0.3 rg 100 300 210.5 160.25 re f 0.9 0.9 0 rg 180 360 210 80 re f Q")
    ops.append("BT /F1 4 Tf 0 0 0 rg")
    ops += [
        f"1 0 0 1 {15 + (i % 5) * 110} {height - 20 - i * 18} Tm (label {i} small print 0123) Tj" for i in range(40)
    ]
    ops.append("0.7 0.7 -0.7 0.7 300 200 Tm /F1 9 Tf (rotated text crossing) Tj ET")
    pixels = bytes((i * 97 ^ i >> 3) % 256 for i in range(16 * 16 * 3))
    objects = [
        b"<< /Type /XObject /Subtype /Image /Width 16 /Height 16 /ColorSpace /DeviceRGB /BitsPerComponent 8 "
        b"/Interpolate true /Length %d >>\nstream\n" % len(pixels) + pixels + b"\nendstream",
        f"<< /ShadingType 2 /ColorSpace /DeviceRGB /Coords [{width * 0.05:.2f} 0 {width * 0.05 + 260.5:.2f} 0] "
        "/Function << /FunctionType 2 /Domain [0 1] /C0 [1 0 0] /C1 [0 0 1] /N 1 >> /Extend [true true] >>".encode(),
        b"<< /Type /ExtGState /ca 0.5 /CA 0.5 >>",
        b"<< /Type /XObject /Subtype /Form /BBox [0 0 100 100] /Matrix [2 0 0 2 0 0] /Resources "
        b"<< /XObject << /Im2 10 0 R >> >> /Length 28 >>\nstream\nq 40 0 0 30 0 0 cm /Im2 Do Q\nendstream",
        b"<< /Type /XObject /Subtype /Image /Width 4 /Height 4 /ColorSpace /DeviceRGB /BitsPerComponent 8 "
        b"/Interpolate true /Length 48 >>\nstream\n" + pixels[:48] + b"\nendstream",
    ]
    boxes = f"/MediaBox [0 0 {width} {height}]"
    boxes += f" /CropBox [{' '.join(map(str, cropbox))}]" if cropbox else ""
    boxes += f" /Rotate {rotate}" if rotate else ""
    resources = "/XObject << /Im1 6 0 R /Fm1 9 0 R >> /Shading << /Sh1 7 0 R >> /ExtGState << /GS1 8 0 R >>"
    return _pdf_bytes(boxes, "\n".join(ops), resources, objects)


# -- regions -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("region", "match"),
    [
        ([0.5, 0.5, 0.5, 0.9], "empty or inverted"),
        ([0.6, 0.1, 0.4, 0.9], "empty or inverted"),
        ([0.1, 0.9, 0.4, 0.2], "empty or inverted"),
        ([-0.1, 0, 0.5, 0.5], "outside the page"),
        ([0, 0, 1.2, 0.5], "outside the page"),
        ([0, 0, 0.5], "four numbers"),
        ([0, 0, float("nan"), 1], "numbers between 0 and 1"),
        ("0,0,half,1", "not four numbers"),
    ],
)
def test_bad_regions_are_typed_errors(region: object, match: str) -> None:
    with pytest.raises(InvalidRegionError, match=match):
        check_region(region)


def test_region_text_and_box() -> None:
    assert check_region("0, 0.25, 0.5 1") == (0.0, 0.25, 0.5, 1.0)
    assert region_box(1000, 800, (0.1, 0.1, 0.2, 0.2)) == (100, 80, 200, 160)
    assert region_box(10, 10, (0.0, 0.0, 0.01, 0.01)) == (0, 0, 1, 1)  # never empty


def test_crop_is_pixel_exact_against_a_manual_crop() -> None:
    image = _noise(1234, 987)
    region = (0.21, 0.33, 0.77, 0.9)
    left, top = int(np.floor(0.21 * 1234)), int(np.floor(0.33 * 987))
    right, bottom = int(np.ceil(0.77 * 1234)), int(np.ceil(0.9 * 987))
    manual = np.asarray(image)[top:bottom, left:right]
    assert np.array_equal(np.asarray(crop_region(image, region)), manual)
    # The model gets exactly these pixels, planned with the whole hd_num.
    runner = ImageRunner()
    result = HD4K(runner).describe_image(image, region=list(region), hd_num=9)
    assert np.array_equal(np.asarray(runner.images[-1]), manual)
    assert result.requested_region == region and result.hd_num == 9
    assert result.region == (left / 1234, top / 987, right / 1234, bottom / 987)  # the box read, snapped
    assert result.plan is not None and result.plan.input_size == (right - left, bottom - top)
    assert result.detail is not None and result.detail.source_size == (right - left, bottom - top)


def _region_vs_whole_page(data: bytes, region: Region, region_pixels: int) -> tuple[np.ndarray, float, bool]:
    """Per-pixel max |diff| between the region rendered alone and the whole page rendered at the same scale
    and cropped; the scale (dpi); whether the region's box was off the whole-pixel grid at that scale."""
    (zoomed,) = render_pages(data, dpi=72, region=region, region_pixels=region_pixels)
    (whole,) = render_pages(data, dpi=zoomed.dpi)
    width, height = whole.image.size
    box = region_box(width, height, region)
    expected = np.asarray(whole.image.crop(box), dtype=np.int16)
    got = np.asarray(zoomed.image, dtype=np.int16)
    assert got.shape == expected.shape
    fractional = any(
        abs(f * n - round(f * n)) > 1e-3 for f, n in zip(region, (width, height, width, height), strict=True)
    )
    return np.abs(got - expected).max(axis=2), zoomed.dpi, fractional


# Three regions (all off the whole-pixel grid at these scales: the box is snapped outward to whole pixels
# of the whole page at the region's scale), at two scales each.
_REGIONS = [(0.1, 0.2, 0.45, 0.5), (0.0165, 0.4521, 0.278, 0.651), (0.123, 0.0171, 0.6789, 0.3333)]


@pytest.mark.parametrize("region_pixels", [400_000, 2_000_000])
@pytest.mark.parametrize("region", _REGIONS)
def test_pdf_region_matches_the_whole_page_rendered_and_cropped(region: Region, region_pixels: int) -> None:
    pytest.importorskip("pypdfium2")
    diff, dpi, fractional = _region_vs_whole_page(_vector_pdf(612, 792), region, region_pixels)
    assert dpi > 72 * 2 and fractional  # rendered sharper than the page, not upscaled; box off the grid
    assert diff.max() == 0  # bit-identical: text, fills and the strokes the region's edges cut


# The strict check: regions off the pixel grid (inner, touching the page's edges, a sliver) on every kind
# of page, at two fractional scales; every pixel of the region equals the whole page's (the bound
# is 1 LSB; the render is exact).
_STRICT_REGIONS = [
    (0.1, 0.2, 0.45, 0.5),
    (0.0165, 0.4521, 0.278, 0.651),
    (0.3333, 0.61, 0.4141, 0.6667),
    (0.5, 0.5, 1.0, 1.0),
    (0.0, 0.0, 0.2718, 0.3141),
    (0.6, 0.0, 0.6037, 1.0),
    (0.65, 0.7, 0.7, 0.8),  # cuts the image drawn through a scaled Form XObject
]
_PAGES = {
    "plain": {},
    "rotate-90": {"rotate": 90},
    "rotate-180": {"rotate": 180},
    "rotate-270": {"rotate": 270},
    "cropbox-offset": {"cropbox": (37.3, 51.7, 649.3, 843.7)},
}


@pytest.mark.parametrize("page", list(_PAGES))
def test_pdf_region_of_any_page_is_bit_identical_to_the_whole_page(page: str) -> None:
    pytest.importorskip("pypdfium2")
    import pypdfium2

    data = _stress_pdf(**_PAGES[page])
    for dpi in (101.3, 187.9):
        (whole,) = render_pages(data, dpi=dpi)
        pixels = np.asarray(whole.image, dtype=np.int16)
        # The whole page itself is pypdfium2's own rendering, pixel for pixel (a CropBox offset: within 2
        # LSB, float rounding of the matrix's translation; docs/decisions.md).
        document = pypdfium2.PdfDocument(data)
        standard = np.asarray(document[0].render(scale=dpi / 72).to_pil().convert("RGB"), dtype=np.int16)
        document.close()
        assert np.abs(standard - pixels).max() <= (2 if "cropbox" in page else 0)
        for region in _STRICT_REGIONS:
            (zoomed,) = render_pages(data, dpi=dpi, region=region)
            left, top, right, bottom = region_box(whole.image.width, whole.image.height, region)
            diff = np.abs(np.asarray(zoomed.image, dtype=np.int16) - pixels[top:bottom, left:right])
            assert diff.max() == 0, (page, dpi, region, int(diff.max()), float((diff > 1).mean()))


def test_pdf_region_falls_back_to_a_clipped_render_when_the_page_bitmap_cannot_be_mapped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("pypdfium2")
    from hd4k_tools.inputs import pdf

    data, region = _stress_pdf(), (0.1, 0.2, 0.45, 0.5)
    (whole,) = render_pages(data, dpi=187.9)
    expected = np.asarray(whole.image.crop(region_box(whole.image.width, whole.image.height, region)), np.int16)
    monkeypatch.setattr(pdf, "_lazy_buffer", lambda size: None)  # no address space for a whole-page bitmap
    (clipped,) = render_pages(data, dpi=187.9, region=region)
    diff = np.abs(np.asarray(clipped.image, dtype=np.int16) - expected).max(axis=2)
    # The same pixel grid, but strokes cut at the region's edge differ by a few LSB (what the exact render
    # fixes: this is the check that the strict test above would fail without it).
    assert 1 < diff.max() <= 8 and (diff <= 1).mean() > 0.99


def test_pdf_region_is_bounded_by_the_pixel_limit() -> None:
    pytest.importorskip("pypdfium2")
    from hd4k_tools.inputs.policy import ImagePolicy

    # A tiny max_pixels caps the scale instead of failing.
    policy = ImagePolicy(max_pixels=500_000)
    (capped,) = render_pages(_vector_pdf(612, 792), dpi=72, region=_REGIONS[0], region_pixels=10**9, policy=policy)
    assert capped.image.width * capped.image.height <= 500_000


def test_pdf_region_through_read_document_reports_render_scale_and_effective_dpi() -> None:
    pytest.importorskip("pypdfium2")
    runner = ImageRunner()
    doc = HD4K(runner).read_document(_vector_pdf(612, 792), region=[0, 0, 0.5, 0.5], hd_num=4, dpi=100)
    page = doc.pages[0]
    assert page.requested_region == (0.0, 0.0, 0.5, 0.5)
    assert page.region is not None and page.region[:2] == (0.0, 0.0) and min(page.region[2:]) >= 0.5
    assert page.detail is not None and page.detail.render_scale is not None and page.detail.render_scale > 100 / 72
    assert page.detail.effective_dpi is not None


def test_results_report_the_box_read_snapped_and_the_box_asked(tmp_path: Path) -> None:
    from hd4k_tools.mcp.server import ToolOutput

    image, asked = _noise(1234, 987), (0.21, 0.33, 0.77, 0.9)
    image.save(tmp_path / "a.png")
    read = (259 / 1234, 325 / 987, 951 / 1234, 889 / 987)  # floor/ceil of the fractions on the pixel grid
    result = HD4K(ImageRunner()).describe_image(image, region=list(asked))
    assert result.region == read and result.requested_region == asked
    # Asking again for the box reported reads the same pixels (the snapped box is on the grid).
    assert region_box(1234, 987, read) == (259, 325, 951, 889)
    assert HD4K(ImageRunner()).describe_image(image, region=list(read)).region == read
    assert result.detail is not None and result.detail.region == read
    # The MCP structured JSON and the facade's JSON carry both; no region: both null.
    tools = AgentTools(HD4K(ImageRunner()), ToolSettings(allowed_root=tmp_path))
    answer = tools.invoke("describe_image", {"image": "a.png", "region": list(asked)})
    page = ToolOutput.from_answer("describe_image", answer, None).model_dump(mode="json")["pages"][0]
    assert page["region"] == list(read) and page["requested_region"] == list(asked)
    assert json.loads(result.model_dump_json())["region"] == list(read)
    whole = HD4K(ImageRunner()).describe_image(image)
    assert whole.region is None and whole.requested_region is None


def test_the_detail_line_suggests_a_cell_of_the_box_read(tmp_path: Path) -> None:
    Image.new("RGB", (9001, 6007), "white").save(tmp_path / "big.png")
    tools = AgentTools(HD4K(ImageRunner()), ToolSettings(allowed_root=tmp_path, max_pixels=10**8))
    answer = tools.invoke("describe_image", {"image": "big.png", "region": [0.1001, 0.2002, 0.9, 0.9]})
    result = answer.result
    assert isinstance(result, TaskResult) and result.detail is not None
    assert result.region is not None and result.region[:2] == (901 / 9001, 1202 / 6007)  # 901.0001, 1202.6
    # The one line the agent reads is computed from the box read (its top-left cell), not the one asked.
    assert result.detail.region == result.region
    assert answer.content.splitlines()[-1] == detail_note(result.detail, what="the region")


def test_pdf_region_and_windows_report_the_pixels_they_read() -> None:
    pytest.importorskip("pypdfium2")
    asked = (0.1, 0.2, 0.45, 0.5)
    page = HD4K(ImageRunner()).read_document(_vector_pdf(612, 792), region=list(asked), hd_num=4).pages[0]
    assert page.requested_region == asked and page.region != asked
    assert page.detail is not None and page.detail.render_scale is not None
    # The box read is whole pixels of the whole page at the render scale, and holds the box asked.
    scale = page.detail.render_scale
    full = (math.ceil(612 * scale), math.ceil(792 * scale))
    x0, y0, x1, y1 = page.region
    assert all(abs(v * n - round(v * n)) < 1e-6 for v, n in zip(page.region, full * 2, strict=True))
    assert x0 <= asked[0] and y0 <= asked[1] and x1 >= asked[2] and y1 >= asked[3]
    # Windows: each reports its own pixels on the page, and the window as planned.
    runner = ImageRunner()
    image = _noise(3000, 2000)
    doc = HD4K(runner).read_document(image, region=[0.1, 0.1, 0.9, 0.9], windows=4, hd_num=4)
    windows = doc.pages[0].windows
    assert len(windows) == 4 and doc.pages[0].requested_region == (0.1, 0.1, 0.9, 0.9)
    for window, seen in zip(windows, runner.images, strict=True):
        assert window.region is not None and window.requested_region is not None
        box = region_box(3000, 2000, window.region)
        assert np.array_equal(np.asarray(image.crop(box)), np.asarray(seen))


# -- detail loss -------------------------------------------------------------------------------------
def test_detail_loss_and_its_one_line() -> None:
    big = detail_loss(plan(9933, 14043, 65))
    assert big.lost and big.scale > 4
    note = detail_note(big, what="page 1")
    assert note is not None and "\n" not in note and "region=[0, 0, 0.25, 0.25]" in note
    small = detail_loss(plan(1000, 800, 16))
    assert not small.lost and detail_note(small) is None
    assert small.scale <= DETAIL_LOSS_THRESHOLD


def test_the_agent_reads_the_detail_line_only_when_detail_was_lost(tmp_path: Path) -> None:
    Image.new("RGB", (9000, 6000), "white").save(tmp_path / "big.png")
    Image.new("RGB", (800, 600), "white").save(tmp_path / "small.png")
    tools = AgentTools(HD4K(ImageRunner()), ToolSettings(allowed_root=tmp_path, max_pixels=10**8))
    big = tools.invoke("describe_image", {"image": "big.png"}).content
    lines = big.splitlines()
    assert lines[0] == "9000x6000" and sum(line.startswith("[detail]") for line in lines) == 1
    assert "region=" in lines[-1]
    assert "[detail]" not in tools.invoke("describe_image", {"image": "small.png"}).content
    zoomed = tools.invoke("describe_image", {"image": "big.png", "region": [0, 0, 0.25, 0.25]})
    assert zoomed.content.splitlines()[0] == "2250x1500"


# -- region on every surface ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [[0.5, 0.5, 0.5, 0.6], [0.9, 0, 0.1, 1], [0, 0, 2, 1], [0, 0, 1]])
def test_tools_and_mcp_refuse_bad_regions(bad: list[float], tmp_path: Path) -> None:
    Image.new("RGB", (100, 100), "white").save(tmp_path / "a.png")
    tools = AgentTools(HD4K(ImageRunner()), ToolSettings(allowed_root=tmp_path))
    for name in ("read_document", "answer_chart_question", "describe_image"):
        args = {"image": "a.png", "region": bad, **({"question": "q"} if name == "answer_chart_question" else {})}
        with pytest.raises(InputError, match="region"):
            tools.invoke(name, args)
    for tool in tool_definitions(tools):
        region = tool.input_schema["properties"]["region"]
        assert region["anyOf"][0]["minItems"] == 4 and region["anyOf"][0]["items"]["maximum"] == 1


def test_facade_refuses_bad_regions_before_reading() -> None:
    hd = HD4K(ImageRunner())
    with pytest.raises(InvalidRegionError):
        hd.describe_image("no-such-file.png", region=[0.5, 0.5, 0.2, 0.2])
    with pytest.raises(InputError, match="windows="):
        hd.describe_image(Image.new("RGB", (10, 10)), windows=2)  # type: ignore[call-arg]


def test_every_tool_schema_has_region() -> None:
    for spec in TASKS.tools().values():
        assert spec.args is not None and "region" in spec.args.model_fields


# -- windows -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "hd_num"), [((14000, 9900), 55), ((9933, 14043), 65), ((8000, 5600), 55), ((8000, 5600), 25)]
)
def test_windows_cover_the_page_and_overlap(size: tuple[int, int], hd_num: int) -> None:
    width, height = size
    windows = plan_windows(width, height, hd_num, "auto")
    assert len(windows) > 1
    covered = np.zeros((-(-height // 10), -(-width // 10)), dtype=bool)
    for w in windows:
        left, top, right, bottom = w.box
        covered[top // 10 : (bottom + 9) // 10, left // 10 : (right + 9) // 10] = True
        assert detail_loss(plan(*w.size, hd_num)).scale <= DETAIL_LOSS_THRESHOLD
    assert covered.all()
    # Reading order: row by row, left to right; neighbours overlap.
    assert [(w.row, w.col) for w in windows] == sorted((w.row, w.col) for w in windows)
    by_place = {(w.row, w.col): w for w in windows}
    for (r, c), w in by_place.items():
        if (r + 1, c) in by_place:
            below = by_place[(r + 1, c)]
            assert below.box[1] < w.box[3]
            assert (w.box[3] - below.box[1]) >= 0.9 * WINDOW_OVERLAP * (w.box[3] - w.box[1]) / 2
        if (r, c + 1) in by_place:
            assert by_place[(r, c + 1)].box[0] < w.box[2]


def test_small_page_is_one_window_and_n_windows_are_n() -> None:
    assert len(plan_windows(1500, 1000, 55, "auto")) == 1
    assert len(plan_windows(4000, 3000, 55, 4)) == 4
    assert len(plan_windows(4000, 3000, 55, "6")) == 6
    with pytest.raises(InvalidRegionError, match="windows"):
        plan_windows(4000, 3000, 55, 0)
    # Beyond MAX_WINDOWS windows' reach (14k px at HD-25): as many windows as allowed.
    assert len(plan_windows(14000, 9900, 25, "auto")) == MAX_WINDOWS


def test_merge_removes_the_overlap_lines() -> None:
    top = "Title\nline one\nline two\nline three"
    bottom = "line two\nline three\nline four"
    assert merge_window_texts([top, bottom]) == "Title\nline one\nline two\nline three\nline four"


def test_merge_keeps_a_line_cut_by_the_window_edge_once_whole() -> None:
    # The top window's last line is cut at its bottom edge; the next window's first line at its top edge.
    top = "Invoice 2024\nTotal due: 1,234.00 EUR\nPayable within 30 d"
    bottom = "e: 1,234.00 EUR\nPayable within 30 days of receipt\nThank you"
    assert merge_window_texts([top, bottom]) == (
        "Invoice 2024\nTotal due: 1,234.00 EUR\nPayable within 30 days of receipt\nThank you"
    )


def test_merge_joins_a_line_cut_by_a_vertical_edge() -> None:
    assert merge_window_texts(["The quick brown fo", "brown fox jumps over"]) == "The quick brown fox jumps over"


def test_merge_without_overlap_keeps_everything() -> None:
    assert merge_window_texts(["alpha\nbeta", "gamma\ndelta", ""]) == "alpha\nbeta\ngamma\ndelta"


def test_read_document_in_windows_batches_and_keeps_each_window() -> None:
    image = Image.new("RGB", (8000, 5600), "white")
    ImageDraw.Draw(image).text((10, 10), "tiny", fill="black")
    runner = ImageRunner()
    page = HD4K(runner).read_document(image, windows="auto", hd_num=55).pages[0]
    assert len(page.windows) == len(runner.images) == len(plan_windows(8000, 5600, 55, "auto")) > 1
    planned = plan_windows(8000, 5600, 55, "auto")
    # Each window reports the window as planned, and the box it read: exactly its pixels on the page.
    assert [w.requested_region for w in page.windows] == [w.region for w in planned]
    assert [region_box(8000, 5600, w.region) for w in page.windows] == [w.box for w in planned]  # type: ignore[arg-type]
    assert page.detail is not None and not page.detail.lost
    assert page.usage.image_tokens == sum(w.usage.image_tokens for w in page.windows)
    assert len(page.plans) == len(page.windows)
    # The page's text is the merge of the windows' texts.
    assert page.text == merge_window_texts([w.text for w in page.windows])
    # A page that keeps its detail is read whole.
    small = HD4K(ImageRunner()).read_document(Image.new("RGB", (1200, 900)), windows="auto").pages[0]
    assert small.windows == []


def test_server_takes_region_alongside_hd_num() -> None:
    from fastapi.testclient import TestClient

    from hd4k_tools.inputs.images import to_data_url
    from hd4k_tools.serve.app import create_app

    runner = ImageRunner()
    client = TestClient(create_app(runner, default_hd_num=9), raise_server_exceptions=False)
    image = _noise(800, 600)
    content = [{"type": "image_url", "image_url": {"url": to_data_url(image)}}, {"type": "text", "text": "?"}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "hd_num": 4}
    ok = client.post("/v1/chat/completions", json={**body, "region": [0, 0, 0.5, 0.25]})
    assert ok.status_code == 200, ok.text
    assert np.array_equal(np.asarray(runner.images[-1]), np.asarray(image)[:150, :400])
    assert ok.json()["hd4k"]["regions"] == [[0.0, 0.0, 0.5, 0.25]]
    # The response states the box read, snapped outward to whole pixels (here 80.08 -> 80, 149.94 -> 150).
    snapped = client.post("/v1/chat/completions", json={**body, "region": [0.1001, 0, 0.5, 0.2499]})
    assert snapped.json()["hd4k"]["regions"] == [[0.1, 0.0, 0.5, 0.25]]
    assert np.array_equal(np.asarray(runner.images[-1]), np.asarray(image)[:150, 80:400])
    assert "regions" not in client.post("/v1/chat/completions", json=body).json()["hd4k"]
    streamed = client.post("/v1/chat/completions", json={**body, "region": [0.1001, 0, 0.5, 0.2499], "stream": True})
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert [c["hd4k"]["regions"] for c in chunks if "hd4k" in c] == [[[0.1, 0.0, 0.5, 0.25]]]
    for bad in ([0.5, 0, 0.5, 1], [0.9, 0, 0.1, 1], [0, 0, 1.5, 1], [[0, 0, 1, 1], [0, 0, 1, 1]]):
        refused = client.post("/v1/chat/completions", json={**body, "region": bad})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "region"


def test_cli_region_and_windows_are_checked_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hd4k_tools.cli.main import build_parser, main

    Image.new("RGB", (100, 100), "white").save(tmp_path / "a.png")
    args = build_parser().parse_args(["read", str(tmp_path / "a.png"), "--region", "0,0,.5,.5", "--windows", "auto"])
    assert (args.region, args.windows) == ("0,0,.5,.5", "auto")
    missing = str(tmp_path / "no-model")
    assert main(["describe", str(tmp_path / "a.png"), "--region", "0.5,0,0.2,1", "--model", missing]) == 2
    assert "empty or inverted" in capsys.readouterr().err
    assert main(["read", str(tmp_path / "a.png"), "--windows", "0", "--model", missing]) == 2
    assert "windows must be" in capsys.readouterr().err


def test_tiles_windows_preview(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from hd4k_tools.cli.main import main

    Image.new("RGB", (9000, 6000), "white").save(tmp_path / "big.png")
    out = tmp_path / "prev.png"
    assert main(["tiles", str(tmp_path / "big.png"), "--windows", "auto", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    windows = plan_windows(9000, 6000, 55, "auto")
    assert f"Read in {len(windows)} window(s) at HD-55" in text and out.exists()
    assert main(["tiles", str(tmp_path / "big.png"), "--windows", "4", "--json", "--no-preview"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert len(payload["windows"]) == 4 and payload["detail"]["scale_x"] > DETAIL_LOSS_THRESHOLD
    assert {"region", "box", "grid", "num_tokens", "detail"} <= set(payload["windows"][0])


def test_both_frameworks_take_and_validate_region(tmp_path: Path) -> None:
    langchain_hd4k = pytest.importorskip("langchain_hd4k")
    llama_tools = pytest.importorskip("llama_index.tools.hd4k")
    Image.new("RGB", (800, 400), "white").save(tmp_path / "a.png")
    settings = ToolSettings(allowed_root=tmp_path)
    lc = {t.name: t for t in langchain_hd4k.HD4KToolkit(HD4K(ImageRunner()), settings=settings).get_tools()}
    assert lc["describe_image"].invoke({"image": "a.png", "region": [0, 0, 0.5, 0.5]}) == "400x200"
    assert "empty or inverted" in lc["describe_image"].invoke({"image": "a.png", "region": [0.5, 0, 0.5, 1]})
    li = {t.metadata.name: t for t in llama_tools.HD4KToolSpec(HD4K(ImageRunner()), settings).to_tool_list()}
    assert li["read_document"].call(image="a.png", region=[0.5, 0.5, 1, 1]).content == "400x200"
    refused = li["answer_chart_question"].call(image="a.png", question="q", region=[0, 0, 1, 2])
    assert refused.is_error and "region" in refused.content
    schema = li["describe_image"].metadata.get_parameters_dict()["properties"]["region"]
    assert schema["anyOf"][0]["maxItems"] == 4


def test_cli_region_and_windows_reach_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hd4k_tools.cli import model_commands
    from hd4k_tools.cli.main import main

    _noise(800, 600).save(tmp_path / "a.png")
    monkeypatch.setattr(model_commands, "_open", lambda args: HD4K(ImageRunner()))
    monkeypatch.setattr(model_commands, "_check_device", lambda args: None)
    monkeypatch.setattr(model_commands, "check_before_load", lambda *a, **k: None)  # a scripted facade
    assert main(["describe", str(tmp_path / "a.png"), "--region", "0,0,0.5,0.5"]) == 0
    assert capsys.readouterr().out.strip() == "400x300"
    assert main(["read", str(tmp_path / "a.png"), "--windows", "2", "--json"]) == 0
    page = json.loads(capsys.readouterr().out)["pages"][0]
    assert len(page["windows"]) == 2 and page["detail"] is not None
