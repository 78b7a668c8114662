"""HD-N dynamic tiling of InternLM-XComposer2-4KHD: the plan, the padded canvas and the model inputs.

The arithmetic mirrors the reference ``HD_transform``/``padding_336`` exactly, Python float semantics
included (docs/model.md §1); the tile split, the global view and the token count
follow the vision tower (§2). Everything here is deterministic and free of global state.

Pipeline for one image of ``W×H`` pixels and a budget ``hd_num``::

    plan_images(images, hd_num, ...) -> HDPlans (the one planner: hd_num, "auto" or None -> one plan per image)
    plan(W, H, hd_num)               -> HDPlan  (pure arithmetic, no pixels)
    hd_transform(image, hd_num)      -> PIL canvas  (resized + white-padded, sides multiples of 336)
    to_model_inputs(image, plan)     -> ModelInputs (normalised tiles [R*C,3,336,336] + global view [1,3,336,336])
    (draw_plan, the preview for people, is in preview.py)

``torch`` is imported only by :func:`to_model_inputs`, so planning (and the ``hd4k tiles`` command)
stays cheap.
"""

from __future__ import annotations

import math
import operator
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias

import numpy as np
import PIL
from PIL import Image

from hd4k_tools.errors import ContextOverflowError, InputError, InvalidHDNumError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "HD_COMPARISON",
    "MAX_AUTO_HD_NUM",
    "MAX_TILES",
    "PAD_WHITE",
    "TEXT_MARGIN",
    "TILE",
    "HDNum",
    "HDPlan",
    "ModelInputs",
    "as_rgb",
    "auto_hd_num",
    "check_hd_num",
    "hd_transform",
    "image_tokens",
    "plan",
    "plan_for_image",
    "plan_images",
    "resolve_hd_num",
    "to_model_inputs",
]

#: Side of one ViT crop in pixels (CLIP ViT-L/14-336; docs/model.md §1, §2).
TILE = 336
#: CLIP normalisation constants used by the reference ``vis_processor`` (docs/model.md §1.9).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
#: hd_num values people usually compare (16: MMMU-style, 25: default, 55: documents; docs/model.md §4).
HD_COMPARISON: tuple[int, ...] = (9, 16, 25, 55)
#: hd_num="auto" never goes past the largest budget the authors evaluated (DocVQA/InfoVQA test, HD-65,
#: docs/model.md §1.10): the context would allow HD-100 for one page, but nothing shows the model reads better
#: there. The one cap of "auto": :func:`plan_images`, :func:`auto_hd_num` and :func:`resolve_hd_num` share it.
MAX_AUTO_HD_NUM = 65
#: Text tokens :func:`plan_images` reserves when its caller does not give the prompt's own count (a public
#: caller with no prompt at hand); every request path of the library counts the prompt instead.
TEXT_MARGIN = 256
#: Largest tile grid the pixel functions build. A plan is pure arithmetic and accepts any hd_num, but a
#: canvas of more tiles than this (HD-400 is ~62k image tokens, four times the model's 16k context) is
#: almost certainly a mistake that would only exhaust memory.
MAX_TILES = 400

HDNum: TypeAlias = int | Literal["auto"]

PAD_WHITE = (255, 255, 255)


# ----------------------------------------------------------------------------------------------------
# Plan: pure arithmetic
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HDPlan:
    """How one ``width×height`` image is resized, padded and cut into 336-px tiles at ``hd_num``.

    Sizes are ``(width, height)`` in the image's own orientation. ``padding`` is
    ``(left, top, right, bottom)``: top/bottom for landscape and square inputs, left/right for
    portrait ones (which the reference computes transposed). ``clamped`` is True when the reference
    would crash because the resized short side is 0 px (see :func:`plan`).
    """

    width: int
    height: int
    hd_num: int
    transposed: bool
    scale: int
    resized_size: tuple[int, int]
    padded_size: tuple[int, int]
    padding: tuple[int, int, int, int]
    rows: int
    cols: int
    num_tiles: int
    num_tokens: int
    clamped: bool

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def grid(self) -> str:
        """``"rows×cols"``, e.g. ``"5×11"``."""
        return f"{self.rows}×{self.cols}"

    def summary(self) -> str:
        """One line, e.g. ``HD-55: 5×11 tiles + global view · 8137 image tokens · 3840×1600 → 3696×1680``."""
        return (
            f"HD-{self.hd_num}: {self.grid} tiles + global view · {self.num_tokens} image tokens · "
            f"{self.width}×{self.height} → {self.padded_size[0]}×{self.padded_size[1]}"
        )


def image_tokens(rows: int, cols: int) -> int:
    """Number of LLM tokens the vision tower emits for a ``rows×cols`` tile grid.

    ``(rows*cols + 1)*144 + 1 + (rows + 1)*12`` (docs/model.md §2, asserted in the reference ``build_mlp.py``):
    144 merged tokens per crop (the tiles plus the global view), 12 ``sub_GN`` newlines per row of
    crops (``rows`` tile rows plus the global view's), and one ``glb_GN`` separator. Newlines follow
    rows, so a portrait grid costs more than its landscape transpose.
    """
    return (rows * cols + 1) * 144 + 1 + (rows + 1) * 12


def _as_int(value: object) -> int | None:
    """``value`` as an int if it is an integer (int, numpy integer), else None.

    bool is refused (True as a tile budget or a size is a bug, not a 1), and so are floats and strings,
    even integral ones: an hd_num of 2.0 or "55" signals a caller that should be fixed.
    """
    if isinstance(value, bool | float | str | bytes):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_hd_num(hd_num: object) -> int:
    value = _as_int(hd_num)
    if value is None:
        raise InvalidHDNumError(f"hd_num must be a positive integer (or 'auto' with max_tokens), got {hd_num!r}.")
    if value < 1:
        raise InvalidHDNumError(
            f"hd_num must be at least 1 (it is the maximum number of 336-px tiles), got {value}; "
            "typical values are 9, 16, 25 (default) and 55 (documents)."
        )
    return value


def _check_side(name: str, value: object) -> int:
    side = _as_int(value)
    if side is None:
        raise InputError(f"image {name} must be a positive integer number of pixels, got {value!r}.")
    if side < 1:
        raise InputError(f"image {name} must be at least 1 pixel, got {side}.")
    return side


def _scale(ratio: float, hd_num: int) -> int:
    """Largest ``s >= 1`` with ``s * ceil(s / ratio) <= hd_num`` (docs/model.md §1.3).

    The reference finds it with ``while scale * np.ceil(scale / ratio) <= hd_num: scale += 1`` and then
    ``scale -= 1``. ``f(s) = s * ceil(s / ratio)`` is strictly increasing in ``s`` (``s / ratio`` is a
    correctly rounded, hence monotone, float division and ``ceil`` keeps the order), and ``f(1) = 1``
    because ``ratio >= 1``; so the loop's answer is exactly the largest ``s`` in ``[1, hd_num]`` with
    ``f(s) <= hd_num``, which bisection finds in O(log hd_num) steps with the same float expression.
    """
    lo, hi = 1, hd_num  # f(lo) <= hd_num always; the answer lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid * math.ceil(mid / ratio) <= hd_num:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _working_size(w: int, h: int, hd_num: int) -> tuple[int, int, int, bool]:
    """``(scale, new_w, new_h, clamped)`` in the working frame (``w >= h``), as :func:`plan` documents."""
    ratio = w / h
    scale = _scale(ratio, hd_num)
    new_w = int(scale * TILE)
    new_h = int(new_w / ratio)
    clamped = new_h < 1
    if clamped:
        new_h = 1
    return scale, new_w, new_h, clamped


def plan(width: int, height: int, hd_num: int) -> HDPlan:
    """Compute the HD-N partition of a ``width×height`` image, exactly as the reference does.

    In the working frame (the image transposed when ``width < height``, so that ``w >= h``):
    ``ratio = w / h``; ``scale`` is the largest ``s`` with ``s * ceil(s / ratio) <= hd_num``;
    ``new_w = int(scale * 336)``; ``new_h = int(new_w / ratio)`` (float division, truncated, so a few
    sizes come out 1 px shorter than exact rational arithmetic would give); the height is padded to
    ``ceil(new_h / 336) * 336`` with ``top = int((tar - new_h) / 2)`` and the odd pixel at the bottom
    (docs/model.md §1.2–§1.8). Portrait inputs are transposed back, so their padding is left/right.

    Deviation from the reference: when the aspect ratio exceeds ``336 * scale`` (e.g. 10000×10 at
    ``hd_num=1``), ``new_h`` truncates to 0 and the reference crashes inside PIL. Here the resized short
    side is clamped to 1 px and ``clamped=True`` is set; the grid then has a single row.

    Args:
        width: input width in pixels (>= 1).
        height: input height in pixels (>= 1).
        hd_num: maximum number of 336-px tiles (>= 1). Resolve ``"auto"`` first with
            :func:`resolve_hd_num`.

    Raises:
        InputError: a side that is not a positive integer.
        InvalidHDNumError: ``hd_num`` not a positive integer (bool, float and str are refused).
    """
    width = _check_side("width", width)
    height = _check_side("height", height)
    hd_num = check_hd_num(hd_num)

    transposed = width < height  # square images are not transposed (docs/model.md §1.1)
    w, h = (height, width) if transposed else (width, height)
    scale, new_w, new_h, clamped = _working_size(w, h, hd_num)
    tar = int(math.ceil(new_h / TILE) * TILE)
    top = int((tar - new_h) / 2)
    bottom = tar - new_h - top

    if transposed:
        resized_size, padded_size = (new_h, new_w), (tar, new_w)
        padding = (top, 0, bottom, 0)
    else:
        resized_size, padded_size = (new_w, new_h), (new_w, tar)
        padding = (0, top, 0, bottom)
    rows, cols = padded_size[1] // TILE, padded_size[0] // TILE
    return HDPlan(
        width=width,
        height=height,
        hd_num=hd_num,
        transposed=transposed,
        scale=scale,
        resized_size=resized_size,
        padded_size=padded_size,
        padding=padding,
        rows=rows,
        cols=cols,
        num_tiles=rows * cols,
        num_tokens=image_tokens(rows, cols),
        clamped=clamped,
    )


def _check_max_tokens(max_tokens: object) -> int:
    value = _as_int(max_tokens)
    if value is None or value < 1:
        raise InvalidHDNumError(f"max_tokens must be a positive integer, got {max_tokens!r}.")
    return value


def auto_hd_num(width: int, height: int, max_tokens: int, *, max_hd_num: int = MAX_AUTO_HD_NUM) -> int:
    """The largest ``hd_num`` in ``1..max_hd_num`` whose plan costs at most ``max_tokens`` image tokens
    (``max_hd_num`` defaults to :data:`MAX_AUTO_HD_NUM`, the cap of every ``"auto"``).

    Image tokens never decrease as ``hd_num`` grows (``scale`` is non-decreasing, hence so are
    ``new_w``, ``new_h`` and the grid), but every candidate is checked anyway, so the answer does not
    rest on that. Several budgets often give the same grid (a square image uses 7×7 tiles for every
    ``hd_num`` in 49..63); the largest is returned.

    Raises:
        InputError: a side that is not a positive integer.
        InvalidHDNumError: ``max_tokens``/``max_hd_num`` not positive integers, or a ``max_tokens`` below
            what ``hd_num=1`` needs (the message gives that minimum).
    """
    width = _check_side("width", width)
    height = _check_side("height", height)
    max_tokens = _check_max_tokens(max_tokens)
    max_hd_num = check_hd_num(max_hd_num)
    fitting = [n for n in range(1, max_hd_num + 1) if plan(width, height, n).num_tokens <= max_tokens]
    if not fitting:
        need = plan(width, height, 1).num_tokens
        raise InvalidHDNumError(
            f"max_tokens={max_tokens} is too small: even hd_num=1 needs {need} image tokens for a "
            f"{width}×{height} image; allow at least {need} tokens."
        )
    return fitting[-1]


def resolve_hd_num(
    hd_num: HDNum | None,
    width: int,
    height: int,
    *,
    default: int,
    max_tokens: int | None,
) -> int:
    """Turn a user's ``hd_num`` (an int, ``"auto"`` or ``None``) into a concrete tile budget.

    ``None`` gives ``default``; ``"auto"`` (any case) gives :func:`auto_hd_num` under ``max_tokens``
    (capped at :data:`MAX_AUTO_HD_NUM`, as in :func:`plan_images`), which must then be given; an int is
    validated and returned.

    Raises:
        InvalidHDNumError: an invalid value, or ``"auto"`` without ``max_tokens``.
        InputError: a side that is not a positive integer (checked for ``"auto"``).
    """
    if _is_auto(hd_num) and max_tokens is None:
        raise InvalidHDNumError(
            "hd_num='auto' needs a token budget: pass max_tokens (e.g. 8192), or give an integer hd_num."
        )
    return _resolve_one(hd_num, width, height, default=default, auto_budget=max_tokens or 0)


def _is_auto(hd_num: object) -> bool:
    return isinstance(hd_num, str) and hd_num.strip().lower() == "auto"


def _resolve_one(
    hd_num: object, width: int, height: int, *, default: object, auto_budget: int, cap: int = MAX_AUTO_HD_NUM
) -> int:
    """The one rule: ``None`` -> ``default``; ``"auto"`` -> the largest hd_num (capped at ``cap``,
    :data:`MAX_AUTO_HD_NUM` unless an engine's budget is lower) whose image tokens fit ``auto_budget``; an int
    is validated."""
    value = default if hd_num is None else hd_num
    if _is_auto(value):
        return auto_hd_num(width, height, auto_budget, max_hd_num=cap)
    return check_hd_num(value)


class _Sized(Protocol):
    """Anything with a size: a PIL image, or an image header read before decoding (the server)."""

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...


def plan_images(
    images: Sequence[_Sized],
    hd_num: HDNum | Sequence[HDNum] | None,
    *,
    default_hd_num: HDNum,
    context_length: int,
    max_new_tokens: int,
    text_tokens: int = TEXT_MARGIN,
    max_auto_hd_num: int = MAX_AUTO_HD_NUM,
) -> tuple[HDPlan, ...]:
    """The one place where ``hd_num`` becomes an :class:`HDPlan`: in process, on the server, in every engine.

    ``hd_num`` is one value for every image or one per image; ``None`` means ``default_hd_num``. An int is
    validated as given; ``"auto"`` picks the largest hd_num whose image tokens fit the context left after
    the answer (``max_new_tokens``) and the prompt's own ``text_tokens`` (every request path counts them;
    :data:`TEXT_MARGIN` only where a caller has no prompt), shared equally between the images, and never
    more than :data:`MAX_AUTO_HD_NUM` (the largest budget the authors evaluated; an engine with a smaller
    budget passes its own ``max_auto_hd_num``). So an ``"auto"`` request always fits the context.

    Raises:
        InvalidHDNumError: a bad value, or a count of values that is not one per image.
        ContextOverflowError: ``"auto"`` with no room left for even ``hd_num=1``.
    """
    if isinstance(hd_num, list | tuple):
        if len(hd_num) != len(images):
            raise InvalidHDNumError(
                f"{len(hd_num)} hd_num values for {len(images)} images; give one per image, or one value for all."
            )
        requested = list(hd_num)
    else:
        requested = [hd_num] * len(images)
    if not images:
        return ()
    budget = (context_length - max_new_tokens - text_tokens) // len(images)
    plans = []
    for image, h in zip(images, requested, strict=True):
        value = default_hd_num if h is None else h
        if _is_auto(value):
            need = plan(image.width, image.height, 1).num_tokens
            if budget < need:
                raise ContextOverflowError(
                    f"No room for the images at any hd_num: the context is {context_length} tokens, the prompt's "
                    f"text {text_tokens} and max_tokens={max_new_tokens}, leaving {max(budget, 0)} per image where "
                    f"hd_num=1 needs {need}; lower max_tokens, shorten the prompt or send fewer images."
                )
        plans.append(
            plan(
                image.width,
                image.height,
                _resolve_one(value, image.width, image.height, default=None, auto_budget=budget, cap=max_auto_hd_num),
            )
        )
    return tuple(plans)


def plan_for_image(image: Image.Image, hd_num: HDNum, max_tokens: int | None = None) -> HDPlan:
    """The plan of one loaded image (``"auto"`` within ``max_tokens`` image tokens), through :func:`plan_images`."""
    if not isinstance(image, Image.Image):
        raise InputError(f"expected a PIL image, got {type(image).__name__}; load it with hd4k_tools.load_image first.")
    if hd_num is None:
        raise InvalidHDNumError("hd_num is required: a positive integer, or 'auto' with max_tokens.")
    if _is_auto(hd_num) and max_tokens is None:
        raise InvalidHDNumError(
            "hd_num='auto' needs a token budget: pass max_tokens (e.g. 8192), or give an integer hd_num."
        )
    (p,) = plan_images(
        [image], hd_num, default_hd_num=1, context_length=max_tokens or 0, max_new_tokens=0, text_tokens=0
    )
    return p


def _check_buildable(image: object, p: HDPlan) -> None:
    """A plan the pixel functions can build for ``image``: made for its size, at most :data:`MAX_TILES` tiles."""
    if not isinstance(image, Image.Image):
        raise InputError(f"expected a PIL image, got {type(image).__name__}; load it with hd4k_tools.load_image first.")
    if not isinstance(p, HDPlan):
        raise InvalidHDNumError(
            f"to_model_inputs takes the image's HDPlan, got {p!r:.60}; plan it first with plan_images([image], "
            "hd_num, ...) (or plan(width, height, hd_num)) and pass the plan."
        )
    if (p.width, p.height) != image.size:
        raise InputError(
            f"the plan is for a {p.width}×{p.height} image but the image is {image.width}×{image.height}; "
            "plan this image."
        )
    if p.num_tiles > MAX_TILES:
        raise InvalidHDNumError(
            f"hd_num={p.hd_num} gives {p.num_tiles} tiles ({p.num_tokens} image tokens), more than the "
            f"{MAX_TILES} this library builds; the model's context is 16384 tokens, use hd_num <= 100."
        )


# ----------------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------------
#: Most threads one call uses (resampling bands and tile conversion run on a per-call pool).
_MAX_WORKERS = 8
#: Below this many output pixels a resize is a few milliseconds: it runs in one piece.
_PARALLEL_MIN_PIXELS = 1 << 20
#: Pillow's major version: 13 changed the order of the two resampling passes for some sizes.
_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def _num_workers() -> int:
    """Threads one call may use: torch's intra-op thread count when torch is loaded (so
    ``torch.set_num_threads(1)`` makes preprocessing single-threaded too), else the usable CPUs."""
    torch = sys.modules.get("torch")
    if torch is not None:
        n = torch.get_num_threads()
    elif hasattr(os, "sched_getaffinity"):
        n = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - macOS, Windows
        n = os.cpu_count() or 1
    return max(1, min(n, _MAX_WORKERS))


class _Tasks:
    """Runs batches of independent calls on a thread pool that lives for one preprocessing call.

    Pillow's resampling, crop, paste and split and numpy's arithmetic release the GIL, so the threads
    run in parallel. With one worker there is no pool and the calls run inline, in order.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="hd4k-tiling") if workers > 1 else None

    def __enter__(self) -> _Tasks:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def run(self, calls: Sequence[tuple[Callable[..., object], tuple[Any, ...]]]) -> None:
        """Run ``fn(*args)`` for every pair and wait for all of them; the first error is re-raised."""
        if self._pool is None or len(calls) < 2:
            for fn, args in calls:
                fn(*args)
            return
        futures = [self._pool.submit(fn, *args) for fn, args in calls]
        for future in futures:
            future.result()


def _vertical_pass_first(in_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """Whether ``Image.resize`` runs its vertical pass before the horizontal one for these sizes.

    Pillow resamples in two separable passes with uint8 rounding in between, so the order matters for
    the pixels. Up to Pillow 12 the horizontal pass always comes first; Pillow 13 goes vertical first
    when the height shrinks by more than twice as many pixels as the width (python-pillow/Pillow#9549;
    the rule below was measured on Pillow 13.0.0 against thousands of sizes, boundaries included, and
    ``tests/test_tiling.py`` re-checks it). The reference's working frame is landscape and scaled
    proportionally, so in practice only pure vertical resizes (no horizontal pass at all) reach it.
    """
    (w, h), (ow, oh) = in_size, out_size
    return _PILLOW_MAJOR >= 13 and oh < h and h - oh > 2 * (w - ow)


def _resize_in_bands(
    img: Image.Image,
    size: tuple[int, int],
    tasks: _Tasks,
    emit: Callable[[Image.Image, int, int], object],
    *,
    transposed: bool = False,
    side_calls: Sequence[tuple[Callable[..., object], tuple[Any, ...]]] = (),
    min_pixels: int = _PARALLEL_MIN_PIXELS,
) -> None:
    """Pillow's BILINEAR resize of ``img`` to ``size``, pixel for pixel, computed in parallel bands.

    The result is ``img.resize(size)``, or with ``transposed=True`` what the reference computes for a
    portrait image, ``img.transpose(T).resize(size[::-1]).transpose(T)`` (``T`` = TRANSPOSE), without
    transposing anything. ``emit(band, x0, y0)`` receives it in pieces (``band`` sits at ``(x0, y0)``
    of the result), possibly from several threads at once; ``side_calls`` run alongside the first batch.

    Pillow resizes in two separable passes with uint8 rounding in between: the horizontal pass treats
    every row on its own and the vertical pass every column, each with integer arithmetic and
    coefficients that depend only on the input and output lengths. Hence:

    * the horizontal pass can run on horizontal bands of its input, each cropped (so its coefficients
      are those of the full width), and the vertical pass on vertical bands, each cropped to the full
      height: the same computations as one ``resize``, once the passes run in the order Pillow uses
      (:func:`_vertical_pass_first`); the second pass's bands go to ``emit``;
    * Pillow's vertical pass over ``img`` computes exactly its horizontal pass over the transposed
      image, transposed (same coefficients, same integer sums), so portrait images need no transposes.

    Resizing with ``box=`` instead of crops is *not* identical: Pillow 13 picks the pass order from the
    output size, and a box shifts the filter centres by float rounding. With one worker or a small
    image the passes run in one piece each.
    """
    w, h = img.size
    ow, oh = size
    if transposed:  # the reference resizes the transposed image: its first pass is our other one
        vertical_first = not _vertical_pass_first((h, w), (oh, ow))
    else:
        vertical_first = _vertical_pass_first((w, h), (ow, oh))

    img.load()  # a lazily decoded image must not be loaded by several threads at once
    if tasks.workers < 2 or ow * max(h, oh) < min_pixels:

        def whole() -> None:
            emit(_resize_whole(img, size, transposed=transposed, vertical_first=vertical_first), 0, 0)

        tasks.run([*side_calls, (whole, ())])
        return

    # First pass on several bands per thread (a core taken by another process delays only a small
    # one), second pass on one-tile-wide bands, each assembled from the first pass's bands by pasting
    # them at a negative offset (one copy, no intermediate full-size image).
    bands = _vertical_first_bands if vertical_first else _horizontal_first_bands
    firsts, seconds = bands(img, size, 4 * tasks.workers, emit)
    no_first_pass = (oh == h) if vertical_first else (ow == w)
    tasks.run([*side_calls, *([] if no_first_pass else firsts)])
    tasks.run(seconds)


_Call = tuple[Callable[..., None], tuple[Any, ...]]


def _horizontal_pass(src: Image.Image, box: tuple[int, int, int, int], ow: int) -> Image.Image:
    """Pillow's horizontal pass (to width ``ow``) over the rows ``box`` selects."""
    band = src if box == (0, 0, *src.size) else src.crop(box)
    return band if band.width == ow else band.resize((ow, band.height), Image.Resampling.BILINEAR)


def _vertical_pass(src: Image.Image, box: tuple[int, int, int, int], oh: int) -> Image.Image:
    """Pillow's vertical pass (to height ``oh``) over the columns ``box`` selects."""
    band = src if box == (0, 0, *src.size) else src.crop(box)
    return band if band.height == oh else band.resize((band.width, oh), Image.Resampling.BILINEAR)


def _resize_whole(img: Image.Image, size: tuple[int, int], *, transposed: bool, vertical_first: bool) -> Image.Image:
    """:func:`_resize_in_bands`'s result in one piece (one worker or a small image)."""
    w, h = img.size
    ow, oh = size
    if not transposed:
        return img.resize(size, Image.Resampling.BILINEAR)
    if vertical_first:
        return _horizontal_pass(_vertical_pass(img, (0, 0, w, h), oh), (0, 0, w, oh), ow)
    return _vertical_pass(_horizontal_pass(img, (0, 0, w, h), ow), (0, 0, ow, h), oh)


def _vertical_first_bands(
    img: Image.Image, size: tuple[int, int], n: int, emit: Callable[[Image.Image, int, int], object]
) -> tuple[list[_Call], list[_Call]]:
    """The calls of the vertical pass on ``n`` column bands, then of the horizontal pass on one-tile-high
    row bands (which go to ``emit``)."""
    w, h = img.size
    ow, oh = size
    n = min(n, w)
    x_edges = [w * i // n for i in range(n + 1)]
    firsts: list[Image.Image | None] = [None] * n

    def first(i: int) -> None:
        firsts[i] = _vertical_pass(img, (x_edges[i], 0, x_edges[i + 1], h), oh)

    def second(y0: int, y1: int) -> None:
        if oh == h:  # no vertical pass
            band = img.crop((0, y0, w, y1))
        else:
            band = Image.new(img.mode, (w, y1 - y0), None)
            for x0, part in zip(x_edges, firsts, strict=False):
                band.paste(part, (x0, -y0))
        emit(_horizontal_pass(band, (0, 0, w, y1 - y0), ow), 0, y0)

    seconds: list[_Call] = [(second, (y0, min(y0 + TILE, oh))) for y0 in range(0, oh, TILE)]
    return [(first, (i,)) for i in range(n)], seconds


def _horizontal_first_bands(
    img: Image.Image, size: tuple[int, int], n: int, emit: Callable[[Image.Image, int, int], object]
) -> tuple[list[_Call], list[_Call]]:
    """The calls of the horizontal pass on ``n`` row bands, then of the vertical pass on one-tile-wide
    column bands (which go to ``emit``)."""
    w, h = img.size
    ow, oh = size
    n = min(n, h)
    y_edges = [h * i // n for i in range(n + 1)]
    firsts: list[Image.Image | None] = [None] * n

    def first(i: int) -> None:
        firsts[i] = _horizontal_pass(img, (0, y_edges[i], w, y_edges[i + 1]), ow)

    def second(x0: int, x1: int) -> None:
        if ow == w:  # no horizontal pass
            band = img.crop((x0, 0, x1, h))
        else:
            band = Image.new(img.mode, (x1 - x0, h), None)
            for y0, part in zip(y_edges, firsts, strict=False):
                band.paste(part, (-x0, y0))
        emit(_vertical_pass(band, (0, 0, x1 - x0, h), oh), x0, 0)

    seconds: list[_Call] = [(second, (x0, min(x0 + TILE, ow))) for x0 in range(0, ow, TILE)]
    return [(first, (i,)) for i in range(n)], seconds


def as_rgb(image: Image.Image) -> Image.Image:
    """``image`` itself when it is RGB, else an RGB conversion (what the reference feeds its transform)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def _padding_boxes(p: HDPlan) -> list[tuple[int, int, int, int]]:
    """The white margins of the padded canvas as ``(left, top, right, bottom)`` boxes (empty ones left out)."""
    pad_w, pad_h = p.padded_size
    left, top = p.padding[0], p.padding[1]
    right, bottom = left + p.resized_size[0], top + p.resized_size[1]
    boxes = [(0, 0, pad_w, top), (0, bottom, pad_w, pad_h), (0, top, left, bottom), (right, top, pad_w, bottom)]
    return [b for b in boxes if b[2] > b[0] and b[3] > b[1]]


def hd_transform(image: Image.Image, hd_num: HDNum, *, max_tokens: int | None = None) -> Image.Image:
    """The reference ``HD_transform``: resize to the plan and pad with white to multiples of 336 px.

    Pixel-identical to the reference (transpose portrait, BILINEAR resize, white pad top/bottom,
    transpose back). Non-RGB images are converted to RGB first. Returns an RGB image of
    ``plan.padded_size``. The resize runs in parallel bands (see :func:`to_model_inputs`).

    Args:
        image: the input image.
        hd_num: tile budget, or ``"auto"`` together with ``max_tokens``.
        max_tokens: image-token budget for ``hd_num="auto"``.

    Raises:
        InvalidHDNumError, InputError: see :func:`plan` and :func:`resolve_hd_num`.
    """
    p = plan_for_image(image, hd_num, max_tokens)
    _check_buildable(image, p)
    canvas = Image.new("RGB", p.padded_size, PAD_WHITE)
    left, top = p.padding[0], p.padding[1]

    def emit(band: Image.Image, x0: int, y0: int) -> None:
        canvas.paste(band, (left + x0, top + y0))

    # The reference resizes portrait images transposed (Pillow's two passes round in between, so resizing
    # the portrait directly is *not* pixel-identical; docs/model.md §1); transposed=True reproduces that.
    with _Tasks(_num_workers()) as tasks:
        _resize_in_bands(as_rgb(image), p.resized_size, tasks, emit, transposed=p.transposed)
    return canvas


@dataclass(frozen=True)
class ModelInputs:
    """What the vision tower consumes for one image.

    Attributes:
        tiles: ``[rows*cols, 3, 336, 336]``, row-major tile order (tile ``k`` is row ``k // cols``,
            column ``k % cols``), CLIP-normalised.
        global_view: ``[1, 3, 336, 336]``, the whole normalised padded canvas squashed to 336×336.
        plan: the :class:`HDPlan` these were built from.
    """

    tiles: torch.Tensor
    global_view: torch.Tensor
    plan: HDPlan

    @property
    def num_tokens(self) -> int:
        """Image tokens the vision tower will produce (``plan.num_tokens``)."""
        return self.plan.num_tokens


_F255 = np.float32(255)
_MEAN32 = tuple(np.float32(v) for v in CLIP_MEAN)
_STD32 = tuple(np.float32(v) for v in CLIP_STD)
#: Normalised white, ``(255/255 - mean) / std`` in float32, as ToTensor + Normalize compute it.
_WHITE32 = tuple((_F255 / _F255 - m) / s for m, s in zip(_MEAN32, _STD32, strict=True))


def _tile_spans(start: int, stop: int) -> Iterator[tuple[int, int, int]]:
    """Split ``[start, stop)`` at multiples of 336: ``(tile index, offset in tile, length)`` per piece."""
    while start < stop:
        index, offset = divmod(start, TILE)
        length = min(stop - start, TILE - offset)
        yield index, offset, length
        start += length


def _bicubic_taps(k: int) -> tuple[int, list[tuple[int, int, int, int, int]]]:
    """How to shorten one axis of the canvas for the global view without changing a single bit of it.

    The canvas axis is ``k * 336`` long and ``F.interpolate(..., size=336, mode="bicubic",
    align_corners=False)`` scales it by the integer ``k``: output ``o`` sits at source coordinate
    ``k*o + (k-1)/2`` (exact in float32), so every output uses the same fractional offset ``t`` (0 for
    odd ``k``, 1/2 for even ``k``), hence the same four weights, on the four taps
    ``k*o + (k-1)//2 - 1 + d``, ``d = 0..3``. For ``k >= 4`` those taps lie inside the output's own
    block of ``k`` samples (no clamping at the edges), so a shorter axis of ``m`` samples per output,
    ``m`` = 4 for even ``k`` and 5 for odd ``k`` (same ``t``), holding the taps at ``m*o + (m-4) + d``,
    gives the very same arithmetic on the very same values. Shorter than 4 blocks the axis is kept.

    Returns the shortened length and lattices ``(canvas start, canvas step, short start, short step,
    count)``: sample ``canvas start + i * canvas step`` goes to ``short start + i * short step``.
    """
    if k < 4:
        return k * TILE, [(0, 1, 0, 1, k * TILE)]
    m = 4 if k % 2 == 0 else 5
    first = (k - 1) // 2 - 1
    return m * TILE, [(first + d, k, m - 4 + d, m, TILE) for d in range(4)]


def _lattice_slices(lattices: list[tuple[int, int, int, int, int]], start: int, stop: int) -> list[tuple[slice, slice]]:
    """For canvas samples ``[start, stop)``: ``(slice relative to start, slice of the short axis)`` pairs."""
    out = []
    for c0, cstep, q0, qstep, count in lattices:
        lo = max(0, -((c0 - start) // cstep))  # first i with c0 + i*cstep >= start
        hi = min(count, -((c0 - stop) // cstep))  # first i with c0 + i*cstep >= stop
        if lo < hi:
            a, b = c0 + cstep * lo - start, c0 + cstep * (hi - 1) - start + 1
            out.append((slice(a, b, cstep), slice(q0 + qstep * lo, q0 + qstep * (hi - 1) + 1, qstep)))
    return out


def _bicubic(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``F.interpolate(x[None], size, mode="bicubic", align_corners=False)[0]`` of a float32 ``[3, h, w]`` array."""
    import torch
    import torch.nn.functional as F

    out = F.interpolate(torch.from_numpy(x)[None], size=size, mode="bicubic", align_corners=False)
    return out[0].numpy()


class _ViewFromTaps:
    """Global view, any grid: interpolate a copy of the canvas shortened to the samples bicubic reads.

    The copy (:func:`_bicubic_taps`) is 2-34 MB where the canvas is up to 75 MB; gathering it costs
    strided copies of about a third of the canvas.
    """

    def __init__(self, p: HDPlan) -> None:
        height, self._row_taps = _bicubic_taps(p.rows)
        width, self._col_taps = _bicubic_taps(p.cols)
        self._src = np.zeros((3, height, width), np.float32)  # samples never read stay 0.0 (finite)

    def piece(self, tiles: np.ndarray, cols: int, top: int, left: int, height: int, width: int) -> None:
        """The canvas block ``[top, top+height) × [left, left+width)`` (inside one tile) is final."""
        row, i0 = divmod(top, TILE)
        col, j0 = divmod(left, TILE)
        block = tiles[row * cols + col, :, i0 : i0 + height, j0 : j0 + width]
        for rs, qrs in _lattice_slices(self._row_taps, top, top + height):
            for cs, qcs in _lattice_slices(self._col_taps, left, left + width):
                self._src[:, qrs, qcs] = block[:, rs, cs]

    def final_calls(self, tiles: np.ndarray) -> list[tuple[Callable[..., object], tuple[Any, ...]]]:
        return []

    def result(self) -> np.ndarray:
        return _bicubic(self._src, (TILE, TILE))[None]


class _ViewFromTiles:
    """Global view of a grid of at least 4×4 tiles, interpolated tile by tile as tiles are finished.

    With ``k >= 4`` blocks per axis, output ``o`` depends only on its own block of ``k`` canvas samples
    (:func:`_bicubic_taps`). So the outputs whose blocks lie inside one tile are ``F.interpolate`` of that
    tile's whole blocks (same integer scale, same taps, same weights: bit-identical), computed by the
    thread that finishes the tile while it is still in cache; the few outputs whose block straddles two
    tiles (none when ``k`` divides 336) come from a ``k``-sample strip across the whole canvas at the end.
    No canvas, not even a shortened one, is built.
    """

    def __init__(self, p: HDPlan) -> None:
        self._rows, self._cols = p.rows, p.cols
        self._view = np.empty((3, TILE, TILE), np.float32)
        self._missing = [TILE * TILE] * p.num_tiles  # pixels of each tile not written yet
        self._lock = threading.Lock()

    @staticmethod
    def _inner(k: int, t: int) -> tuple[int, int, int, int]:
        """Outputs ``[lo, hi)`` whose blocks lie in tile ``t`` of an axis of ``k`` tiles, and their samples
        ``[a, b)`` in the tile."""
        lo, hi = -(-TILE * t // k), TILE * (t + 1) // k
        return lo, hi, k * lo - TILE * t, k * hi - TILE * t

    def piece(self, tiles: np.ndarray, cols: int, top: int, left: int, height: int, width: int) -> None:
        index = (top // TILE) * cols + left // TILE
        with self._lock:
            self._missing[index] -= height * width
            finished = self._missing[index] == 0
        if finished:
            row, col = divmod(index, cols)
            o0, o1, y0, y1 = self._inner(self._rows, row)
            p0, p1, x0, x1 = self._inner(self._cols, col)
            self._view[:, o0:o1, p0:p1] = _bicubic(tiles[index, :, y0:y1, x0:x1], (o1 - o0, p1 - p0))

    def _row_strip(self, tiles: np.ndarray, t: int, o: int) -> None:
        """Output row ``o``, whose block of rows straddles tile rows ``t`` and ``t + 1``."""
        k, cols = self._rows, self._cols
        a = TILE * (t + 1) - k * o  # rows of the block in tile row t
        grid = tiles.reshape(self._rows, cols, 3, TILE, TILE)
        strip = np.empty((3, k, cols, TILE), np.float32)  # the block's k canvas rows, all columns
        strip[:, :a] = grid[t, :, :, TILE - a :, :].transpose(1, 2, 0, 3)
        strip[:, a:] = grid[t + 1, :, :, : k - a, :].transpose(1, 2, 0, 3)
        self._view[:, o, :] = _bicubic(strip.reshape(3, k, cols * TILE), (1, TILE))[:, 0]

    def _col_strip(self, tiles: np.ndarray, t: int, o: int) -> None:
        """Output column ``o``, whose block of columns straddles tile columns ``t`` and ``t + 1``."""
        k, rows = self._cols, self._rows
        a = TILE * (t + 1) - k * o
        grid = tiles.reshape(rows, k, 3, TILE, TILE)
        strip = np.empty((3, rows, TILE, k), np.float32)
        strip[..., :a] = grid[:, t, :, :, TILE - a :].transpose(1, 0, 2, 3)
        strip[..., a:] = grid[:, t + 1, :, :, : k - a].transpose(1, 0, 2, 3)
        self._view[:, :, o] = _bicubic(strip.reshape(3, rows * TILE, k), (TILE, 1))[:, :, 0]

    def final_calls(self, tiles: np.ndarray) -> list[tuple[Callable[..., object], tuple[Any, ...]]]:
        """The outputs whose block straddles two tiles (none when the grid divides 336), once all
        tiles are finished: each from a strip of its ``k`` canvas rows (columns) across the canvas."""
        assert not any(self._missing), "unfinished tiles"
        calls: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
        for k, strip in ((self._rows, self._row_strip), (self._cols, self._col_strip)):
            for t in range(k - 1):
                if TILE * (t + 1) % k:
                    calls.append((strip, (tiles, t, TILE * (t + 1) // k)))
        return calls

    def result(self) -> np.ndarray:
        return self._view[None]


class _TileWriter:
    """Writes normalised pixels straight into the tiles and hands finished pieces to the global view.

    ``tiles`` is a fresh numpy float32 buffer: numpy asks the kernel for transparent huge pages on large
    allocations, so first-touching it costs a few 2 MiB page faults instead of ~18k 4 KiB ones per
    75 MB (torch.empty does not). It is returned to the caller (torch.from_numpy, no copy); nothing is
    reused across calls. The full canvas is never built (:class:`_ViewFromTiles`, :class:`_ViewFromTaps`).
    """

    def __init__(self, p: HDPlan) -> None:
        self.cols = p.cols
        self.tiles = np.empty((p.num_tiles, 3, TILE, TILE), np.float32)
        self.view = _ViewFromTiles(p) if min(p.rows, p.cols) >= 4 else _ViewFromTaps(p)

    def pixels(self, rgb: Image.Image, top: int, left: int) -> None:
        """Normalise an RGB block whose top-left corner sits at ``(left, top)`` of the padded canvas.

        ToTensor + Normalize as float32 arithmetic in their order, ``(x / 255 - mean) / std``, one
        tile-sized piece at a time so the three passes stay in cache: bit-identical to the reference.
        """
        width, height = rgb.size
        planes = [np.frombuffer(rgb.tobytes("raw", band), np.uint8).reshape(height, width) for band in "RGB"]
        y = top
        for row, i0, rows in _tile_spans(top, top + height):
            x = left
            for col, j0, cols in _tile_spans(left, left + width):
                tile = self.tiles[row * self.cols + col, :, i0 : i0 + rows, j0 : j0 + cols]
                for ch in range(3):
                    dst = tile[ch]
                    src = planes[ch][y - top : y - top + rows, x - left : x - left + cols]
                    np.divide(src, _F255, out=dst, dtype=np.float32)
                    np.subtract(dst, _MEAN32[ch], out=dst)
                    np.divide(dst, _STD32[ch], out=dst)
                self.view.piece(self.tiles, self.cols, y, x, rows, cols)
                x += cols
            y += rows

    def padding(self, left: int, top: int, right: int, bottom: int) -> None:
        """Fill the box ``[left, right) × [top, bottom)`` with normalised white."""
        y = top
        for row, i0, rows in _tile_spans(top, bottom):
            x = left
            for col, j0, cols in _tile_spans(left, right):
                tile = self.tiles[row * self.cols + col]
                for ch in range(3):
                    tile[ch, i0 : i0 + rows, j0 : j0 + cols] = _WHITE32[ch]
                self.view.piece(self.tiles, self.cols, y, x, rows, cols)
                x += cols
            y += rows


def _build_inputs(image: Image.Image, p: HDPlan) -> tuple[np.ndarray, np.ndarray]:
    """Tiles ``[R*C, 3, 336, 336]`` and global view ``[1, 3, 336, 336]``, float32 numpy arrays.

    Equal, value for value, to the blocks of ToTensor + Normalize(CLIP) of the reference
    ``HD_transform`` canvas (docs/model.md §1.9) and to its bicubic 336×336 view; the canvas is never built: the
    resize runs in parallel bands (:func:`_resize_in_bands`) and each band, as soon as it is ready, is
    normalised on the same thread into its tiles, which feed the global view as they are finished; the
    margins are filled with normalised white meanwhile.
    """
    writer = _TileWriter(p)
    left, top = p.padding[0], p.padding[1]

    def emit(band: Image.Image, x0: int, y0: int) -> None:
        writer.pixels(band, top + y0, left + x0)

    with _Tasks(_num_workers()) as tasks:
        pads = [(writer.padding, box) for box in _padding_boxes(p)]
        _resize_in_bands(as_rgb(image), p.resized_size, tasks, emit, transposed=p.transposed, side_calls=pads)
        tasks.run(writer.view.final_calls(writer.tiles))
    return writer.tiles, writer.view.result()


def to_model_inputs(image: Image.Image, plan: HDPlan, *, dtype: torch.dtype | None = None) -> ModelInputs:
    """Preprocess ``image`` for the vision tower: normalised tiles and the global view (docs/model.md §1, §2).

    Equal to the reference: ``HD_transform`` -> ToTensor -> Normalize(CLIP) gives a float32 canvas
    ``[3, R*336, C*336]``; the tiles are its row-major 336×336 blocks
    (``reshape(3, R, 336, C, 336).permute(1, 3, 0, 2, 4)``); the global view is
    ``F.interpolate(canvas[None], size=(336, 336), mode="bicubic", align_corners=False)`` (no antialias)
    of the *normalised, padded* canvas. Both are computed in float32 and then cast to ``dtype``.

    Uses up to ``torch.get_num_threads()`` threads (at most 8) for the resize and the conversion; the
    output does not depend on the thread count.

    Args:
        image: the input image (converted to RGB if needed).
        plan: its :class:`HDPlan` from :func:`plan_images` (planning happens once, before; never here).
        dtype: dtype of the returned tensors; ``None`` means ``torch.float32``.

    Raises:
        InvalidHDNumError: ``plan`` is not an HDPlan (e.g. an hd_num), or has more than :data:`MAX_TILES` tiles.
        InputError: not a PIL image, or a plan made for another size.
    """
    import torch

    p = plan
    _check_buildable(image, p)
    dtype = torch.float32 if dtype is None else dtype
    tiles, global_view = _build_inputs(image, p)  # [R*C, 3, 336, 336], [1, 3, 336, 336] float32
    # Like the reference, the global view is interpolated in float32 and cast to the tower's dtype (docs/model.md §2).
    return ModelInputs(
        tiles=torch.from_numpy(tiles).to(dtype), global_view=torch.from_numpy(global_view).to(dtype), plan=p
    )
