"""The native engine: IXC2-4KHD in this process, one request at a time.

A call runs four named steps, each a method, so that what a request costs and where batching would go
are visible at a glance:

``prepare``  request -> :class:`Prepared`: the prompt string in the request's layout, one HD plan per
             image, the context check (before any model work, so an overflow costs nothing), image
             hashes and the prefix-cache key.
``encode``   Prepared -> :class:`Encoded`: decoder inputs. A prefix-cache hit reuses the decoder K/V of
             the prompt up to its last image and encodes only the text after it; otherwise every image
             goes through tiling and the vision tower (cached by content, hd_num, dtype and device) and
             is interleaved with the text embeddings.
``decode``   Encoded -> ``GenerationOutput`` and text: greedy, sampling or beams, streamed or whole.
``result``   -> :class:`~hd4k_tools.runtime.runner.RunnerResult` with plans, usage and timings.

Batching: this engine answers one request at a time (``_run_prepared`` holds the model lock for
``encode`` + ``decode``), so it is not a :class:`~hd4k_tools.runtime.runner.BatchRunner` and callers
(``hd4k_tools.runtime.runner.generate_all``) run requests one by one. Batching would go between
``prepare`` and ``decode``: prepare many, pad their ``encode`` outputs into one ``[B, T, D]`` prefill, and
decode the batch with one KV cache of batch size B (the generation loop already takes ``[B, T, D]``
inputs for beams). Engines that batch for real (vLLM) implement ``generate_batch``.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from hd4k_tools.errors import DeviceError, InputError
from hd4k_tools.inputs.images import image_content_hash
from hd4k_tools.models.registry import (
    DEFAULT_FAMILY,
    FamilyRegistry,
    HDPlan,
    LoadedModel,
    ModelFamily,
    PromptInputs,
    family_for_checkpoint,
)
from hd4k_tools.results import PlanSummary, Timings, Usage
from hd4k_tools.runtime.embedding_cache import ImageEmbeddingCache
from hd4k_tools.runtime.generation import (
    GenerationConfig,
    GenerationOutput,
    decode_output,
    generate,
    iter_tokens,
    stop_ids_for,
    stream_text,
    token_logprob,
)
from hd4k_tools.runtime.generation import TokenLogprob as GenLogprob
from hd4k_tools.runtime.kv_prefix_cache import PrefixKey, PrefixKVCache, PromptSplit, split_at_last_image, suffix_inputs
from hd4k_tools.runtime.runner import GenerationRequest, RunnerResult, TextStream, TokenLogprob, stream_in_thread
from hd4k_tools.runtime.stops import StopFilter
from hd4k_tools.runtime.tokenized import TokenizerOwner
from hd4k_tools.structured import StructuredOutputTruncatedError

if TYPE_CHECKING:
    from hd4k_tools.runtime.grammar import GrammarVocabulary, JSONMatcher

Emit = Callable[[str], None]

# The device ran out of memory (torch >= 2.5 names it torch.OutOfMemoryError; torch.cuda's is the same
# class on CUDA builds).
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {e for e in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if e}
)


def smaller_plan(p: HDPlan, family: ModelFamily = DEFAULT_FAMILY) -> HDPlan | None:
    """The plan at the largest ``hd_num`` below ``p.hd_num`` whose tile grid is smaller (fewer tokens),
    or ``None`` when ``p`` is already the smallest (the out-of-memory retry's new plan)."""
    for n in range(p.hd_num - 1, 0, -1):
        (candidate,) = family.plan_images([p], n, default_hd_num=n, context_length=0, max_new_tokens=0)
        if candidate.num_tokens < p.num_tokens:
            return candidate
    return None


def free_device_memory() -> None:
    """Drop unreachable tensors and hand cached blocks back to the device after an out-of-memory error."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


@dataclass(frozen=True)
class Prepared:
    """A request checked and keyed, before any model work."""

    request: GenerationRequest
    prompt: str
    plans: list[HDPlan]
    images: list[Image.Image]
    bos_each_part: bool
    budget: int  # prompt tokens + max_new_tokens
    hashes: list[str]
    split: PromptSplit | None  # the prompt up to the end of its last image (None: nothing cacheable)
    prefix_key: PrefixKey | None
    t_start: float


@dataclass
class Encoded:
    """Decoder inputs for one request, and how they were obtained."""

    inputs: PromptInputs
    prefix: object | None  # a KVPrefix on a prefix-cache hit
    on_prefill: Callable | None  # stores the prefix K/V after this call's prefill
    prompt_tokens: int
    vision_s: float
    vision_cache_hits: int


class LocalRunner(TokenizerOwner):
    """Runs the native InternLM-XComposer2-4KHD model loaded by ``load_pretrained``.

    Model calls are serialised by a lock. Vision outputs are cached by (image content, hd_num, dtype,
    device), and the decoder K/V of the prompt up to its last image by that prefix's exact content
    (:mod:`hd4k_tools.runtime.kv_prefix_cache`), so a second question about the same image skips the
    vision tower and the prefill over the image tokens.
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
        family: ModelFamily = DEFAULT_FAMILY,
    ) -> None:
        """``cache_bytes`` bounds the image-embedding cache, ``prefix_cache_bytes`` the prefix KV cache
        (decoder K/V up to the last image, on the model's device; 0 disables it). Pass ready caches to
        share or inspect them. ``family`` is the model family the checkpoint belongs to (``models/registry.py``):
        its prompt, planning and tensor functions are the ones this engine uses."""
        self.family = family
        self._loaded = loaded
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        self._model_id = model_id or str(loaded.path)
        self._lock = threading.Lock()
        self.embedding_cache = embedding_cache if embedding_cache is not None else ImageEmbeddingCache(cache_bytes)
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixKVCache(prefix_cache_bytes)
        self.load_seconds = float(getattr(loaded, "load_seconds", 0.0))
        self._grammar_vocab: GrammarVocabulary | None = None

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
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        families: FamilyRegistry | None = None,
    ) -> LocalRunner:
        """Load a checkpoint folder or hub id with its model family's loader (``models/registry.py``).

        ``dtype="auto"`` is the checkpoint's dtype (bfloat16 for the official one: about 2 bytes per
        parameter in CPU memory). ``revision``, ``token``, ``cache_dir`` and ``local_files_only`` (or
        ``$HF_HUB_OFFLINE=1``) reach the Hugging Face Hub client for a hub id. ``families`` is the
        :class:`~hd4k_tools.models.registry.FamilyRegistry` the checkpoint's family is looked up in (default
        ``FAMILIES``; ``FAMILIES.with_family(family)`` adds one of your own).
        """
        family = family_for_checkpoint(path_or_hub_id, families)
        loaded = family.load_pretrained(
            path_or_hub_id,
            dtype=dtype,
            device=device,
            quantization=quantization,
            progress=progress,
            cancel=cancel,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
        return cls(
            loaded,
            model_id=str(path_or_hub_id),
            cache_bytes=cache_bytes,
            prefix_cache_bytes=prefix_cache_bytes,
            family=family,
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

    def close(self) -> None:
        self.embedding_cache.clear()
        self.prefix_cache.clear()  # K/V entries may hold GBs (of GPU memory)

    def generate(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult:
        return self._run_prepared(self.prepare(request), emit=None, cancel=cancel)

    def stream(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> TextStream:
        live: list[TokenLogprob] = []  # filled token by token when the request asks for logprobs
        return stream_in_thread(
            lambda emit, ev: self._run_prepared(self.prepare(request), emit=emit, cancel=ev, live=live), cancel, live
        )

    def prompt_text(self, request: GenerationRequest) -> str:
        """The prompt string with one ``<ImageHere>`` per image, in the request's layout."""
        return self.family.conversation_prompt(request.messages, request.layout)

    # -- the pipeline ------------------------------------------------------------------------------
    def grammar_vocabulary(self) -> GrammarVocabulary:
        """This model's vocabulary for constrained decoding (built on first use; needs llguidance)."""
        if self._grammar_vocab is None:
            from hd4k_tools.runtime.grammar import GrammarVocabulary

            self._grammar_vocab = GrammarVocabulary(self._tokenizer, self._vocab_size(), stop_ids_for(self._tokenizer))
        return self._grammar_vocab

    def _vocab_size(self) -> int:
        """Rows of the model's output layer (the logits' width; may exceed the tokenizer's vocabulary)."""
        return int(getattr(self._loaded.config, "vocab_size", 0) or self._tokenizer.vocab_size)

    def _token_logprob(self, entry: GenLogprob) -> TokenLogprob:
        return token_logprob(self._tokenizer, entry.token_id, entry.logprob, entry.top)

    def _run_prepared(
        self,
        prepared: Prepared,
        *,
        emit: Emit | None,
        cancel: threading.Event | None,
        live: list[TokenLogprob] | None = None,
    ) -> RunnerResult:
        """``encode`` + ``decode`` under the model lock. If the device runs out of memory before any text
        was streamed, the cached memory is freed and the request retried once at the next smaller
        ``hd_num`` of each image; the result's plans show the hd_num used and ``warnings`` says why."""
        emitted: list[bool] = []

        def tracked(delta: str) -> None:
            emitted.append(True)
            emit(delta)  # type: ignore[misc]

        try:
            return self._attempt(prepared, emit=tracked if emit is not None else None, cancel=cancel, live=live)
        except OOM_ERRORS as err:
            free_device_memory()
            smaller = [smaller_plan(p, self.family) for p in prepared.plans]
            if emitted or not prepared.plans or all(p is None for p in smaller):
                raise DeviceError(
                    f"The device ran out of memory ({err}); "
                    + ("part of the answer was already streamed, so it was not retried. " if emitted else "")
                    + "Use a smaller hd_num, fewer images or a shorter max_new_tokens, or free device memory."
                ) from err
            plans = [s if s is not None else p for s, p in zip(smaller, prepared.plans, strict=True)]
            old = ", ".join(str(p.hd_num) for p in prepared.plans)
            new = ", ".join(str(p.hd_num) for p in plans)
            request = prepared.request
            retry = self.prepare(
                GenerationRequest.planned(
                    request.messages,
                    plans,
                    generation=request.generation,
                    layout=request.layout,
                    constraint=request.constraint,
                )
            )
            try:
                result = self._attempt(retry, emit=emit, cancel=cancel, live=live)
            except OOM_ERRORS as again:
                free_device_memory()
                raise DeviceError(
                    f"The device ran out of memory at hd_num {old}, and again at {new} ({again}); use a smaller "
                    "hd_num, fewer images or a shorter max_new_tokens, or free device memory."
                ) from again
            warning = f"out of device memory at hd_num {old}; answered at hd_num {new} instead"
            return dataclasses.replace(result, warnings=[*result.warnings, warning])

    def _attempt(
        self, prepared: Prepared, *, emit: Emit | None, cancel: threading.Event | None, live: list[TokenLogprob] | None
    ) -> RunnerResult:
        """One try of ``prepared`` under the model lock (:meth:`_run_prepared` retries it smaller on OOM)."""
        with self._lock, torch.inference_mode():
            encoded = self.encode(prepared)
            out, text = self.decode(prepared, encoded, emit=emit, cancel=cancel, live=live)
        return self.result(prepared, encoded, out, text)

    def prepare(self, request: GenerationRequest) -> Prepared:
        """Step 1: prompt, plans and the context check; no model work."""
        t_start = time.perf_counter()
        if request.constraint is not None:
            self.grammar_vocabulary().grammar(request.constraint)  # an uncompilable schema costs no model work
        for token_id, _ in request.generation.logit_bias:
            if token_id >= self._vocab_size():
                raise InputError(
                    f"logit_bias names token id {token_id}, outside this model's vocabulary "
                    f"(0..{self._vocab_size() - 1})."
                )
        plans = request.plans()
        images = request.images
        prompt = self.prompt_text(request)
        bos_each_part = request.layout == "chat"
        token_counts = [p.num_tokens for p in plans]
        # Checked before the vision tower runs, so an overflow costs nothing (docs/model.md §4.2).
        hd_nums = {p.hd_num for p in plans}
        needed = self.family.check_context(
            self._tokenizer,
            prompt,
            token_counts,
            max_length=self.context_length,
            image_sizes=[(p.width, p.height) for p in plans],
            hd_num=hd_nums.pop() if len(hd_nums) == 1 else None,
            bos_each_part=bos_each_part,
        )
        hashes = [image_content_hash(img) for img in images]
        split = split_at_last_image(
            self._tokenizer, prompt, token_counts, bos_each_part=bos_each_part, family=self.family
        )
        param = next(self._model.parameters())
        prefix_key = (
            split.key([(h, p.hd_num) for h, p in zip(hashes, plans, strict=True)], param.dtype, param.device)
            if split is not None
            else None
        )
        return Prepared(
            request=request,
            prompt=prompt,
            plans=plans,
            images=images,
            bos_each_part=bos_each_part,
            budget=needed + request.generation.max_new_tokens,
            hashes=hashes,
            split=split,
            prefix_key=prefix_key,
            t_start=t_start,
        )

    def encode(self, prepared: Prepared) -> Encoded:
        """Step 2: decoder inputs, from the prefix cache or through the vision tower. Holds the lock."""
        model = self._model
        param = next(model.parameters())
        dtype, device = param.dtype, param.device
        t0 = time.perf_counter()
        hits_before = self.embedding_cache.hits
        plans = prepared.plans
        embedding_keys = [(h, p.hd_num, str(dtype), str(device)) for h, p in zip(prepared.hashes, plans, strict=True)]
        key = prepared.prefix_key
        prefix = self.prefix_cache.get(key) if key is not None else None
        on_prefill = None
        if prefix is not None:
            # Prefix hit: the images live in the cached K/V, so neither the vision tower nor their
            # embeddings are needed; only the text after the last image is prefilled. Exact, because
            # attention is causal (the prefix K/V do not depend on later tokens) and Partial LoRA
            # applied to the image positions inside the prefix exactly as in a full prefill
            # (docs/model.md §3.2; kv_prefix_cache). The embedding entries are kept warm (they
            # are far smaller and outlive an evicted prefix).
            for k in embedding_keys:
                self.embedding_cache.touch(k)
            inputs = suffix_inputs(model, prepared.split)
        else:
            embeds = []
            for img, p, k in zip(prepared.images, plans, embedding_keys, strict=True):

                def compute(img: Image.Image = img, p: HDPlan = p) -> torch.Tensor:
                    return model.encode_image(self.family.to_model_inputs(img, p, dtype=dtype))  # [L, D]

                embeds.append(self.embedding_cache.get_or_compute(k, compute))
            inputs = self.family.assemble_inputs(
                model,
                self._tokenizer,
                prepared.prompt,
                embeds,
                max_length=self.context_length,
                bos_each_part=prepared.bos_each_part,
            )
            if key is not None and inputs.length == prepared.split.total_length:
                # Keep the prefix's K/V after this call's prefill for the next question.
                on_prefill = self.prefix_cache.capture(key, prepared.split.prefix_length)
        return Encoded(
            inputs=inputs,
            prefix=prefix,
            on_prefill=on_prefill,
            prompt_tokens=inputs.length + (prefix.length if prefix is not None else 0),
            vision_s=time.perf_counter() - t0,
            vision_cache_hits=self.embedding_cache.hits - hits_before,
        )

    def decode(
        self,
        prepared: Prepared,
        encoded: Encoded,
        *,
        emit: Emit | None,
        cancel: threading.Event | None,
        live: list[TokenLogprob] | None = None,
    ) -> tuple[GenerationOutput, str]:
        """Step 3: generate; with ``emit``, stream the stripped answer's deltas. Holds the lock.

        With a constraint, the answer is JSON by construction; if ``max_new_tokens`` ends before the JSON
        is complete, :class:`~hd4k_tools.structured.StructuredOutputTruncatedError` is raised."""
        request = prepared.request
        config = request.generation
        max_length = self.context_length
        if prepared.budget > max_length:
            # Leave room in the context for the answer rather than overflowing mid-generation.
            config = config.replace(max_new_tokens=max(1, max_length - encoded.prompt_tokens))
        matcher = self.grammar_vocabulary().matcher(request.constraint) if request.constraint is not None else None
        args = {
            "stop_ids": stop_ids_for(self._tokenizer),
            "cancel": cancel,
            "prefix": encoded.prefix,
            "on_prefill": encoded.on_prefill,
            "constraint": matcher,
        }
        if emit is None:
            out = generate(self._model, encoded.inputs, config, **args)
            self._check_complete(out, matcher, config)
            return out, decode_output(self._tokenizer, out.token_ids).strip()
        out_box: list[GenerationOutput] = []
        pieces: list[str] = []
        raw_logprobs: list[GenLogprob] = []
        tokens = iter_tokens(self._model, encoded.inputs, config, output=out_box, logprobs_out=raw_logprobs, **args)
        if live is not None and config.logprobs:
            tokens = self._with_live_logprobs(tokens, raw_logprobs, live)
        # Deltas of the *stripped* answer, so that joined they equal the non-streamed text.
        trim = StopFilter()
        for delta in stream_text(self._tokenizer, tokens):
            if piece := trim.feed(delta):
                pieces.append(piece)
                emit(piece)
        if tail := trim.finish():
            pieces.append(tail)
            emit(tail)
        self._check_complete(out_box[0], matcher, config)
        return out_box[0], "".join(pieces).strip()

    def _with_live_logprobs(
        self, tokens: Iterator[int], raw: list[GenLogprob], live: list[TokenLogprob]
    ) -> Iterator[int]:
        """``tokens``, copying each one's log-probability entry to ``live`` before it is passed on."""
        for token in tokens:
            live.extend(self._token_logprob(e) for e in raw[len(live) :])
            yield token

    @staticmethod
    def _check_complete(out: GenerationOutput, matcher: JSONMatcher | None, config: GenerationConfig) -> None:
        if matcher is not None and out.finish_reason == "length" and not matcher.complete:
            raise StructuredOutputTruncatedError(
                f"The JSON answer did not fit in max_new_tokens={config.max_new_tokens} (constrained decoding "
                "stopped before the object was complete); allow more new tokens (max_tokens) or ask for less."
            )

    def result(self, prepared: Prepared, encoded: Encoded, out: GenerationOutput, text: str) -> RunnerResult:
        """Step 4: the answer with its plans, token usage and timings."""
        plans = prepared.plans
        timings = Timings(
            load_s=self.load_seconds,
            vision_s=encoded.vision_s,
            prefill_s=out.prefill_seconds,
            decode_s=out.decode_seconds,
            decode_tokens_per_s=out.tokens_per_second,
            total_s=time.perf_counter() - prepared.t_start,
            vision_cache_hits=encoded.vision_cache_hits,
            prefix_cache_hit=encoded.prefix is not None,
        )
        usage = Usage(
            prompt_tokens=encoded.prompt_tokens,
            image_tokens=sum(p.num_tokens for p in plans),
            completion_tokens=out.num_generated_tokens,
        )
        return RunnerResult(
            text=text,
            model=self.model_id,
            finish_reason=out.finish_reason,
            plans=[PlanSummary.from_plan(p) for p in plans],
            usage=usage,
            timings=timings,
            logprobs=[self._token_logprob(e) for e in out.logprobs] if out.logprobs is not None else None,
        )


__all__ = ["Encoded", "LocalRunner", "Prepared"]
