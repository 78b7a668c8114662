"""Runners: one object that owns a model and answers a conversation with images.

``Runner`` is the protocol; :class:`LocalRunner` runs the native model in this process and
``hd4k_tools.remote.RemoteRunner`` talks to an OpenAI-compatible server. Both take a
:class:`GenerationRequest` (messages whose content mixes text and already-loaded RGB images, one
resolved ``hd_num`` per image, generation settings) and return a :class:`RunnerResult`.

Concurrency: a :class:`LocalRunner` serialises model calls with a lock, so concurrent callers queue and
each call gets its own KV cache — and therefore exactly the answer it would get alone.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from PIL import Image

from hd4k_tools.errors import HD4KError, InputError
from hd4k_tools.generation_config import GenerationConfig
from hd4k_tools.stops import StopFilter
from hd4k_tools.tasks import Layout, PlanSummary, Timings, Usage
from hd4k_tools.tiling import HDPlan, plan

if TYPE_CHECKING:  # pragma: no cover
    from hd4k_tools.embedding_cache import ImageEmbeddingCache
    from hd4k_tools.kv_prefix_cache import PrefixKVCache
    from hd4k_tools.models.xcomposer2_4khd import LoadedModel

Role = Literal["system", "user", "assistant"]
Part = str | Image.Image


@dataclass(frozen=True)
class Message:
    """One turn: text and images in the order they appear."""

    role: Role
    content: tuple[Part, ...]

    @classmethod
    def user(cls, *parts: Part) -> Message:
        return cls("user", tuple(parts))

    @property
    def text(self) -> str:
        return "".join(p for p in self.content if isinstance(p, str))

    @property
    def images(self) -> list[Image.Image]:
        return [p for p in self.content if isinstance(p, Image.Image)]


@dataclass(frozen=True)
class GenerationRequest:
    """What a runner is asked: messages, one ``hd_num`` per image (in order), generation settings.

    ``layout="chat"`` is the official ``chat()`` format (meta instruction as system turn, images inside
    the user turn, BOS before every text part). ``layout="eval"`` is the authors' evaluation format
    (BOS, the images, then the user turn; no system prompt). Remote runners leave layout to the server.
    """

    messages: tuple[Message, ...]
    hd_nums: tuple[int, ...] = ()
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    layout: Layout = "chat"

    @property
    def images(self) -> list[Image.Image]:
        return [img for m in self.messages for img in m.images]

    def plans(self) -> list[HDPlan]:
        images = self.images
        if len(images) != len(self.hd_nums):
            raise InputError(f"{len(images)} images but {len(self.hd_nums)} hd_num values; give one per image.")
        return [plan(img.width, img.height, n) for img, n in zip(images, self.hd_nums, strict=True)]


@dataclass
class RunnerResult:
    """A runner's answer."""

    text: str
    model: str
    finish_reason: str = "stop"
    plans: list[PlanSummary] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)


class TextStream:
    """An iterator of text deltas; after it is exhausted, :attr:`result` holds the full answer.

    Closing it early (``close()``, ``break`` out of a ``for`` loop and dropping it) cancels the
    generation between two tokens.
    """

    def __init__(self, deltas: Iterator[str], result_box: list[RunnerResult], cancel: threading.Event) -> None:
        self._deltas = deltas
        self._box = result_box
        self._cancel = cancel
        self._exhausted = False

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._deltas)
        except StopIteration:
            self._exhausted = True
            raise

    @property
    def result(self) -> RunnerResult | None:
        return self._box[0] if self._box else None

    def close(self) -> None:
        # A finished stream leaves ``cancel`` alone: the caller's event may go on to guard more work
        # (e.g. the next page of a document).
        if not self._exhausted:
            self._cancel.set()
        close = getattr(self._deltas, "close", None)
        if close is not None:
            close()


@runtime_checkable
class Runner(Protocol):
    """What every backend offers."""

    @property
    def model_id(self) -> str: ...

    @property
    def context_length(self) -> int:
        """Total tokens (prompt, images and answer) one call may use."""
        ...

    def count_text_tokens(self, text: str) -> int:
        """Tokens of ``text`` (an estimate where the tokenizer is remote)."""
        ...

    def generate(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult: ...

    def stream(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> TextStream: ...

    def close(self) -> None: ...


def stream_in_thread(
    produce: callable,  # type: ignore[valid-type]
    cancel: threading.Event | None,
) -> TextStream:
    """Run ``produce(emit, cancel) -> RunnerResult`` in a worker thread and expose its deltas.

    The worker owns the model call from start to end (and any lock it takes), so a consumer that
    stops reading can never leave a lock held: closing the stream sets ``cancel`` and the worker
    returns at the next token.
    """
    cancel = cancel or threading.Event()
    q: queue.Queue[tuple[str, object]] = queue.Queue()
    box: list[RunnerResult] = []

    def work() -> None:
        try:
            result = produce(lambda delta: q.put(("delta", delta)), cancel)
            box.append(result)
            q.put(("done", None))
        except BaseException as err:  # handed to the consumer's thread and re-raised there
            q.put(("error", err))

    worker = threading.Thread(target=work, name="hd4k-stream", daemon=True)
    worker.start()

    def deltas() -> Iterator[str]:
        done = False
        try:
            while True:
                kind, value = q.get()
                if kind == "delta":
                    yield value  # type: ignore[misc]
                elif kind == "error":
                    done = True
                    raise value  # type: ignore[misc]
                else:
                    done = True
                    return
        finally:
            if not done:  # abandoned mid-stream: stop the worker at its next token
                cancel.set()
            worker.join()

    return TextStream(deltas(), box, cancel)


def prompt_text(request: GenerationRequest) -> str:
    """The prompt string of ``request`` with one ``<ImageHere>`` per image, in its layout (``chat``: the
    official chat turns; ``eval``: the authors' evaluation layout). Shared by every in-process engine."""
    from hd4k_tools.models.xcomposer2_4khd.prompt import (
        DEFAULT_META_INSTRUCTION,
        IMAGE_PLACEHOLDER,
        build_prompt,
    )

    def render(m: Message) -> str:
        return "".join(IMAGE_PLACEHOLDER if isinstance(p, Image.Image) else p for p in m.content)

    messages = list(request.messages)
    for m in messages:
        if any(isinstance(p, str) and IMAGE_PLACEHOLDER in p for p in m.content):
            # Text is untrusted: a literal marker would take an image's place in the prompt.
            raise InputError(
                f"The {m.role} text contains {IMAGE_PLACEHOLDER}, which marks where an image goes in this "
                "model's prompt; pass images as image parts and remove the marker from the text."
            )
    if not messages or messages[-1].role != "user":
        raise InputError("The conversation must end with a user message (the question to answer).")
    if request.layout == "eval":
        # Authors' evaluation layout: BOS, the images, then the user turn (spec §4, VLMEvalKit).
        images = "".join(IMAGE_PLACEHOLDER for _ in messages[-1].images)
        return images + build_prompt(messages[-1].text, meta_instruction="")
    meta = DEFAULT_META_INSTRUCTION
    if messages[0].role == "system":
        meta = messages.pop(0).text
    history: list[tuple[str, str]] = []
    pending_user: str | None = None
    for m in messages[:-1]:
        if m.role == "system":
            raise InputError("A system message is only allowed as the first message.")
        if m.role == "user":
            if pending_user is not None:  # two user turns in a row: join them
                pending_user += "\n" + render(m)
            else:
                pending_user = render(m)
        else:
            history.append((pending_user or "", render(m)))
            pending_user = None
    query = render(messages[-1]) if pending_user is None else pending_user + "\n" + render(messages[-1])
    return build_prompt(query, history=history, meta_instruction=meta)


# ----------------------------------------------------------------------------------------------------
# Local runner: the native model in this process
# ----------------------------------------------------------------------------------------------------
class LocalRunner:
    """Runs the native InternLM-XComposer2-4KHD model loaded by ``load_pretrained``.

    Model calls are serialised by a lock. Vision outputs are cached by (image content, hd_num, dtype,
    device), and the decoder K/V of the prompt up to its last image by that prefix's exact content
    (:mod:`hd4k_tools.kv_prefix_cache`), so a second question about the same image skips the vision tower
    and the prefill over the image tokens.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        model_id: str | None = None,
        embedding_cache: ImageEmbeddingCache | None = None,
        cache_bytes: int = 1 << 30,
        prefix_cache: PrefixKVCache | None = None,
        prefix_cache_bytes: int = 2 << 30,
    ) -> None:
        """``cache_bytes`` bounds the image-embedding cache, ``prefix_cache_bytes`` the prefix KV cache
        (decoder K/V up to the last image, on the model's device; 0 disables it). Pass ready caches to
        share or inspect them."""
        from hd4k_tools.embedding_cache import ImageEmbeddingCache
        from hd4k_tools.kv_prefix_cache import PrefixKVCache

        self._loaded = loaded
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        self._model_id = model_id or str(loaded.path)
        self._lock = threading.Lock()
        self.embedding_cache = embedding_cache if embedding_cache is not None else ImageEmbeddingCache(cache_bytes)
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixKVCache(prefix_cache_bytes)
        self.load_seconds = float(getattr(loaded, "load_seconds", 0.0))

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        quantization: str | None = None,
        progress: bool | None = None,
        cancel: threading.Event | None = None,
        cache_bytes: int = 1 << 30,
        prefix_cache_bytes: int = 2 << 30,
    ) -> LocalRunner:
        """Load a checkpoint folder or hub id (see ``load_pretrained``) and wrap it."""
        from hd4k_tools.models.xcomposer2_4khd import load_pretrained

        loaded = load_pretrained(
            path_or_hub_id, dtype=dtype, device=device, quantization=quantization, progress=progress, cancel=cancel
        )
        return cls(
            loaded, model_id=str(path_or_hub_id), cache_bytes=cache_bytes, prefix_cache_bytes=prefix_cache_bytes
        )

    # -- Runner protocol ---------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def context_length(self) -> int:
        return int(self._loaded.config.max_length)

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    def count_text_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_bos=False))

    def close(self) -> None:
        self.embedding_cache.clear()
        self.prefix_cache.clear()  # K/V entries may hold GBs (of GPU memory)

    def generate(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult:
        return self._run(request, emit=None, cancel=cancel)

    def stream(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> TextStream:
        return stream_in_thread(lambda emit, ev: self._run(request, emit=emit, cancel=ev), cancel)

    # -- the pipeline ------------------------------------------------------------------------------
    def prompt_text(self, request: GenerationRequest) -> str:
        """The prompt string with one ``<ImageHere>`` per image, in the request's layout."""
        return prompt_text(request)

    def _run(self, request: GenerationRequest, *, emit, cancel: threading.Event | None) -> RunnerResult:
        import torch

        from hd4k_tools.generation import generate, iter_tokens, stop_ids_for, stream_text
        from hd4k_tools.imaging import image_content_hash
        from hd4k_tools.kv_prefix_cache import split_at_last_image, suffix_inputs
        from hd4k_tools.models.xcomposer2_4khd.prompt import assemble_inputs, check_context
        from hd4k_tools.tiling import to_model_inputs

        t_start = time.perf_counter()
        plans = request.plans()
        images = request.images
        prompt = self.prompt_text(request)
        bos_each_part = request.layout == "chat"
        max_length = self.context_length
        # Checked before the vision tower runs, so an overflow costs nothing (spec §4: max_length).
        hd_nums = {p.hd_num for p in plans}
        needed = check_context(
            self._tokenizer,
            prompt,
            [p.num_tokens for p in plans],
            max_length=max_length,
            image_sizes=[(p.width, p.height) for p in plans],
            hd_num=hd_nums.pop() if len(hd_nums) == 1 else None,
            bos_each_part=bos_each_part,
        )
        budget = needed + request.generation.max_new_tokens
        model = self._model
        param = next(model.parameters())
        dtype, device = param.dtype, param.device
        hashes = [image_content_hash(img) for img in images]
        # The prompt up to the end of its last image: its decoder K/V may be cached (None: no image, or
        # nothing after the last image).
        split = split_at_last_image(self._tokenizer, prompt, [p.num_tokens for p in plans], bos_each_part=bos_each_part)
        prefix_key = (
            split.key([(h, p.hd_num) for h, p in zip(hashes, plans, strict=True)], dtype, device)
            if split is not None
            else None
        )
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            hits_before = self.embedding_cache.hits
            embedding_keys = [(h, p.hd_num, str(dtype), str(device)) for h, p in zip(hashes, plans, strict=True)]
            prefix = self.prefix_cache.get(prefix_key) if prefix_key is not None else None
            on_prefill = None
            if prefix is not None:
                # Prefix hit: the images live in the cached K/V, so neither the vision tower nor their
                # embeddings are needed; only the text after the last image is prefilled. Exact, because
                # attention is causal (the prefix K/V do not depend on later tokens) and Partial LoRA
                # applied to the image positions inside the prefix exactly as in a full prefill (spec
                # §3.2-3.3; kv_prefix_cache). The embedding entries are kept warm (they are far smaller
                # and outlive an evicted prefix).
                for key in embedding_keys:
                    self.embedding_cache.touch(key)
                vision_s = time.perf_counter() - t0
                inputs = suffix_inputs(model, split)
            else:
                embeds = []
                for img, p, key in zip(images, plans, embedding_keys, strict=True):

                    def compute(img: Image.Image = img, p: HDPlan = p) -> torch.Tensor:
                        inputs = to_model_inputs(img, p.hd_num, dtype=dtype)
                        return model.encode_image(inputs)

                    embeds.append(self.embedding_cache.get_or_compute(key, compute))
                vision_s = time.perf_counter() - t0
                inputs = assemble_inputs(
                    model, self._tokenizer, prompt, embeds, max_length=max_length, bos_each_part=bos_each_part
                )
                if prefix_key is not None and inputs.length == split.total_length:
                    # Keep the prefix's K/V after this call's prefill for the next question.
                    on_prefill = self.prefix_cache.capture(prefix_key, split.prefix_length)
            prompt_len = inputs.length + (prefix.length if prefix is not None else 0)
            stop_ids = stop_ids_for(self._tokenizer)
            config = request.generation
            if budget > max_length:
                # Leave room in the context for the answer rather than overflowing mid-generation.
                config = config.replace(max_new_tokens=max(1, max_length - prompt_len))
            cache_args = {"prefix": prefix, "on_prefill": on_prefill}
            if emit is None:
                out = generate(model, inputs, config, stop_ids=stop_ids, cancel=cancel, **cache_args)
                text = self._tokenizer_text(out.token_ids)
            else:
                out_box: list = []
                pieces: list[str] = []
                tokens = iter_tokens(
                    model, inputs, config, stop_ids=stop_ids, cancel=cancel, output=out_box, **cache_args
                )
                # Deltas of the *stripped* answer, so that joined they equal the non-streamed text.
                trim = StopFilter()
                for delta in stream_text(self._tokenizer, tokens):
                    if piece := trim.feed(delta):
                        pieces.append(piece)
                        emit(piece)
                if tail := trim.finish():
                    pieces.append(tail)
                    emit(tail)
                out = out_box[0]
                text = "".join(pieces)
        timings = Timings(
            load_s=self.load_seconds,
            vision_s=vision_s,
            prefill_s=out.prefill_seconds,
            decode_s=out.decode_seconds,
            decode_tokens_per_s=out.tokens_per_second,
            total_s=time.perf_counter() - t_start,
            vision_cache_hits=self.embedding_cache.hits - hits_before,
            prefix_cache_hit=prefix is not None,
        )
        usage = Usage(
            prompt_tokens=prompt_len,
            image_tokens=sum(p.num_tokens for p in plans),
            completion_tokens=out.num_generated_tokens,
        )
        return RunnerResult(
            text=text.strip(),
            model=self.model_id,
            finish_reason=out.finish_reason,
            plans=[PlanSummary.from_plan(p) for p in plans],
            usage=usage,
            timings=timings,
        )

    def _tokenizer_text(self, token_ids: Sequence[int]) -> str:
        from hd4k_tools.generation import decode_output

        return decode_output(self._tokenizer, token_ids)


__all__ = [
    "GenerationRequest",
    "HD4KError",
    "LocalRunner",
    "Message",
    "Runner",
    "RunnerResult",
    "TextStream",
    "prompt_text",
    "stream_in_thread",
]
