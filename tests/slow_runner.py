"""A runner that takes a fixed time per token and honours the cancel event between tokens (not a test
module): cancellation tests measure how many tokens were generated after a cancel, with no timing assertion
on the model itself."""

from __future__ import annotations

import threading
import time

from hd4k_tools import GenerationRequest, PlanSummary, RunnerResult, TextStream, Usage
from hd4k_tools.runtime.runner import stream_in_thread


class SlowTokenRunner:
    """Emits ``"tok "`` every ``seconds_per_token`` up to ``max_tokens``, stopping at the next token once
    ``cancel`` is set. ``started`` is set when the first token is out; ``finished`` when the call returns,
    with ``tokens`` generated and ``tokens_after_cancel`` counted after the cancel was seen."""

    model_id = "slow-token-runner"
    context_length = 16384

    def __init__(self, max_tokens: int = 2000, seconds_per_token: float = 0.01) -> None:
        self.max_tokens = max_tokens
        self.seconds_per_token = seconds_per_token
        self.started = threading.Event()
        self.finished = threading.Event()
        self.tokens = 0
        self.cancelled = False

    def count_text_tokens(self, text: str) -> int:
        return len(text.split())

    def _run(self, request: GenerationRequest, emit: object, cancel: threading.Event | None) -> RunnerResult:
        plans = [PlanSummary.from_plan(p) for p in request.plans()]
        try:
            for _ in range(self.max_tokens):
                if cancel is not None and cancel.is_set():
                    self.cancelled = True
                    break
                time.sleep(self.seconds_per_token)
                self.tokens += 1
                self.started.set()
                if callable(emit):
                    emit("tok ")
        finally:
            self.finished.set()
        image_tokens = sum(p.image_tokens for p in plans)
        return RunnerResult(
            text="tok " * self.tokens,
            model=self.model_id,
            finish_reason="cancelled" if self.cancelled else "length",
            plans=plans,
            usage=Usage(prompt_tokens=image_tokens, image_tokens=image_tokens, completion_tokens=self.tokens),
        )

    def generate(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult:
        return self._run(request, None, cancel)

    def stream(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> TextStream:
        return stream_in_thread(lambda emit, c: self._run(request, emit, c), cancel)

    def close(self) -> None:
        """Nothing to release."""
