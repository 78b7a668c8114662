"""The model commands' argument checks that need neither torch nor the weights, run before the model loads.

A wrong argument must cost a second, not the 9-11 s of importing torch and transformers plus a model load
(17 GB for the official checkpoint): the commands check their inputs (file, image decode limits, page
range) first, then call :func:`check_before_load`, which checks ``--device`` and ``--dtype`` by name and
``--hd-num`` against the checkpoint's context (``max_length`` from its ``config.json``, read without torch;
for a hub id that one file is fetched, or the "offline" error comes at once). Only then do the commands
import torch (the device must exist) and load the model.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

from PIL import Image

from hd4k_tools.errors import CLI, PYTHON, CheckpointError, ContextOverflowError, DeviceError, InputError
from hd4k_tools.hd4k import plan_images  # the facade's planner: the plans the model will get
from hd4k_tools.inputs.images import SourceBytes, load_image
from hd4k_tools.inputs.pdf import page_sizes
from hd4k_tools.models.registry import ModelFamily, family_for_checkpoint, family_for_config
from hd4k_tools.tasks import TASKS, TaskSpec

__all__ = ["DTYPE_NAMES", "check_before_load", "check_device_name", "check_dtype_name", "document_sizes"]

#: The ``--dtype`` names the native engine takes (``checkpoint.resolve_dtype``; a test keeps the two equal).
DTYPE_NAMES = ("auto", "float32", "fp32", "float", "bfloat16", "bf16", "float16", "fp16", "half")
_DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)\Z")


class _Size(NamedTuple):
    """What the planner reads of an image: its size."""

    width: int
    height: int


def check_device_name(device: str) -> None:
    """``--device`` is a device name (whether the machine has it needs torch: checked later)."""
    if not _DEVICE.match(device.strip().lower()):
        raise DeviceError(f"--device {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps.")


def check_dtype_name(dtype: str) -> None:
    """``--dtype`` is a dtype the native engine takes."""
    if dtype.strip().lower().removeprefix("torch.") not in DTYPE_NAMES:
        raise InputError(f"--dtype: dtype {dtype!r} is not supported; use 'auto', 'bf16', 'fp16' or 'fp32'.")


def document_sizes(raw: SourceBytes, numbers: Sequence[int | None], *, dpi: int) -> list[tuple[int, int]]:
    """The pixel size of each page to read (``numbers``: 1-based PDF pages, or ``[None]`` for an image),
    from the PDF's page boxes at ``dpi`` without rendering (a page over the pixel limit is an error now)."""
    if raw.kind == "pdf":
        return page_sizes(raw, [n - 1 for n in numbers if n is not None], dpi=dpi)
    return [load_image(raw).size]


def check_before_load(
    args: argparse.Namespace, *, task: str | TaskSpec, sizes: Sequence[tuple[int, int]], hd_num: int | str | None
) -> None:
    """Every check of a model command that needs no weights: ``--device`` and ``--dtype`` by name, and each
    image (``sizes``) at ``hd_num`` (``None``: the task's default) against the checkpoint's context.

    Nothing to check against with ``--remote`` (the server has the model).

    Raises:
        DeviceError, InputError: an unknown device or dtype name.
        ContextOverflowError: an image's tokens at ``hd_num`` exceed the context.
        ModelNotFoundError, HubAuthError: the checkpoint cannot be had (offline and not cached, no such
            folder...), said now rather than after importing torch.
    """
    if args.remote:
        return
    check_device_name(args.device)
    check_dtype_name(args.dtype)
    try:
        config = family_for_checkpoint(args.model).checkpoint_config(args.model)
        family = family_for_config(config, where=str(args.model))
    except CheckpointError:
        return  # a folder without a readable config.json (or of no known family): the loader names the problem
    max_length = family.context_length(config)
    spec = TASKS[task] if isinstance(task, str) else task
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else spec.max_new_tokens
    for number, size in enumerate(sizes, start=1):
        (plan,) = plan_images(
            [cast(Image.Image, _Size(*size))],
            hd_num,
            default_hd_num=spec.default_hd_num,
            context_length=max_length,
            max_new_tokens=max_new_tokens,
        )
        if plan.num_tokens > max_length:
            raise _overflow(family, plan, size, max_length, page=number if len(sizes) > 1 else None)


def _overflow(
    family: ModelFamily, plan: Any, size: tuple[int, int], max_length: int, *, page: int | None
) -> ContextOverflowError:
    where = f"page {page} ({size[0]}x{size[1]})" if page is not None else f"the {size[0]}x{size[1]} image"
    fits = family.largest_fitting_hd_num(0, [size], max_length, max_hd_num=max(plan.hd_num - 1, 1))
    message = (
        f"{where} at hd_num {plan.hd_num} is {plan.num_tokens} image tokens, more than the model's context of "
        f"{max_length} tokens."
    )
    if fits is None:
        return ContextOverflowError(message)
    return ContextOverflowError(
        message,
        hints={CLI: f"Use --hd-num {fits} or lower, or --hd-num auto.", PYTHON: f"Use hd_num={fits} or lower."},
    )
