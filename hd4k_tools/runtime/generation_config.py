"""Decoding settings, shared by every runner (torch-free, so remote clients and the CLI stay light)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from hd4k_tools.errors import InputError

__all__ = ["MAX_NUM_BEAMS", "GenerationConfig"]

#: Widest beam search accepted. Each beam keeps its own KV cache, so memory grows linearly with the
#: width; the authors evaluate with 3 beams, and past a handful the answers stop improving.
MAX_NUM_BEAMS = 16


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. Defaults are greedy decoding with one beam.

    The official ``chat()`` defaults are ``do_sample=True, top_p=0.8, repetition_penalty=1.005,
    max_new_tokens=1024``; the README example and the authors' evaluation use ``do_sample=False,
    num_beams=3`` (docs/model.md §4). ``top_k=0`` and ``top_p=1.0`` disable those filters. Sampling with
    ``num_beams > 1`` (HF's beam-sample) is not supported, nor more than :data:`MAX_NUM_BEAMS` beams
    (memory grows with every beam). Invalid values raise
    :class:`~hd4k_tools.errors.InputError` (a ``ValueError``).
    """

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    seed: int | None = None
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.do_sample, bool):
            raise InputError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not is_num(self.temperature) or self.temperature <= 0:
            raise InputError(
                f"temperature must be a number > 0, got {self.temperature!r} (use do_sample=False for greedy)"
            )
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r} (1.0 disables nucleus sampling)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k must be an int >= 0, got {self.top_k!r} (0 disables top-k)")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InputError(
                f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r} (1.0 disables it)"
            )
        if not is_int(self.num_beams) or self.num_beams < 1:
            raise InputError(f"num_beams must be an int >= 1, got {self.num_beams!r}")
        if self.num_beams > MAX_NUM_BEAMS:
            raise InputError(
                f"num_beams must be at most {MAX_NUM_BEAMS}, got {self.num_beams} (every beam holds its own "
                "KV cache; 3 is the authors' setting)"
            )
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise InputError(f"seed must be None or an int >= 0, got {self.seed!r}")
        if not is_num(self.length_penalty):
            raise InputError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.do_sample and self.num_beams > 1:
            raise InputError(
                "do_sample=True with num_beams>1 (beam sampling) is not supported: use num_beams=1 to "
                "sample, or do_sample=False for beam search."
            )

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
