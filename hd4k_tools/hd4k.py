"""``HD4K``: the one object users hold.

It turns sources (paths, bytes, URLs, data URLs, PIL images, PDFs) into safe images, picks an HD-N
budget per task, runs a :class:`~hd4k_tools.runtime.runner.Runner` (the native model in process, or a remote
OpenAI-compatible server) and returns pydantic results. Every method has an async twin (``a`` prefix)
and a streaming twin (``stream_`` / ``astream_`` prefix). Every task runs through one path,
:meth:`HD4K.run_task` (``stream_task``, ``arun_task``, ``astream_task``), driven by its
:class:`~hd4k_tools.tasks.TaskSpec`; ``read_document``, ``answer_chart_question`` and ``describe_image`` are
thin wrappers of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, Unpack

from PIL import Image

from hd4k_tools.errors import InputError
from hd4k_tools.inputs.images import ImageSource, load_image, read_source_bytes
from hd4k_tools.inputs.pdf import render_pages, select_pages
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.models.registry import DEFAULT_FAMILY, HDNum, HDPlan, ModelFamily
from hd4k_tools.results import ChartResult, DocumentResult, TaskResult, Timings, Usage, thumbnail_data_url
from hd4k_tools.runtime.engines import load_engine
from hd4k_tools.runtime.generation_config import (
    GENERATION_OPTIONS,
    GenerationConfig,
    GenerationOptions,
    merge_generation,
)
from hd4k_tools.runtime.remote import RemoteRunner
from hd4k_tools.runtime.runner import (
    BatchRunner,
    GenerationRequest,
    Message,
    Runner,
    RunnerResult,
    TextStream,
    generate_all,
)
from hd4k_tools.tasks import TASKS, TaskCall, TaskSpec
from hd4k_tools.zoom import (
    Region,
    Window,
    check_region,
    check_windows,
    compose_region,
    crop_region,
    detail_loss,
    merge_window_texts,
    plan_windows,
    snap_region,
    sub_region,
)

T = TypeVar("T")
GenerationArg = GenerationConfig | Mapping[str, Any] | None

# Pages of a PDF submitted together to a batching engine (BatchRunner).
PAGE_BATCH = 16
# Names whose home moved to the family's tiling, still importable from here.
_MOVED = ("plan_images", "MAX_AUTO_HD_NUM", "TEXT_MARGIN")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(DEFAULT_FAMILY.module("tiling"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass(frozen=True)
class _TaskJob:
    """One task call's fixed parts, the same for every image, page or window it reads."""

    spec: TaskSpec
    call: TaskCall
    hd_num: HDNum | None
    generation: GenerationArg


def _forwarded(arguments: dict[str, Any]) -> dict[str, Any]:
    """A named task method's own arguments (its ``locals()`` on entry) as keywords of ``run_task`` /
    ``stream_task``: ``self`` left out and the generation keywords spread, so a wrapper cannot drop one."""
    keywords = {k: v for k, v in arguments.items() if k not in ("self", "generation_options")}
    return {**keywords, **arguments.get("generation_options", {})}


def _check_chat_args(prompt: object, images: object, history: object, system: object) -> None:
    """Typed errors for wrong Python types in a chat call (they would otherwise be read as images)."""
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a str, got {type(prompt).__name__}.")
    if system is not None and not isinstance(system, str):
        raise InputError(f"system must be a str or None, got {type(system).__name__}.")
    if isinstance(images, str | bytes) or not isinstance(images, Sequence):
        raise InputError(f"images must be a list of image sources, got {type(images).__name__}; wrap one in [...].")
    if isinstance(history, str | bytes) or not isinstance(history, Sequence):
        raise InputError(f"history must be a list of (question, answer) pairs, got {type(history).__name__}.")
    for i, turn in enumerate(history):
        if isinstance(turn, str) or not (
            isinstance(turn, Sequence) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
        ):
            raise InputError(f"history[{i}] must be a (question, answer) pair of str, got {turn!r:.80}.")


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
    ) -> None:
        self.runner = runner
        self.policy = policy or ImagePolicy()
        self.dpi = dpi
        self.max_pdf_pages = max_pdf_pages

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str,
        *,
        engine: str = "native",
        policy: ImagePolicy | None = None,
        dpi: int = 200,
        max_pdf_pages: int = 200,
        **engine_options: Any,
    ) -> HD4K:
        """Load a checkpoint folder or hub id on an engine (downloaded where there is internet; offline,
        the error says how to fetch the weights and pass the folder).

        ``engine="native"`` (default) runs the model in this process; its options are ``device``,
        ``dtype``, ``quantization``, ``progress``, ``cache_bytes`` (image-embedding cache) and
        ``prefix_cache_bytes`` (decoder K/V kept for follow-up questions; 0 turns it off), and for a hub id
        ``revision``, ``token``, ``cache_dir``, ``local_files_only`` (``$HF_HUB_OFFLINE=1`` works too), as
        in ``transformers``; ``families`` (both engines) is the model-family registry the checkpoint is
        looked up in (``FAMILIES.with_family(family)`` for one of your own, ``models/registry.py``).
        ``dtype="auto"`` is the checkpoint's dtype (bfloat16 for the official one: about 2 bytes per
        parameter in memory, also on a CPU). ``engine="vllm"`` runs it on vLLM (see the
        README, "Serve at scale"). An option the engine does
        not take is refused, never ignored.
        """
        runner = load_engine(engine, str(path_or_hub_id), **engine_options)
        return cls(runner, policy=policy, dpi=dpi, max_pdf_pages=max_pdf_pages)

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
        runner_kwargs = {k: v for k, v in kwargs.items() if k not in ("dpi", "max_pdf_pages")}
        own = {k: v for k, v in kwargs.items() if k in ("dpi", "max_pdf_pages")}
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
        # num_beams > 1 still reaches it and is refused there, never decoded greedily in silence.
        beams = spec.num_beams if getattr(self.runner, "supports_beam_search", True) else 1
        base = GenerationConfig(max_new_tokens=spec.max_new_tokens, num_beams=beams)
        if generation is None:
            return base
        if isinstance(generation, GenerationConfig):
            return generation
        if not isinstance(generation, Mapping) or not all(isinstance(k, str) for k in generation):
            raise InputError(
                f"generation must be a GenerationConfig or a mapping of option names to values, got "
                f"{type(generation).__name__}; e.g. generation={{'max_new_tokens': 256}}."
            )
        try:
            return dataclasses.replace(base, **dict(generation))
        except TypeError as err:
            raise InputError(f"Unknown generation option: {err}. Valid: {list(base.__dataclass_fields__)}") from err

    def plan(
        self,
        images: Sequence[Image.Image],
        hd_num: HDNum | Sequence[HDNum] | None,
        spec: TaskSpec,
        gen: GenerationConfig,
        *,
        text_tokens: int | None = None,
    ) -> tuple[HDPlan, ...]:
        """The HD plans of ``images`` for a task: :func:`plan_images` against this runner's context, with
        ``text_tokens`` of prompt reserved (``None``: the fixed ``TEXT_MARGIN``; requests count theirs)."""
        return self.family.plan_images(
            images,
            hd_num,
            default_hd_num=spec.default_hd_num,
            context_length=self.runner.context_length,
            max_new_tokens=gen.max_new_tokens,
            **({} if text_tokens is None else {"text_tokens": text_tokens}),
        )

    def _planned(
        self, messages: Sequence[Message], hd_num: HDNum | Sequence[HDNum] | None, spec: TaskSpec, gen: GenerationConfig
    ) -> GenerationRequest:
        """The request of ``messages``, each image planned once, reserving the prompt's own text tokens."""
        messages = tuple(messages)
        images = [img for m in messages for img in m.images]
        values = hd_num if isinstance(hd_num, list | tuple) else [hd_num]
        auto = any(str(spec.default_hd_num if v is None else v).strip().lower() == "auto" for v in values)
        # Only "auto" needs the prompt's length (rendering it here also checks it; the engine does that anyway).
        text = (
            self.family.prompt_text_tokens(self.runner.count_text_tokens, messages, spec.layout)
            if images and auto
            else 0
        )
        plans = self.plan(images, hd_num, spec, gen, text_tokens=text)
        return GenerationRequest.planned(messages, plans, generation=gen, layout=spec.layout)

    @property
    def family(self) -> ModelFamily:
        """The model family of the runner (``models/registry.py``): its prompt layout and planner."""
        family = getattr(self.runner, "family", None)
        return family if isinstance(family, ModelFamily) else DEFAULT_FAMILY

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
        return self._planned((Message.user(image, prompt),), hd_num, spec, self._generation(spec, generation))

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
            warnings=list(getattr(out, "warnings", ())),
            **extra,
        )

    # -- tasks: one generic path -------------------------------------------------------------------
    def _task_job(
        self, task: str | TaskSpec, hd_num: HDNum | None, generation: GenerationArg, options: Mapping[str, Any]
    ) -> _TaskJob:
        """The one request preamble of :meth:`run_task` and :meth:`stream_task`: the spec, the call its options
        make (prompt, parse, fields) and the generation options split out of the keywords."""
        spec = TASKS.get_spec(task)
        generation, options = _split_generation(generation, options)
        return _TaskJob(spec, spec.call(options), hd_num, generation)

    def _task_request(self, job: _TaskJob, image: Image.Image) -> GenerationRequest:
        """The request of one image (or page, or window) of a task call: the one request builder."""
        generation = job.generation
        if job.call.generation and not isinstance(generation, GenerationConfig):
            # The call's defaults (e.g. room for a table) under the caller's options.
            generation = {**job.call.generation, **(generation or {})}
        return self._image_request(job.spec, image, job.call.prompt, job.hd_num, generation)

    def _task_result(
        self,
        job: _TaskJob,
        out: RunnerResult,
        request: GenerationRequest,
        *,
        region: Region | None = None,
        render_dpi: float | None = None,
        **extra: Any,
    ) -> TaskResult:
        spec, call = job.spec, job.call
        fields = {**call.fields, **extra}
        if call.parse is not None:
            fields.update(call.parse(out.text))
        hd_plans = request.hd_plans or tuple(request.plans())
        render_scale = None if render_dpi is None else render_dpi / 72.0
        detail = detail_loss(hd_plans[0], render_scale=render_scale, region=region) if hd_plans else None
        return self._result(spec.result, spec.name, out, request, region=region, detail=detail, **fields)

    def _region_pixels(self, spec: TaskSpec, hd_num: HDNum | None) -> int:
        """About the most pixels a plan at ``hd_num`` keeps: what a PDF region is rendered for."""
        tiling = self.family.module("tiling")
        n = hd_num if isinstance(hd_num, int) else spec.default_hd_num if hd_num is None else tiling.MAX_AUTO_HD_NUM
        return n * tiling.TILE * tiling.TILE

    def _merged_page(
        self, spec: TaskSpec, windows: list[TaskResult], image: Image.Image, region: Region | None, **extra: Any
    ) -> TaskResult:
        """A page read in windows: the windows' texts merged in reading order, their plans, usage and time
        together, the most detail any window lost, and every window's own result. ``region``: the box read
        (snapped to whole pixels); the requested one comes in ``extra`` (``requested_region``)."""
        first = windows[0]
        worst = max((w.detail for w in windows if w.detail is not None), key=lambda d: d.scale, default=None)
        finish = next((w.finish_reason for w in windows if w.finish_reason != "stop"), first.finish_reason)
        return spec.result(
            task=spec.name,
            text=merge_window_texts([w.text for w in windows]),
            model=first.model,
            hd_num=first.hd_num,
            plans=[p for w in windows for p in w.plans],
            usage=Usage(
                prompt_tokens=sum(w.usage.prompt_tokens for w in windows),
                image_tokens=sum(w.usage.image_tokens for w in windows),
                completion_tokens=sum(w.usage.completion_tokens for w in windows),
            ),
            timings=Timings(total_s=sum(w.timings.total_s for w in windows)),
            finish_reason=finish,
            warnings=[m for w in windows for m in w.warnings],
            region=region,
            detail=worst,
            windows=windows,
            thumbnail=thumbnail_data_url(image),
            **extra,
        )

    @staticmethod
    def _refuse_document_options(spec: TaskSpec, document_options: Mapping[str, Any]) -> None:
        given = sorted(k for k, v in document_options.items() if v is not None and k != "region_pixels")
        if given and not spec.documents:
            raise InputError(
                f"{spec.name} reads one image; {', '.join(f'{k}=' for k in given)} "
                "only apply to tasks that read documents (e.g. read_document)."
            )

    def run_task(
        self,
        task: str | TaskSpec,
        source: ImageSource,
        *,
        hd_num: HDNum | None = None,
        generation: GenerationArg = None,
        policy: ImagePolicy | None = None,
        cancel: threading.Event | None = None,
        pages: Any = None,
        dpi: int | None = None,
        progress: bool | None = None,
        max_pages: int | None = None,
        on_page: Callable[[int, int], None] | None = None,
        region: Any = None,
        windows: int | str | None = None,
        **options: Any,
    ) -> TaskResult | DocumentResult:
        """Run any task on ``source``: the one path behind :meth:`read_document`,
        :meth:`answer_chart_question`, :meth:`describe_image` and any :class:`~hd4k_tools.tasks.TaskSpec`.

        ``task`` is a spec or the name of one of :data:`hd4k_tools.tasks.TASKS`; ``options`` are the task's
        own options (``spec.option_names()``, e.g. ``question=`` or ``detail=``) and generation options as
        keywords (:class:`~hd4k_tools.runtime.generation_config.GenerationOptions`: ``max_new_tokens``,
        ``temperature``, ``top_p``, ..., as ``ChatHD4K`` and ``ToolSettings`` take them), which may also come
        as ``generation={...}`` (the same option both ways is a ``ConflictingOptionsError``). A task with
        ``documents=True`` reads an image or a PDF page by page (``pages``, ``dpi``, ``progress``,
        ``max_pages``, ``on_page`` as in :meth:`read_document`) and returns a :class:`DocumentResult`; any
        other task returns one ``spec.result``.

        ``region=[x0, y0, x1, y1]`` (page fractions) reads only that part of the image or page, tiled with the
        whole ``hd_num`` budget; a PDF region is re-rendered from the vector page at a higher scale, so small
        print gains real detail (see :func:`hd4k_tools.inputs.pdf.render_pages`). ``windows="auto"`` or ``N``
        (document tasks) reads a page whose detail would be lost in overlapping windows, batched, and merges
        their texts (:func:`hd4k_tools.zoom.merge_window_texts`); each window's result is in ``windows``.
        Every result reports ``region`` and ``detail`` (:class:`hd4k_tools.zoom.DetailLoss`).
        """
        job = self._task_job(task, hd_num, generation, options)
        region = None if region is None else check_region(region)
        windows = None if windows is None else check_windows(windows)
        document_options = {"pages": pages, "dpi": dpi, "progress": progress, "max_pages": max_pages}
        if job.spec.documents:
            return self._run_document(job, source, policy, cancel, on_page, document_options, region, windows)
        self._refuse_document_options(job.spec, {**document_options, "on_page": on_page, "windows": windows})
        loaded = self.load(source, policy)
        image = crop_region(loaded, region)
        read = None if region is None else snap_region(loaded.width, loaded.height, region)
        request = self._task_request(job, image)
        out = self.runner.generate(request, cancel=cancel)
        return self._task_result(job, out, request, region=read, requested_region=region)

    def _run_document(
        self,
        job: _TaskJob,
        source: ImageSource,
        policy: ImagePolicy | None,
        cancel: threading.Event | None,
        on_page: Callable[[int, int], None] | None,
        document_options: Mapping[str, Any],
        region: Region | None = None,
        windows: int | str | None = None,
    ) -> DocumentResult:
        name, total, page_iter = self._document_pages(
            source,
            policy=policy,
            cancel=cancel,
            region=region,
            region_pixels=self._region_pixels(job.spec, job.hd_num),
            **document_options,
        )
        if on_page is not None:
            on_page(0, total)
        results: list[TaskResult] = []
        # A batching engine gets the pages (and their windows) together (PAGE_BATCH pages at a time, so
        # rendered pages stay bounded); any other runner one by one, each page rendered just before it is read.
        chunk = PAGE_BATCH if isinstance(self.runner, BatchRunner) else 1
        planned_hd = job.spec.default_hd_num if job.hd_num is None else job.hd_num
        while batch := list(itertools.islice(page_iter, chunk)):
            pending = []
            for number, image, render_dpi, box in batch:
                wins = plan_windows(image.width, image.height, planned_hd, windows) if windows is not None else []
                crops = [image.crop(w.box) for w in wins] if len(wins) > 1 else [image]
                requests = [self._task_request(job, crop) for crop in crops]
                pending.append((number, image, render_dpi, box, wins if len(wins) > 1 else [], requests))
            outs = iter(generate_all(self.runner, [r for entry in pending for r in entry[5]], cancel=cancel))
            for number, image, render_dpi, box, wins, requests in pending:
                page = dict(page=number, source=name, render_dpi=render_dpi)
                results.append(
                    self._page_result(job, [next(outs) for _ in requests], requests, image, box, region, wins, page)
                )
                if on_page is not None:
                    on_page(len(results), total)
        return DocumentResult(source=name, pages=results)

    def _page_result(
        self,
        job: _TaskJob,
        outs: list[RunnerResult],
        requests: list[GenerationRequest],
        image: Image.Image,
        box: Region | None,
        region: Region | None,
        wins: list[Window],
        page: dict[str, Any],
    ) -> TaskResult:
        """One page's result: read whole (``wins`` empty), or the merge of its windows, each of which reports
        the box it read (its pixels on the page, in page fractions) and the one planned for it. ``box``: the
        region read (snapped), ``region``: the one asked; ``page``: page number, source and render dpi."""
        boxes = [(sub_region(box, image.size, w.box), compose_region(region, w.region)) for w in wins]
        read = [
            self._task_result(job, out, request, region=b[0], requested_region=b[1], **page)
            for out, request, b in zip(outs, requests, boxes or [(box, region)], strict=True)
        ]
        if not wins:
            return read[0]
        return self._merged_page(
            job.spec, read, image, box, requested_region=region, page=page["page"], source=page["source"]
        )

    def stream_task(
        self,
        task: str | TaskSpec,
        source: ImageSource,
        *,
        hd_num: HDNum | None = None,
        generation: GenerationArg = None,
        policy: ImagePolicy | None = None,
        cancel: threading.Event | None = None,
        pages: Any = None,
        dpi: int | None = None,
        progress: bool | None = None,
        max_pages: int | None = None,
        region: Any = None,
        windows: int | str | None = None,
        **options: Any,
    ) -> Iterator[str]:
        """Text deltas of :meth:`run_task` (a document's pages separated by a blank line). A call whose result
        is parsed from the whole answer (e.g. ``extract_table=True``) cannot stream: :class:`InputError`."""
        job = self._task_job(task, hd_num, generation, options)
        spec = job.spec
        if job.call.parse is not None:
            raise InputError(
                f"This {spec.name} call's result is parsed from the whole answer, so it cannot be streamed; use "
                f"run_task / {spec.name} instead."
            )
        if windows is not None:
            raise InputError("windows= reads a page in several windows and merges them; it cannot stream.")
        region = None if region is None else check_region(region)
        document_options = {"pages": pages, "dpi": dpi, "progress": progress, "max_pages": max_pages}
        if not spec.documents:
            self._refuse_document_options(spec, document_options)
            image = crop_region(self.load(source, policy), region)
            return self.runner.stream(self._task_request(job, image), cancel=cancel)
        document_options = {
            **document_options,
            "region": region,
            "region_pixels": self._region_pixels(spec, job.hd_num),
        }
        return self._stream_document(job, source, policy, cancel, document_options)

    def _stream_document(
        self,
        job: _TaskJob,
        source: ImageSource,
        policy: ImagePolicy | None,
        cancel: threading.Event | None,
        document_options: Mapping[str, Any],
    ) -> Iterator[str]:
        _, _, page_iter = self._document_pages(source, policy=policy, cancel=cancel, **document_options)
        for i, (_, image, _, _) in enumerate(page_iter):
            if i:
                yield "\n\n"
            stream = self.runner.stream(self._task_request(job, image), cancel=cancel)
            try:
                yield from stream
            finally:
                stream.close()

    async def arun_task(self, task: str | TaskSpec, source: ImageSource, **kwargs: Any) -> TaskResult | DocumentResult:
        """Async :meth:`run_task` (in a worker thread; cancelling the awaiting task stops the model)."""
        return await _in_thread(lambda cancel: self.run_task(task, source, cancel=cancel, **kwargs))

    def astream_task(self, task: str | TaskSpec, source: ImageSource, **kwargs: Any) -> AsyncIterator[str]:
        """Async :meth:`stream_task`."""
        return _aiter_stream(lambda cancel: self.stream_task(task, source, cancel=cancel, **kwargs))

    # -- describe_image ----------------------------------------------------------------------------
    def describe_image(
        self,
        source: ImageSource,
        *,
        detail: str = "detailed",
        hd_num: HDNum | None = None,
        generation: GenerationArg = None,
        policy: ImagePolicy | None = None,
        cancel: threading.Event | None = None,
        region: Any = None,
        **generation_options: Unpack[GenerationOptions],
    ) -> TaskResult:
        """Describe an image (``detail="detailed"`` or ``"brief"``); default hd_num 16. ``region=[x0, y0, x1,
        y1]`` (page fractions) looks at that part only, with the whole budget; generation options as keywords
        (``max_new_tokens=64``) or ``generation={...}``. ``run_task("describe_image", ...)``."""
        return self.run_task("describe_image", **_forwarded(locals()))  # type: ignore[return-value]

    def stream_describe_image(
        self,
        source: ImageSource,
        *,
        detail: str = "detailed",
        hd_num: HDNum | None = None,
        generation: GenerationArg = None,
        policy: ImagePolicy | None = None,
        cancel: threading.Event | None = None,
        region: Any = None,
        **generation_options: Unpack[GenerationOptions],
    ) -> TextStream:
        """Text deltas of :meth:`describe_image`."""
        return self.stream_task("describe_image", **_forwarded(locals()))  # type: ignore[return-value]

    # -- answer_chart_question ---------------------------------------------------------------------
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
        region: Any = None,
        **generation_options: Unpack[GenerationOptions],
    ) -> ChartResult:
        """Answer a question about a chart (default hd_num 25, the authors' VQA prompt).

        With ``extract_table=True`` the model is asked for the chart's data as a Markdown table, parsed
        into :attr:`ChartResult.table` (``TableParseError`` if the answer is not a table); the question
        may then be empty. ``run_task("answer_chart_question", ...)``.
        """
        return self.run_task("answer_chart_question", **_forwarded(locals()))  # type: ignore[return-value]

    def stream_answer_chart_question(
        self,
        source: ImageSource,
        question: str,
        *,
        hd_num: HDNum | None = None,
        generation: GenerationArg = None,
        policy: ImagePolicy | None = None,
        cancel: threading.Event | None = None,
        region: Any = None,
        **generation_options: Unpack[GenerationOptions],
    ) -> TextStream:
        """Text deltas of :meth:`answer_chart_question`."""
        return self.stream_task("answer_chart_question", **_forwarded(locals()))  # type: ignore[return-value]

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
        region: Region | None = None,
        region_pixels: int | None = None,
    ) -> tuple[str, int, Iterator[tuple[int | None, Image.Image, float | None, Region | None]]]:
        """(source name, number of pages, iterator of (page number or None, image, PDF render dpi or None, the
        box read or None)) for an image or a PDF; with ``region`` only that part (a PDF's re-rendered, an
        image's cropped), and the box read is ``region`` snapped to whole pixels of the page."""
        policy = policy or self.policy
        if not isinstance(source, Image.Image):
            raw = read_source_bytes(source, policy=policy)
            if raw.kind == "pdf":
                limit = self.max_pdf_pages if max_pages is None else max_pages
                total = len(select_pages(raw, pages, policy=policy, max_pages=limit))
                rendered = render_pages(
                    raw,
                    pages=pages,
                    dpi=self.dpi if dpi is None else dpi,
                    policy=policy,
                    max_pages=limit,
                    progress=progress,
                    cancel=cancel,
                    region=region,
                    region_pixels=region_pixels,
                )
                return raw.name, total, ((p.number, p.image, p.dpi, p.region) for p in rendered)
            name, source = raw.name, raw
        else:
            name = "<image>"
        if pages not in (None, 1, "1", [1], (1,)):
            raise InputError(f"pages={pages!r} was given but {name} is a single image, not a PDF.")
        image = self.load(source, policy)
        box = None if region is None else snap_region(image.width, image.height, region)
        return name, 1, iter([(None, crop_region(image, region), None, box)])

    def document_request(
        self,
        image: Image.Image,
        *,
        hd_num: HDNum | None = None,
        output: str = "markdown",
        generation: GenerationArg = None,
    ) -> GenerationRequest:
        """The request :meth:`read_document` sends for one page ``image`` (hd_num planned, task prompt and
        generation settings), for pipelines that batch pages themselves (``hd4k_tools.ingest``)."""
        spec = TASKS["read_document"]
        return self._task_request(_TaskJob(spec, spec.call({"output": output}), hd_num, generation), image)

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
        on_page: Callable[[int, int], None] | None = None,
        region: Any = None,
        windows: int | str | None = None,
        **generation_options: Unpack[GenerationOptions],
    ) -> DocumentResult:
        """Transcribe a document image or PDF (one result per page; default hd_num 55).

        ``pages`` selects PDF pages (1-based: ``3``, ``"1-3,5"``, ``[1, 2]``); PDFs render at ``dpi``
        (default 200) with a progress bar when interactive (``progress=False`` turns it off).
        ``on_page(done, total)`` is called before the first page (``done=0``) and after each page, e.g. to
        report progress to a client. ``region=[x0, y0, x1, y1]`` reads that part of each page (a PDF's
        re-rendered at a higher scale); ``windows="auto"`` (or a number) reads a page whose detail would be
        lost in overlapping windows and merges their texts (``pages[i].windows`` holds each window's result).
        ``run_task("read_document", ...)``.
        """
        return self.run_task("read_document", **_forwarded(locals()))  # type: ignore[return-value]

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
        region: Any = None,
        **generation_options: Unpack[GenerationOptions],
    ) -> Iterator[str]:
        """Text deltas of :meth:`read_document`, pages separated by a blank line."""
        return self.stream_task("read_document", **_forwarded(locals()))

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
        generation_options: Mapping[str, Any] | None = None,
    ) -> GenerationRequest:
        generation = merge_generation(generation, dict(generation_options or {}))
        _check_chat_args(prompt, images, history, system)
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
        return self._planned(messages, hd_num, spec, self._generation(spec, generation))

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
        **generation_options: Unpack[GenerationOptions],
    ) -> TaskResult:
        """A free prompt with any number of images (placed before the prompt), in the official chat
        format. ``system=None`` uses the model's default meta instruction; ``system=""`` none."""
        request = self._chat_request(prompt, images, hd_num, history, system, generation, policy, generation_options)
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
        **generation_options: Unpack[GenerationOptions],
    ) -> TextStream:
        """Text deltas of :meth:`chat`."""
        request = self._chat_request(prompt, images, hd_num, history, system, generation, policy, generation_options)
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


def _split_generation(generation: GenerationArg, options: Mapping[str, Any]) -> tuple[GenerationArg, dict[str, Any]]:
    """Generation keywords out of a task call's keyword ``options``, merged with ``generation=`` (the one
    place: :func:`merge_generation`); the rest are the task's own options."""
    keywords = {k: v for k, v in options.items() if k in GENERATION_OPTIONS}
    rest = {k: v for k, v in options.items() if k not in GENERATION_OPTIONS}
    return merge_generation(generation, keywords), rest


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
