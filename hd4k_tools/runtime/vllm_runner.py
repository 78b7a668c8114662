"""``VllmRunner``: the :class:`~hd4k_tools.runtime.runner.Runner` protocol over vLLM's engine, in this process.

``HD4K.from_pretrained(path, engine="vllm")`` builds one. It drives vLLM's ``AsyncLLM`` (V1 engine: the
scheduler and the model run in vLLM's own engine process) from an asyncio loop on a background thread
that this object owns. Every caller — a blocking ``generate``, a ``stream`` read from another thread,
``HD4K``'s async twins, many threads at once, ``generate_batch`` — submits into that one loop, so vLLM
batches them all continuously (paged KV, chunked prefill, prefix and encoder caches). Why ``AsyncLLM``
rather than the offline ``LLM``: see ``docs/decisions.md`` ("In-process vLLM engine").

What stays ours, so that answers equal the native runner's: the prompt string
(:func:`~hd4k_tools.models.xcomposer2_4khd.prompt.conversation_prompt`: official chat turns or the
authors' eval layout), the context
check (same :class:`~hd4k_tools.errors.ContextOverflowError` before anything runs), the stop ids
``{eos, [UNUSED_TOKEN_145]}``, and the text: generated ids are decoded by our tokenizer exactly as the
native loop decodes them (also while streaming). vLLM's plugin (``hd4k_tools.models.xcomposer2_4khd.vllm``)
tiles the images with our tiling code and runs the model.

Each request carries its per-image ``hd_num`` values and its layout to the plugin's processor
(``mm_processor_kwargs``); an ``hd_num`` above the engine's ``hd_num`` (the budget vLLM sized its caches for
at start-up) is refused by the processor with :class:`~hd4k_tools.errors.InvalidHDNumError`. Not supported
(refused with a typed error, never approximated): beam search (``num_beams > 1``; vLLM's beam search is a
different algorithm, run as one engine request per step).

vLLM starts its engine process with ``spawn``: a script that creates this runner needs the usual
``if __name__ == "__main__":`` guard.

Shutting down: :meth:`VllmRunner.close` (or ``with VllmRunner(...)``, ``with HD4K.from_pretrained(...)``)
stops vLLM's engine process and frees its shared memory. A runner still open when the interpreter exits is
closed by an ``atexit`` hook, while the interpreter is whole: otherwise ``AsyncLLM.__del__`` runs during
teardown (a traceback on stderr) and the multiprocessing resource tracker reports leaked shared memory.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vllm import AsyncEngineArgs, SamplingParams
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from hd4k_tools.errors import HD4KError, InputError, InvalidHDNumError, ModelError, OutputParseError
from hd4k_tools.models.registry import FamilyRegistry, family_for_checkpoint
from hd4k_tools.results import PlanSummary, Timings, Usage
from hd4k_tools.runtime.generation import TextDeltas, decode_output, stop_ids_for, token_logprob
from hd4k_tools.runtime.generation_config import GenerationConfig
from hd4k_tools.runtime.runner import GenerationRequest, RunnerResult, TextStream, TokenLogprob, stream_in_thread
from hd4k_tools.runtime.stops import StopFilter
from hd4k_tools.runtime.tokenized import TokenizerOwner
from hd4k_tools.structured import JSONConstraint, StructuredOutputTruncatedError, loads_json

__all__ = ["VllmEngineError", "VllmRunner"]

T = TypeVar("T")
#: Seconds vLLM's engine process gets to stop its workers and free its shared memory before it is killed.
SHUTDOWN_TIMEOUT_S = 60.0


class VllmEngineError(ModelError):
    """vLLM's engine failed (did not start, died, or rejected a request for a reason not ours)."""


def _sampling_params(
    g: GenerationConfig, max_tokens: int, stop_ids: Sequence[int], constraint: JSONConstraint | None = None
) -> Any:
    """vLLM ``SamplingParams`` for ``g`` (greedy or sampling; beams are refused by the caller). OpenAI's
    penalties, ``logit_bias`` and ``logprobs`` pass through; a JSON constraint becomes vLLM's own structured
    outputs (``StructuredOutputsParams``: ``json`` schema or ``json_object``)."""
    from vllm.sampling_params import StructuredOutputsParams

    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens,
        "stop_token_ids": list(stop_ids),
        # Text is decoded by our tokenizer (as the native runner does); vLLM's detokenizer is not needed.
        "detokenize": False,
        "output_kind": RequestOutputKind.DELTA,
        "repetition_penalty": g.repetition_penalty,
        "seed": g.seed,
    }
    if g.do_sample:
        kwargs.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
    else:
        kwargs["temperature"] = 0.0
    kwargs.update(presence_penalty=g.presence_penalty, frequency_penalty=g.frequency_penalty)
    if g.logit_bias:
        kwargs["logit_bias"] = dict(g.logit_bias)
    if g.logprobs:
        kwargs["logprobs"] = g.top_logprobs
    if constraint is not None:
        # Compact JSON as in the native engine (the engine-level flag is what xgrammar reads; see _engine_args).
        kwargs["structured_outputs"] = (
            StructuredOutputsParams(json=constraint.schema, disable_any_whitespace=True)
            if constraint.schema_json is not None
            else StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
        )
    return SamplingParams(**kwargs)


def _logprob_entries(tokenizer: Any, token_ids: Sequence[int], logprobs: Sequence[Any], k: int) -> list[TokenLogprob]:
    """vLLM's per-token ``{token_id: Logprob}`` dicts (the chosen token plus the top ``k``, ranked) in
    OpenAI's shape."""
    out = []
    for token_id, entries in zip(token_ids, logprobs, strict=False):
        ranked = sorted((e.rank or 0, t, e.logprob) for t, e in entries.items() if e.rank is not None and e.rank <= k)
        top = [(int(t), lp) for _, t, lp in ranked]
        out.append(token_logprob(tokenizer, int(token_id), entries[token_id].logprob, top))
    return out


class VllmRunner(TokenizerOwner):
    """vLLM's continuous-batching engine behind the :class:`~hd4k_tools.runtime.runner.Runner` protocol.

    Args:
        model: checkpoint folder in the official layout (the plugin registers its architecture).
        hd_num: the engine's HD-N budget: the largest ``hd_num`` a request may use (vLLM sizes its
            start-up profiling for it; default: the plugin's ``DEFAULT_ENGINE_HD_NUM``). Requests above it
            raise :class:`InvalidHDNumError`.
        tensor_parallel_size: GPUs to shard the model over (vLLM's own option).
        dtype: ``"auto"`` (the checkpoint's dtype, as the native engine: a float32 checkpoint runs in float32
            where vLLM's own ``"auto"`` would downcast it), ``"bfloat16"``, ``"float16"``, ``"float32"``.
        max_model_len: context length (default: the checkpoint's ``max_length``, 16,384 for IXC2-4KHD, as
            the native engine; vLLM's own default would be ``max_position_embeddings``).
        model_id: name reported in results (default: ``model``).
        families: the :class:`~hd4k_tools.models.registry.FamilyRegistry` the checkpoint's family is looked
            up in (default ``FAMILIES``).
        engine_kwargs: any other ``vllm.AsyncEngineArgs`` field (``gpu_memory_utilization``,
            ``enforce_eager``, ``max_num_seqs``, ``enable_prefix_caching``, ...).
    """

    supports_beam_search = False

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        hd_num: int | None = None,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        model_id: str | None = None,
        families: FamilyRegistry | None = None,
        **engine_kwargs: Any,
    ) -> None:
        self.family = family_for_checkpoint(model, families)
        hd_num = self.family.default_engine_hd_num if hd_num is None else hd_num
        if not isinstance(hd_num, int) or isinstance(hd_num, bool) or hd_num < 1:
            raise InvalidHDNumError(f"hd_num for the vLLM engine must be a positive integer, got {hd_num!r}.")
        path = Path(model)
        if not path.is_dir():
            raise HD4KError(
                f'engine="vllm" needs a checkpoint folder, got {str(model)!r}: download the weights first '
                "(`huggingface-cli download internlm/internlm-xcomposer2-4khd-7b --local-dir DIR`) and pass DIR."
            )
        self._path = path
        self._model_id = model_id or str(model)
        self.hd_num = hd_num
        self._tokenizer = self.family.load_tokenizer(path)
        defaults = self.family.module("vllm.defaults")
        self._max_len = int(max_model_len or defaults.checkpoint_max_length(path))
        self.dtype = defaults.engine_dtype(path, dtype)
        self._stop_ids = sorted(stop_ids_for(self._tokenizer))
        self._ids = itertools.count()
        self._closed = False
        self.load_seconds = 0.0

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hd4k-vllm-loop", daemon=True)
        self._thread.start()
        engine_args = self._engine_args(
            hd_num=hd_num,
            tensor_parallel_size=tensor_parallel_size,
            dtype=self.dtype,
            max_model_len=self._max_len,
            **engine_kwargs,
        )
        t0 = time.perf_counter()
        try:
            self._engine = self._call(self._start(engine_args))
        except BaseException:
            self._stop_loop()
            raise
        self.load_seconds = time.perf_counter() - t0
        # Closed at interpreter exit if the caller did not (a weak reference: the hook keeps nothing alive).
        self._atexit = _close_at_exit(weakref.ref(self))
        atexit.register(self._atexit)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        hd_num: int | None = None,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        **engine_kwargs: Any,
    ) -> VllmRunner:
        """The engine for a checkpoint folder (``HD4K.from_pretrained(path, engine="vllm", ...)`` calls
        this); see the class for the options."""
        return cls(
            path,
            hd_num=hd_num,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            max_model_len=max_model_len,
            **engine_kwargs,
        )

    # -- engine plumbing ---------------------------------------------------------------------------
    def _engine_args(self, *, hd_num: int, **kwargs: Any) -> Any:
        kwargs.setdefault("enable_prefix_caching", True)
        kwargs.setdefault("disable_log_stats", True)
        if "structured_outputs_config" not in kwargs:
            # Compact JSON for response formats, as in the native engine: xgrammar reads this engine-level
            # flag, not the request's (free whitespace lets a model spend its whole budget on blanks).
            from vllm.config import StructuredOutputsConfig

            config = StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
            kwargs["structured_outputs_config"] = config
        try:
            return AsyncEngineArgs(model=str(self._path), mm_processor_kwargs={"hd_num": hd_num}, **kwargs)
        except TypeError as err:
            raise InputError(f"Unknown vLLM engine option: {err}. See vllm.AsyncEngineArgs for valid ones.") from err

    async def _start(self, engine_args: Any) -> Any:
        try:
            return AsyncLLM.from_engine_args(engine_args)
        except Exception as err:
            raise VllmEngineError(f"vLLM's engine did not start for {self._path}: {err}") from err

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the engine loop and wait for its result in this thread."""
        if self._closed:
            coro.close()
            raise VllmEngineError("This VllmRunner is closed; create a new one.")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # Interrupted while waiting (Ctrl-C): cancelling the task aborts its vLLM requests.
            future.cancel()
            raise

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        with contextlib.suppress(RuntimeError):
            self._loop.close()

    # -- Runner protocol ---------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def context_length(self) -> int:
        return self._max_len

    def close(self) -> None:
        """Shut vLLM's engine process down and stop the loop thread (idempotent)."""
        if self._closed:
            return
        if (hook := getattr(self, "_atexit", None)) is not None:
            atexit.unregister(hook)
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is not None:

            async def shutdown() -> None:
                # vLLM's default grace period (5 s) is the engine process's own wait for its worker: on a
                # busy machine the engine process is then killed before it frees its shared memory.
                engine.shutdown(timeout=SHUTDOWN_TIMEOUT_S)

            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=SHUTDOWN_TIMEOUT_S + 30)
            # Collected now, while the interpreter is whole (AsyncLLM.__del__ shuts down again and fails
            # during interpreter teardown).
            del engine
            gc.collect()
        self._closed = True
        self._stop_loop()

    def __enter__(self) -> VllmRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult:
        return self._call(self._run(request, emit=None, cancel=cancel))

    def stream(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> TextStream:
        return stream_in_thread(lambda emit, ev: self._call(self._run(request, emit=emit, cancel=ev)), cancel)

    def generate_batch(
        self, requests: Sequence[GenerationRequest], *, cancel: threading.Event | None = None
    ) -> list[RunnerResult]:
        """All ``requests`` submitted at once (vLLM batches them); results in the same order.

        Every request is validated before any is submitted, so a bad one costs nothing. ``cancel`` stops
        all of them between two steps (each result then has ``finish_reason="cancelled"``).
        """
        prepared = [self._prepare(r) for r in requests]

        async def run_all() -> list[RunnerResult]:
            return list(await asyncio.gather(*(self._submit(p, emit=None, cancel=cancel) for p in prepared)))

        return self._call(run_all())

    # -- one request -------------------------------------------------------------------------------
    def _prepare(self, request: GenerationRequest) -> _Prepared:
        """Validate ``request`` and build vLLM's prompt (raises before anything is submitted)."""
        if request.generation.num_beams > 1:
            raise InputError(
                f'engine="vllm" does not do beam search (num_beams={request.generation.num_beams}): pass '
                'generation={"num_beams": 1} (greedy) or sampling options, or use the native engine for beams.'
            )
        plans = request.plans()
        hd_nums = [p.hd_num for p in plans]
        prompt = self.family.conversation_prompt(request.messages, request.layout)
        bos_each_part = request.layout == "chat"
        needed = self.family.check_context(
            self._tokenizer,
            prompt,
            [p.num_tokens for p in plans],
            max_length=self._max_len,
            image_sizes=[(p.width, p.height) for p in plans],
            hd_num=hd_nums[0] if len(set(hd_nums)) == 1 else None,
            bos_each_part=bos_each_part,
        )
        # Room left in the context for the answer, as in the native runner.
        max_tokens = max(1, min(request.generation.max_new_tokens, self._max_len - needed))
        # The plugin's processor tiles each image at its hd_num and applies the layout's BOS rule.
        engine_input: dict[str, Any] = {"prompt": prompt, "mm_processor_kwargs": {"layout": request.layout}}
        if plans:
            engine_input["multi_modal_data"] = {"image": request.images}
            engine_input["mm_processor_kwargs"]["hd_num"] = hd_nums
            # The request's own plans (this process runs vLLM's processor): it tiles them, never re-plans.
            engine_input["mm_processor_kwargs"]["hd_plans"] = tuple(plans)
        params = _sampling_params(request.generation, max_tokens, self._stop_ids, request.constraint)
        return _Prepared(request, plans, engine_input, params, needed)

    async def _run(self, request: GenerationRequest, *, emit: Callable[[str], None] | None, cancel) -> RunnerResult:
        return await self._submit(self._prepare(request), emit=emit, cancel=cancel)

    async def _submit(
        self, prep: _Prepared, *, emit: Callable[[str], None] | None, cancel: threading.Event | None
    ) -> RunnerResult:
        t_start = time.perf_counter()
        # Deltas of the *stripped* answer, so that joined they equal the non-streamed text (as natively).
        deltas, trim, pieces = TextDeltas(self._tokenizer), StopFilter(), []

        def send(text: str) -> None:
            if emit is not None and (piece_text := trim.feed(text)):
                pieces.append(piece_text)
                emit(piece_text)

        run = _Collected(prompt_tokens=prep.num_prompt_tokens)
        if not (cancel is not None and cancel.is_set()):
            await self._collect(prep, run, lambda new: send(deltas.feed(new)), cancel)
        else:
            run.cancelled = True
        if run.tokens and run.tokens[-1] in self._stop_ids and run.finish == "stop":
            run.tokens = run.tokens[:-1]  # as the native loop: the stop token is not part of the answer
        if emit is not None:
            send(deltas.finish())
            if tail := trim.finish():
                pieces.append(tail)
                emit(tail)
            text = "".join(pieces)
        else:
            text = decode_output(self._tokenizer, run.tokens)
        return self._result(prep, run, text, t_start)

    async def _collect(
        self, prep: _Prepared, run: _Collected, on_tokens: Callable[[list[int]], None], cancel: threading.Event | None
    ) -> None:
        """Run one request on the engine, collecting its tokens into ``run`` (new non-stop ids go to
        ``on_tokens``); a cancel or an engine abort aborts the request and marks ``run`` cancelled."""
        request_id = f"hd4k-{next(self._ids)}"
        watcher = asyncio.ensure_future(self._watch(cancel)) if cancel is not None else None
        try:
            async for out in self._engine.generate(prep.engine_input, prep.params, request_id):
                if out.prompt_token_ids is not None:
                    run.prompt_tokens = len(out.prompt_token_ids)
                piece = out.outputs[0]
                if piece.token_ids:
                    if run.first_token_at is None:
                        run.first_token_at = time.perf_counter()
                    g = prep.request.generation
                    if g.logprobs and piece.logprobs:  # the stop token's entry is left out, as natively
                        entries = _logprob_entries(self._tokenizer, piece.token_ids, piece.logprobs, g.top_logprobs)
                        run.logprobs.extend(
                            e for t, e in zip(piece.token_ids, entries, strict=False) if int(t) not in self._stop_ids
                        )
                    run.tokens.extend(int(t) for t in piece.token_ids)
                    on_tokens([int(t) for t in piece.token_ids if int(t) not in self._stop_ids])
                if out.finished:
                    run.finish = piece.finish_reason or "stop"
                if cancel is not None and cancel.is_set():
                    run.cancelled = True
                    break
        except asyncio.CancelledError:
            raise
        except HD4KError:
            raise
        except Exception as err:
            raise _engine_error(err) from err
        finally:
            if watcher is not None:
                watcher.cancel()
        if run.cancelled or run.finish == "abort":
            with contextlib.suppress(Exception):
                await self._engine.abort(request_id)
            run.cancelled = True

    def _result(self, prep: _Prepared, run: _Collected, text: str, t_start: float) -> RunnerResult:
        """The answer with its usage and timings (prefill until the first token, decode after it)."""
        end = time.perf_counter()
        first = run.first_token_at or end
        decode_s = end - first
        n = len(run.tokens)
        timings = Timings(
            load_s=self.load_seconds,
            prefill_s=first - t_start,
            decode_s=decode_s,
            decode_tokens_per_s=(n - 1) / decode_s if decode_s > 0 and n > 1 else 0.0,
            total_s=end - t_start,
        )
        usage = Usage(
            prompt_tokens=run.prompt_tokens, image_tokens=sum(p.num_tokens for p in prep.plans), completion_tokens=n
        )
        finish_reason = "cancelled" if run.cancelled else ("stop" if run.finish == "stop" else "length")
        if prep.request.constraint is not None and finish_reason == "length":
            try:
                loads_json(text)
            except OutputParseError as err:
                raise StructuredOutputTruncatedError(
                    f"The JSON answer did not fit in max_new_tokens={max(1, n)} (vLLM's structured "
                    "outputs stopped before the object was complete); allow more new tokens (max_tokens)."
                ) from err
        return RunnerResult(
            text=text.strip(),
            model=self.model_id,
            finish_reason=finish_reason,
            plans=[PlanSummary.from_plan(p) for p in prep.plans],
            usage=usage,
            timings=timings,
            logprobs=run.logprobs if prep.request.generation.logprobs else None,
        )

    @staticmethod
    async def _watch(cancel: threading.Event) -> None:
        while not cancel.is_set():
            await asyncio.sleep(0.02)


@dataclass
class _Collected:
    """What one engine request produced: its token ids, how it finished, the prompt length vLLM counted."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    finish: str = "length"
    first_token_at: float | None = None
    cancelled: bool = False
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with logprobs=True: one per answer token


def _close_at_exit(ref: weakref.ReferenceType[VllmRunner]) -> Callable[[], None]:
    def hook() -> None:
        runner = ref()
        if runner is not None:
            runner.close()

    return hook


class _Prepared:
    """A validated request: its plans, vLLM's prompt dict and sampling parameters."""

    def __init__(self, request: GenerationRequest, plans: list, engine_input: Any, params: Any, n: int) -> None:
        self.request = request
        self.plans = plans
        self.engine_input = engine_input
        self.params = params
        self.num_prompt_tokens = n


def _engine_error(err: Exception) -> HD4KError:
    """A typed error for a failure inside vLLM: our own error where the plugin raised one (e.g. an hd_num
    over the engine's budget), vLLM's validation errors as input problems, anything else as an engine
    failure."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, HD4KError):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = f"{type(err).__name__}: {err}"
    cause = err.__cause__
    if cause is not None:
        text += f" (caused by {type(cause).__name__}: {cause})"
    if type(err).__name__ in {"VLLMValidationError", "VLLMClientError", "ValueError"}:
        return InputError(f"vLLM refused the request: {text}")
    return VllmEngineError(f"vLLM's engine failed on the request: {text}")
