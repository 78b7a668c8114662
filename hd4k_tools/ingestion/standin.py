"""A stand-in engine that answers every page at once, to measure and test the ingest pipeline itself
(listing, hashing, rendering, writing) without a model: ``HD4K(InstantRunner())``.

Its answer is a function of the page's pixels (size and a digest), so two runs over the same corpus
give the same records, and a page rendered from other bytes gives another answer.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field

from hd4k_tools.errors import HD4KError
from hd4k_tools.results import PlanSummary, Timings, Usage
from hd4k_tools.runtime.runner import GenerationRequest, RunnerResult


@dataclass
class InstantRunner:
    """A :class:`~hd4k_tools.runtime.runner.Runner` with no model: ``generate`` answers at once.

    ``fail_with``, when set, is raised by every call (an engine that is down); ``calls`` counts calls.
    """

    name: str = "instant-stand-in"
    context_length: int = 32768
    fail_with: HD4KError | None = None
    calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def model_id(self) -> str:
        return self.name

    def count_text_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult:
        with self._lock:
            self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        plans = [PlanSummary.from_plan(p) for p in request.plans()]
        digests = [hashlib.blake2b(image.tobytes(), digest_size=6).hexdigest() for image in request.images]
        sizes = [f"{image.width}x{image.height}" for image in request.images]
        text = " ".join(f"# page {size} {digest}" for size, digest in zip(sizes, digests, strict=True))
        image_tokens = sum(p.image_tokens for p in plans)
        return RunnerResult(
            text=text,
            model=self.name,
            plans=plans,
            usage=Usage(prompt_tokens=image_tokens + 8, image_tokens=image_tokens, completion_tokens=4),
            timings=Timings(total_s=1e-6),
        )

    def stream(self, request: GenerationRequest, *, cancel: threading.Event | None = None):  # pragma: no cover
        raise NotImplementedError("the stand-in engine does not stream")

    def close(self) -> None:
        pass
