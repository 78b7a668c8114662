"""Our own decode loop for IXC2-4KHD: greedy, sampling and beam search over a preallocated KV cache.

The official ``chat()`` calls transformers' ``generate(inputs_embeds=…, im_mask=…)`` (docs/model.md §4). That
path cannot run on transformers 5 (tuple caches, remote code; docs/model.md §5), so this module reimplements
the parts the project uses, with HF semantics where it matters:

* **Prefill + decode.** One :class:`KVCache` per call, sized ``prompt + max_new_tokens`` (× beams). The
  prompt is prefilled in one forward with its ``im_mask``; every generated token is then fed alone with
  ``im_mask=False`` — generated tokens never get Partial LoRA (docs/model.md §3.2: the HF decoder zeroes
  ``im_mask`` whenever it is given ``input_ids``). Given a ``prefix`` (the K/V of the prompt's first
  positions from an earlier call, :mod:`hd4k_tools.runtime.kv_prefix_cache`), the cache starts with it and only
  the rest of the prompt is prefilled.
* **Logits processing** (HF order): repetition penalty, OpenAI's presence/frequency penalties and
  ``logit_bias``, the constraint's token mask (constrained decoding, :class:`TokenConstraint`), then
  temperature, top-k, top-p. With ``config.logprobs`` each step records the chosen token's raw
  log-probability (before any processing) and the top ``config.top_logprobs`` alternatives. The repetition
  penalty only sees *generated* tokens: with ``inputs_embeds`` HF's ``generate`` starts from an empty
  ``input_ids`` for decoder-only models, so prompt tokens were never penalised in the official path.
* **Beam search** follows HF's (transformers 5 ``_beam_search``, ``early_stopping=False``): scores are
  summed log-softmax values, ``(n_stop + 1) * num_beams`` candidates per step, a candidate ending in a
  stop id is a finished hypothesis only if it ranks among the top ``num_beams``, its score is the sum
  divided by ``generated_length ** length_penalty`` (the stop token counted), and the search ends when
  no running beam can beat the worst of ``num_beams`` finished ones. The repetition penalty is applied
  to the log-probabilities, as HF does in beam search. Sampling together with beams is rejected.
* **Stop ids** ``{eos, [UNUSED_TOKEN_145]}`` read from the tokenizer (docs/model.md §4); the stop token counts
  towards ``max_new_tokens`` (as in HF) but is not part of :attr:`GenerationOutput.token_ids`.
* **Cancellation** is checked between tokens (and before the prefill). It is never an exception here:
  :func:`generate` returns what it has with ``finish_reason="cancelled"``, :func:`iter_tokens` simply
  ends (its ``output`` list receives the same :class:`GenerationOutput`). Callers that want an
  exception use ``hd4k_tools.progress.check_cancelled`` after the call.
* Everything runs under ``torch.inference_mode()`` (entered per step, never held across a ``yield``).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from hd4k_tools.errors import InputError
from hd4k_tools.models.registry import IM_END, KVCache, KVPrefix, PromptInputs
from hd4k_tools.runtime import runner
from hd4k_tools.runtime.generation_config import GenerationConfig

__all__ = [
    "FinishReason",
    "GenerationConfig",
    "GenerationOutput",
    "TextDeltas",
    "TokenConstraint",
    "TokenLogprob",
    "decode_output",
    "generate",
    "iter_tokens",
    "stop_ids_for",
    "stream",
    "stream_text",
    "token_bytes",
    "token_logprob",
]

FinishReason = Literal["stop", "length", "cancelled"]
_REPLACEMENT_CHAR = "\ufffd"


# ----------------------------------------------------------------------------------------------------
# Configuration and results
# ----------------------------------------------------------------------------------------------------
@dataclass
class GenerationOutput:
    """The result of one generation.

    ``token_ids`` are the generated ids without the stop token (``stop_token_id`` says which one ended
    it). ``prefill_seconds`` is the time to the first chosen token (prefill forward + first pick);
    ``decode_seconds`` the time of the remaining steps; ``tokens_per_second`` = decode forwards /
    ``decode_seconds`` (0 when there were none). For beam search, ``score`` is the length-normalised
    log-probability of the returned hypothesis (``None`` otherwise).
    """

    token_ids: list[int]
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    tokens_per_second: float
    text: str = ""
    stop_token_id: int | None = None
    score: float | None = None
    #: One entry per generated token (the stop token excluded) when ``config.logprobs``; else ``None``.
    logprobs: list[TokenLogprob] | None = None


# ----------------------------------------------------------------------------------------------------
# Tokenizer helpers
# ----------------------------------------------------------------------------------------------------
class _Tokenizer(Protocol):
    @property
    def eos_id(self) -> int: ...

    @property
    def im_end_id(self) -> int: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def stop_ids_for(tokenizer: _Tokenizer) -> frozenset[int]:
    """The ids that end a reply: ``{eos, [UNUSED_TOKEN_145]}`` (docs/model.md §4 ``eos_token_id=[2, 92542]``)."""
    return frozenset({int(tokenizer.eos_id), int(tokenizer.im_end_id)})


def decode_output(tokenizer: _Tokenizer, token_ids: Sequence[int]) -> str:
    """Text of generated ids as the official chat produces it: decode with ``skip_special_tokens`` and
    cut at the first ``[UNUSED_TOKEN_145]`` (docs/model.md §4)."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True).split(IM_END)[0]


def token_bytes(tokenizer: object, token_id: int) -> bytes:
    """The bytes a sentencepiece piece stands for (what OpenAI's ``logprobs[].bytes`` reports): ``▁`` is a
    space, a byte-fallback piece ``<0xE4>`` is that one byte, special pieces are their text."""
    sp = tokenizer._sp  # type: ignore[attr-defined]
    piece = sp.id_to_piece(token_id)
    if sp.is_byte(token_id):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def token_logprob(
    tokenizer: object, token_id: int, logprob: float, top: Iterable[tuple[int, float]] = ()
) -> runner.TokenLogprob:
    """One answer token in OpenAI's ``logprobs.content[]`` shape (text, log-probability, bytes), with its
    ``top`` alternatives as ``(token_id, logprob)`` pairs, ranked; every engine builds them here."""

    def one(tid: int, lp: float) -> runner.TokenLogprob:
        raw = token_bytes(tokenizer, tid)
        return runner.TokenLogprob(raw.decode("utf-8", errors="replace"), float(lp), tuple(raw))

    first = one(token_id, logprob)
    return dataclasses.replace(first, top_logprobs=tuple(one(t, lp) for t, lp in top))


def _stable_prefix(text: str) -> str:
    """The part of a partial decode that later tokens cannot change: without a trailing incomplete UTF-8
    sequence (U+FFFD from byte-fallback pieces) and without a tail that may grow into ``IM_END``."""
    text = text.rstrip(_REPLACEMENT_CHAR)
    for n in range(min(len(IM_END) - 1, len(text)), 0, -1):
        if IM_END.startswith(text[-n:]):
            return text[:-n]
    return text


class TextDeltas:
    """Incremental text of a growing list of generated ids (what :func:`stream_text` yields, for callers
    that receive tokens in chunks, e.g. from another engine): ``feed(ids)`` returns the new stable text,
    ``finish()`` the rest; all of it joined equals :func:`decode_output` of all the ids.

    The whole id list is decoded at every feed (sentencepiece's spacing depends on the neighbours) and
    only the new stable suffix is returned: nothing while the text ends in an incomplete UTF-8 sequence
    (U+FFFD) or in what could be the start of ``[UNUSED_TOKEN_145]``; text after that marker never.
    """

    def __init__(self, tokenizer: _Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def _advance(self, text: str) -> str:
        if len(text) > len(self._emitted) and text.startswith(self._emitted):
            delta = text[len(self._emitted) :]
            self._emitted = text
            return delta
        return ""

    def feed(self, token_ids: Iterable[int]) -> str:
        self._ids.extend(int(t) for t in token_ids)
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        return self._advance(full.split(IM_END)[0] if IM_END in full else _stable_prefix(full))

    def finish(self) -> str:
        return self._advance(decode_output(self._tokenizer, self._ids))


def stream_text(tokenizer: _Tokenizer, token_iter: Iterable[int]) -> Iterator[str]:
    """Incremental text deltas of a token stream (one :class:`TextDeltas` feed per token); their
    concatenation equals :func:`decode_output` of all the tokens."""
    deltas = TextDeltas(tokenizer)
    for token in token_iter:
        if delta := deltas.feed((token,)):
            yield delta
    if tail := deltas.finish():
        yield tail


# ----------------------------------------------------------------------------------------------------
# Model plumbing
# ----------------------------------------------------------------------------------------------------
class _Decoder:
    """Owns the KV cache of one call and runs prefill / single-token steps, returning last-position
    logits ``[B, V]`` float32.

    The cache is allocated once for ``batch`` rows (the beams) and ``P + T + max_new_tokens`` positions.
    The prompt is prefilled as one sequence through a row-0 view of it; :meth:`prefill` then copies row 0
    to the other rows. With a ``prefix`` (K/V of positions ``0..P-1``, see :mod:`hd4k_tools.runtime.kv_prefix_cache`)
    those positions are copied in first and only ``inputs`` — positions ``P..P+T-1`` — are prefilled.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        inputs: PromptInputs,
        max_new_tokens: int,
        *,
        batch: int = 1,
        prefix: KVPrefix | None = None,
        on_prefill: Callable[[KVCache], None] | None = None,
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.prefix = prefix
        self.on_prefill = on_prefill
        embeds = inputs.inputs_embeds
        self.dtype = embeds.dtype
        self.device = embeds.device
        self.start = prefix.length if prefix is not None else 0
        self.prompt_len = self.start + int(embeds.shape[1])
        self.pos = self.prompt_len
        self.cache = KVCache(model.config, batch, self.prompt_len + max_new_tokens, self.dtype, self.device)

    def _forward(
        self, embeds: torch.Tensor, im_mask: torch.Tensor, input_pos: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        # logits_to_keep=1: the full [1, T, V] float32 prefill output would be large (10k x 92544 x 4 B).
        logits = self.model(embeds, im_mask, input_pos, cache, logits_to_keep=1)  # [B, 1, V]
        return logits[:, -1].float()  # [B, V]

    def prefill(self) -> torch.Tensor:
        """Prefill the prompt (after the prefix, if any) as one sequence → logits ``[1, V]``."""
        row0 = self.cache.row_view(1) if self.cache.batch_size > 1 else self.cache
        if self.prefix is not None:
            row0.load_prefix(self.prefix)
        input_pos = torch.arange(self.start, self.prompt_len, device=self.device)  # [T]
        logits = self._forward(self.inputs.inputs_embeds, self.inputs.im_mask.bool(), input_pos, row0)
        if self.on_prefill is not None:
            self.on_prefill(row0)
        self.cache.length = row0.length
        self.cache.broadcast_row(0)  # every beam starts from the prompt (no-op for one row)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens [B]`` at the next position; generated tokens get no LoRA (docs/model.md §3.2)."""
        batch = tokens.shape[0]
        embeds = self.model.embed_tokens(tokens).unsqueeze(1)  # [B] -> [B, D] -> [B, 1, D]
        im_mask = torch.zeros(batch, 1, dtype=torch.bool, device=self.device)  # [B, 1]
        input_pos = torch.tensor([self.pos], dtype=torch.long, device=self.device)  # [1]
        self.pos += 1
        return self._forward(embeds.to(self.dtype), im_mask, input_pos, self.cache)


def _apply_repetition_penalty(scores: torch.Tensor, generated: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF ``RepetitionPenaltyLogitsProcessor``: for every token already in ``generated [B, n]``, divide a
    positive score by ``penalty`` and multiply a negative one (in place on ``scores [B, V]``)."""
    if penalty == 1.0 or generated.shape[1] == 0:
        return scores
    picked = scores.gather(1, generated)  # [B, n]
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter_(1, generated, picked)


def _filter_logits(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Temperature, top-k, top-p (HF warper order and semantics) on ``logits [B, V]``."""
    if config.temperature != 1.0:
        logits = logits / config.temperature
    vocab = logits.shape[-1]
    if 0 < config.top_k < vocab:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if config.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)  # ascending, [B, V]
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - config.top_p)
        remove[..., -1:] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), -math.inf)
    return logits


class TokenConstraint(Protocol):
    """A per-step restriction of the next token (constrained decoding, :mod:`hd4k_tools.runtime.grammar`).

    Greedy decoding also uses two optional methods where a constraint has them, to skip the mask:
    ``forced() -> int | None`` (the next token if it is the only one allowed) and ``allows(token,
    remaining, max_new_tokens) -> bool`` (:class:`~hd4k_tools.runtime.grammar.JSONMatcher` has both)."""

    def mask_(self, scores: torch.Tensor, remaining: int, max_new_tokens: int) -> torch.Tensor:
        """Set the scores ``[1, V]`` of disallowed tokens to -inf, in place (``remaining`` steps left)."""
        ...

    def advance(self, token: int) -> None:
        """Follow the chosen (non-stop) token."""
        ...


def _pick(
    scores: torch.Tensor,
    config: GenerationConfig,
    gen: torch.Generator | None,
    constraint: TokenConstraint | None,
    remaining: int,
) -> int:
    """The next token from the processed ``scores [1, V]``: sampled, or the argmax, among the tokens the
    ``constraint`` allows (``remaining`` steps left)."""
    if config.do_sample:
        if constraint is not None:
            constraint.mask_(scores, remaining, config.max_new_tokens)
        probs = _filter_logits(scores, config).softmax(dim=-1)  # [1, V]
        return int(torch.multinomial(probs, 1, generator=gen).item())
    if constraint is None:
        return int(scores.argmax(dim=-1).item())
    # Greedy under a constraint picks what argmax of the masked scores picks, with less work per step: a
    # token the grammar forces is the only finite score; the unmasked argmax, when allowed, is also the
    # first maximum among the allowed tokens. Only otherwise is the mask applied.
    if hasattr(constraint, "allows"):  # the optional methods (TokenConstraint)
        if (forced := constraint.forced()) is not None:
            return forced
        token = int(scores.argmax(dim=-1).item())
        if constraint.allows(token, remaining, config.max_new_tokens):
            return token
    constraint.mask_(scores, remaining, config.max_new_tokens)
    return int(scores.argmax(dim=-1).item())


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model and the ``top`` most likely alternatives
    (``(token_id, logprob)``, most likely first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _token_logprob(raw: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """``raw [V]`` log-probabilities -> the chosen token's entry with its top ``k``."""
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        values, ids = torch.topk(raw, min(k, raw.shape[-1]))  # [k]
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(raw[token]), top)


class _Penalties:
    """OpenAI's presence/frequency penalties and ``logit_bias`` on scores ``[1, V]``:
    ``score[j] += bias[j] - frequency_penalty * count[j] - presence_penalty * (count[j] > 0)``, counts over
    the generated tokens (OpenAI's documented formula; vLLM's too)."""

    def __init__(self, config: GenerationConfig, vocab: int, device: torch.device) -> None:
        self.presence = float(config.presence_penalty)
        self.frequency = float(config.frequency_penalty)
        self.counts = (
            torch.zeros(1, vocab, dtype=torch.float32, device=device) if self.presence or self.frequency else None
        )  # [1, V]
        self.bias: torch.Tensor | None = None
        if config.logit_bias:
            for token_id, _ in config.logit_bias:
                if not 0 <= token_id < vocab:
                    raise InputError(
                        f"logit_bias names token id {token_id}, outside this model's vocabulary (0..{vocab - 1})."
                    )
            self.bias = torch.zeros(1, vocab, dtype=torch.float32, device=device)  # [1, V]
            ids = torch.tensor([t for t, _ in config.logit_bias], dtype=torch.long, device=device)
            values = torch.tensor([b for _, b in config.logit_bias], dtype=torch.float32, device=device)
            self.bias[0, ids] = values

    def apply_(self, scores: torch.Tensor) -> torch.Tensor:
        if self.counts is not None:
            scores -= self.frequency * self.counts + self.presence * (self.counts > 0)
        if self.bias is not None:
            scores += self.bias
        return scores

    def count(self, token: int) -> None:
        if self.counts is not None:
            self.counts[0, token] += 1


@dataclass
class _RunStats:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    finish_reason: FinishReason = "length"
    stop_token_id: int | None = None
    score: float | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@contextmanager
def _timed(stats: _RunStats, prefill: bool) -> Iterator[None]:
    """Inference mode + time accounting for one block of work (never spans a ``yield`` to the caller)."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        yield
    dt = time.perf_counter() - t0
    if prefill:
        stats.prefill_seconds += dt
    else:
        stats.decode_seconds += dt


def _make_generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    """A private RNG for sampling (the global torch RNG is never touched)."""
    if not config.do_sample:
        return None
    gen = torch.Generator(device=device)
    if config.seed is None:
        gen.seed()  # non-deterministic seed for this generator only
    else:
        gen.manual_seed(config.seed)
    return gen


def _is_cancelled(cancel: threading.Event | None) -> bool:
    return cancel is not None and cancel.is_set()


# ----------------------------------------------------------------------------------------------------
# Greedy / sampling
# ----------------------------------------------------------------------------------------------------
def _sample_steps(
    model: torch.nn.Module,
    inputs: PromptInputs,
    config: GenerationConfig,
    stop_ids: frozenset[int],
    cancel: threading.Event | None,
    stats: _RunStats,
    *,
    prefix: KVPrefix | None = None,
    on_prefill: Callable[[KVCache], None] | None = None,
    constraint: TokenConstraint | None = None,
) -> Iterator[int]:
    """Yield generated tokens one by one (num_beams == 1); ``stats`` gets the finish reason and times."""
    if _is_cancelled(cancel):
        stats.finish_reason = "cancelled"
        return
    with _timed(stats, prefill=True):
        decoder = _Decoder(model, inputs, config.max_new_tokens, prefix=prefix, on_prefill=on_prefill)
        gen = _make_generator(config, decoder.device)
        generated = torch.zeros(1, config.max_new_tokens, dtype=torch.long, device=decoder.device)  # [1, N]
        logits = decoder.prefill()  # [1, V]
        penalties = _Penalties(config, logits.shape[-1], decoder.device)
    n = 0
    while True:
        with _timed(stats, prefill=n == 0):
            # Log-probabilities of the model itself, before any processing (vLLM's default raw_logprobs).
            raw = F.log_softmax(logits, dim=-1) if config.logprobs else None  # [1, V]
            scores = _apply_repetition_penalty(logits, generated[:, :n], config.repetition_penalty)  # [1, V]
            scores = penalties.apply_(scores)
            token = _pick(scores, config, gen, constraint, config.max_new_tokens - n)
            if raw is not None and token not in stop_ids:
                stats.logprobs.append(_token_logprob(raw[0], token, config.top_logprobs))
        if token in stop_ids:
            stats.finish_reason, stats.stop_token_id = "stop", token
            return
        if constraint is not None:
            constraint.advance(token)
        penalties.count(token)
        stats.tokens.append(token)
        yield token
        n += 1
        if n >= config.max_new_tokens:
            stats.finish_reason = "length"
            return
        if _is_cancelled(cancel):
            stats.finish_reason = "cancelled"
            return
        with _timed(stats, prefill=False):
            generated[0, n - 1] = token
            logits = decoder.step(generated[0, n - 1 : n])  # [1] -> [1, V]
        stats.decode_steps += 1


# ----------------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------------
@dataclass(order=True)
class _Hypothesis:
    score: float  # sum of log-probs / generated_length ** length_penalty
    order: int  # insertion counter: among equal scores the earlier hypothesis wins
    tokens: list[int] = field(compare=False)
    stop_id: int | None = field(compare=False)


class _Finished:
    """The best ``nb`` finished hypotheses, a min-heap (``heap[0]`` is the worst kept)."""

    def __init__(self, nb: int) -> None:
        self.nb = nb
        self.heap: list[_Hypothesis] = []
        self._counter = 0

    def add(self, score: float, tokens: list[int], stop_id: int | None) -> None:
        """Keep a hypothesis if there is room or it beats the worst kept."""
        self._counter -= 1  # later insertions lose ties (max() picks the highest order)
        hyp = _Hypothesis(score, self._counter, tokens, stop_id)
        if len(self.heap) < self.nb:
            heapq.heappush(self.heap, hyp)
        elif hyp.score > self.heap[0].score:
            heapq.heapreplace(self.heap, hyp)


def _beam_prefill(
    model: torch.nn.Module,
    inputs: PromptInputs,
    config: GenerationConfig,
    nb: int,
    prefix: KVPrefix | None,
    on_prefill: Callable[[KVCache], None] | None,
) -> tuple[_Decoder, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill for ``nb`` beams: ``(decoder, logits [nb, V], beam_scores [nb], seqs [nb, N])``."""
    # The cache holds nb rows from the start; the prefill fills row 0 and copies it to the others.
    decoder = _Decoder(model, inputs, config.max_new_tokens, batch=nb, prefix=prefix, on_prefill=on_prefill)
    device = decoder.device
    logits = decoder.prefill()  # [1, V]
    vocab = logits.shape[-1]
    # Every beam holds the prompt; only beam 0 is live at the first step.
    logits = logits.expand(nb, vocab)  # [nb, V]
    beam_scores = torch.full((nb,), -math.inf, dtype=torch.float32, device=device)  # [nb]
    beam_scores[0] = 0.0
    seqs = torch.zeros(nb, config.max_new_tokens, dtype=torch.long, device=device)  # [nb, N]
    return decoder, logits, beam_scores, seqs


def _select_running(
    candidates: Iterable[tuple[float, int, int]],
    stop_ids: frozenset[int],
    nb: int,
    prev: torch.Tensor,
    len_norm: float,
    finished: _Finished,
) -> list[tuple[float, int, int]]:
    """The next step's ``nb`` running beams ``(sum log-prob, source beam, new token)`` from the ranked
    candidates; a top-``nb`` candidate ending in a stop token becomes a finished hypothesis instead.
    ``prev`` ``[nb, cur_len - 1]`` holds each beam's tokens so far."""
    running: list[tuple[float, int, int]] = []
    for rank, (score, beam, token) in enumerate(candidates):
        if score == -math.inf:
            break
        if token in stop_ids:
            if rank < nb:  # HF: only a top-nb candidate may become a finished hypothesis
                finished.add(score / len_norm, prev[beam].tolist(), token)
            continue
        running.append((score, beam, token))
        if len(running) == nb:
            break
    return running


def _advance_beams(
    decoder: _Decoder,
    running: list[tuple[float, int, int]],
    seqs: torch.Tensor,
    beam_scores: torch.Tensor,
    cur_len: int,
    device: torch.device,
) -> torch.Tensor:
    """Reorder the beams to their sources, append the new tokens and decode one step: logits ``[nb, V]``."""
    nb = len(running)
    sources = [b for _, b, _ in running]
    new_tokens = torch.tensor([t for _, _, t in running], dtype=torch.long, device=device)  # [nb]
    if sources != list(range(nb)):
        # In place, copying only the rows whose source changed (KVCache.reorder).
        order = torch.tensor(sources, dtype=torch.long, device=device)  # [nb]
        seqs.copy_(seqs.index_select(0, order))
        decoder.cache.reorder(order)
    seqs[:, cur_len - 1] = new_tokens
    beam_scores.copy_(torch.tensor([s for s, _, _ in running], dtype=torch.float32, device=device))
    return decoder.step(new_tokens)  # [nb, V]


def _beam_search(
    model: torch.nn.Module,
    inputs: PromptInputs,
    config: GenerationConfig,
    stop_ids: frozenset[int],
    cancel: threading.Event | None,
    stats: _RunStats,
    num_beams: int | None = None,
    *,
    prefix: KVPrefix | None = None,
    on_prefill: Callable[[KVCache], None] | None = None,
) -> None:
    """Deterministic beam search (HF semantics, see the module docstring); fills ``stats``.

    ``num_beams`` overrides ``config.num_beams`` (tests run the beam code with one beam)."""
    nb = num_beams or config.num_beams
    lp = config.length_penalty
    if _is_cancelled(cancel):
        stats.finish_reason = "cancelled"
        return
    with _timed(stats, prefill=True):
        decoder, logits, beam_scores, seqs = _beam_prefill(model, inputs, config, nb, prefix, on_prefill)
        device, vocab = decoder.device, logits.shape[-1]
    finished = _Finished(nb)
    num_candidates = min((len(stop_ids) + 1) * nb, nb * vocab)
    reason: FinishReason = "length"

    cur_len = 0  # tokens per running beam after this step's selection
    while True:
        with _timed(stats, prefill=cur_len == 0):
            logprobs = F.log_softmax(logits.float(), dim=-1)  # [nb, V]
            logprobs = _apply_repetition_penalty(logprobs, seqs[:, :cur_len], config.repetition_penalty)
            total = (logprobs + beam_scores[:, None]).view(-1)  # [nb, V] -> [nb * V]
            top_scores, top_idx = torch.topk(total, num_candidates)
            candidates = zip(top_scores.tolist(), (top_idx // vocab).tolist(), (top_idx % vocab).tolist(), strict=True)
        cur_len += 1
        len_norm = cur_len**lp  # HF: generated length incl. the new token (cur_len + 1 - prompt_len)
        running = _select_running(candidates, stop_ids, nb, seqs[:, : cur_len - 1], len_norm, finished)
        cancelled = _is_cancelled(cancel)
        if cur_len >= config.max_new_tokens or not running or cancelled:
            # Out of budget (or cancelled): the running beams become hypotheses as they are.
            for score, beam, token in running:
                finished.add(score / len_norm, [*seqs[beam, : cur_len - 1].tolist(), token], None)
            reason = "cancelled" if cancelled else "length"
            break
        # HF early_stopping=False: done once nb hypotheses are finished and the best running beam,
        # normalised at its current length, does not beat the worst of them.
        if len(finished.heap) == nb and running[0][0] / len_norm <= finished.heap[0].score:
            break
        while len(running) < nb:  # tiny vocabularies only: pad with dead copies of the best beam
            running.append((-math.inf, running[0][1], running[0][2]))
        with _timed(stats, prefill=False):
            logits = _advance_beams(decoder, running, seqs, beam_scores, cur_len, device)
        stats.decode_steps += 1

    _beam_result(stats, finished, reason)


def _beam_result(stats: _RunStats, finished: _Finished, reason: FinishReason) -> None:
    """Fill ``stats`` with the best finished hypothesis."""
    best = max(finished.heap)
    stats.score, stats.tokens, stats.stop_token_id = best.score, list(best.tokens), best.stop_id
    if reason == "cancelled":
        stats.finish_reason = "cancelled"
    else:
        stats.finish_reason = "stop" if best.stop_id is not None else "length"


# ----------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------
def _output(
    stats: _RunStats,
    inputs: PromptInputs,
    tokenizer: _Tokenizer | None,
    prefix: KVPrefix | None,
    logprobs: bool = False,
) -> GenerationOutput:
    return GenerationOutput(
        token_ids=list(stats.tokens),
        finish_reason=stats.finish_reason,
        num_prompt_tokens=int(inputs.length) + (prefix.length if prefix is not None else 0),
        num_generated_tokens=len(stats.tokens),
        prefill_seconds=stats.prefill_seconds,
        decode_seconds=stats.decode_seconds,
        tokens_per_second=stats.decode_steps / stats.decode_seconds if stats.decode_seconds > 0 else 0.0,
        text=decode_output(tokenizer, stats.tokens) if tokenizer is not None else "",
        stop_token_id=stats.stop_token_id,
        score=stats.score,
        logprobs=list(stats.logprobs) if logprobs else None,
    )


def _check_inputs(inputs: PromptInputs, stop_ids: Collection[int], prefix: KVPrefix | None) -> frozenset[int]:
    embeds = inputs.inputs_embeds
    if embeds.dim() != 3 or embeds.shape[0] != 1:
        raise ValueError(f"inputs.inputs_embeds must be [1, T, D] (one prompt), got {tuple(embeds.shape)}")
    if embeds.shape[1] == 0:
        raise ValueError("inputs hold no position: with a prefix, at least the last prompt token must follow it")
    if prefix is not None and (prefix.dtype != embeds.dtype or prefix.device != embeds.device):
        raise ValueError(
            f"the prefix K/V are {prefix.dtype} on {prefix.device} but the inputs are {embeds.dtype} on "
            f"{embeds.device}; prefixes are only valid for the dtype/device they were computed in"
        )
    return frozenset(int(i) for i in stop_ids)


def iter_tokens(
    model: torch.nn.Module,
    inputs: PromptInputs,
    config: GenerationConfig | None = None,
    *,
    stop_ids: Collection[int],
    cancel: threading.Event | None = None,
    output: list[GenerationOutput] | None = None,
    tokenizer: _Tokenizer | None = None,
    prefix: KVPrefix | None = None,
    on_prefill: Callable[[KVCache], None] | None = None,
    constraint: TokenConstraint | None = None,
    logprobs_out: list[TokenLogprob] | None = None,
) -> Iterator[int]:
    """Yield generated token ids (stop token excluded) as they are decided.

    With ``num_beams > 1`` the hypotheses compete until the end, so the best one is yielded only once the
    search is over. When the iterator ends — stop id, ``max_new_tokens``, or ``cancel`` set (checked
    between tokens; no exception) — a :class:`GenerationOutput` is appended to ``output`` if given
    (``text`` is filled when ``tokenizer`` is given).

    ``prefix``: the keys/values of the prompt's first ``P = prefix.length`` positions, computed earlier
    for the same model, dtype and device (:class:`~hd4k_tools.runtime.kv_prefix_cache.PrefixKVCache`); ``inputs``
    then hold only the rest of the prompt, positions ``P..``, and only those are prefilled. Results equal
    those of the whole prompt without a prefix (causal attention: positions ``< P`` never see later
    ones). ``on_prefill(cache)`` is called once, right after the prompt prefill, with a one-row
    :class:`KVCache` whose positions ``0..num_prompt_tokens-1`` are filled (prefix included); it may copy
    from it (:meth:`KVCache.snapshot`) but must neither keep nor modify it.

    ``constraint`` restricts every step's choice (constrained decoding; one beam only). With
    ``config.logprobs``, ``logprobs_out`` (if given) receives each token's :class:`TokenLogprob` before the
    token is yielded.
    """
    config = config or GenerationConfig()
    stops = _check_inputs(inputs, stop_ids, prefix)
    stats = _RunStats()
    if logprobs_out is not None:  # the caller watches the entries as they come (streaming)
        stats.logprobs = logprobs_out
    hooks = {"prefix": prefix, "on_prefill": on_prefill}
    if config.num_beams == 1:
        yield from _sample_steps(model, inputs, config, stops, cancel, stats, constraint=constraint, **hooks)
    else:
        if constraint is not None:
            raise InputError(
                "Constrained decoding (a JSON response format) runs with one beam: use num_beams=1 (greedy or "
                "sampling)."
            )
        _beam_search(model, inputs, config, stops, cancel, stats, **hooks)
        yield from stats.tokens
    if output is not None:
        output.append(_output(stats, inputs, tokenizer, prefix, config.logprobs))


def generate(
    model: torch.nn.Module,
    inputs: PromptInputs,
    config: GenerationConfig | None = None,
    *,
    stop_ids: Collection[int],
    cancel: threading.Event | None = None,
    tokenizer: _Tokenizer | None = None,
    prefix: KVPrefix | None = None,
    on_prefill: Callable[[KVCache], None] | None = None,
    constraint: TokenConstraint | None = None,
) -> GenerationOutput:
    """Generate a reply to ``inputs`` (see the module docstring for the semantics).

    ``stop_ids`` is usually :func:`stop_ids_for` ``(tokenizer)``. If ``cancel`` is set the result holds
    the tokens produced so far and ``finish_reason == "cancelled"``. ``text`` is decoded (official
    post-processing, :func:`decode_output`) when ``tokenizer`` is given, else left empty. ``prefix`` and
    ``on_prefill`` as in :func:`iter_tokens` (``num_prompt_tokens`` counts the prefix).
    """
    box: list[GenerationOutput] = []
    for _ in iter_tokens(
        model,
        inputs,
        config,
        stop_ids=stop_ids,
        cancel=cancel,
        output=box,
        tokenizer=tokenizer,
        prefix=prefix,
        on_prefill=on_prefill,
        constraint=constraint,
    ):
        pass
    return box[0]


def stream(
    model: torch.nn.Module,
    tokenizer: _Tokenizer,
    inputs: PromptInputs,
    config: GenerationConfig | None = None,
    *,
    stop_ids: Collection[int] | None = None,
    cancel: threading.Event | None = None,
    output: list[GenerationOutput] | None = None,
    prefix: KVPrefix | None = None,
) -> Iterator[str]:
    """Text deltas of a generation: :func:`stream_text` over :func:`iter_tokens` (stop ids default to
    :func:`stop_ids_for` ``(tokenizer)``; ``prefix`` as there)."""
    stops = stop_ids_for(tokenizer) if stop_ids is None else stop_ids
    tokens = iter_tokens(
        model, inputs, config, stop_ids=stops, cancel=cancel, output=output, tokenizer=tokenizer, prefix=prefix
    )
    yield from stream_text(tokenizer, tokens)
