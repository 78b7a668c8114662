"""Decoding settings, shared by every runner (torch-free, so remote clients and the CLI stay light)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from hd4k_tools.errors import ConflictingOptionsError, InputError, short_repr

__all__ = [
    "GENERATION_OPTIONS",
    "LOGIT_BIAS_RANGE",
    "MAX_LENGTH_PENALTY",
    "MAX_LOGIT_BIAS_ENTRIES",
    "MAX_NEW_TOKENS_LIMIT",
    "MAX_NUM_BEAMS",
    "MAX_SEED",
    "MAX_TOP_LOGPROBS",
    "OPENAI_PENALTY_RANGE",
    "PENALTY_RANGE",
    "TEMPERATURE_RANGE",
    "GenerationConfig",
    "GenerationOptions",
    "generation_keywords",
    "merge_generation",
]

#: Widest beam search accepted. Each beam keeps its own KV cache, so memory grows linearly with the
#: width; the authors evaluate with 3 beams, and past a handful the answers stop improving.
MAX_NUM_BEAMS = 16
#: Temperatures accepted. Far below the minimum, ``logits / temperature`` overflows float32 to inf and the
#: softmax turns into NaN; far above it, sampling is uniform noise. OpenAI accepts 0-2 (0 = greedy).
TEMPERATURE_RANGE = (1e-2, 100.0)
#: Repetition penalties accepted: the penalty divides or multiplies logits, with the same overflow risk.
PENALTY_RANGE = (1e-2, 100.0)
#: Largest ``|length_penalty|``: beam scores are divided by ``length ** length_penalty``, which overflows
#: float64 for large exponents. HF's default is 1.0; useful values are within a few units of it.
MAX_LENGTH_PENALTY = 10.0
#: Largest seed: torch generators take 64-bit unsigned seeds.
MAX_SEED = 2**64 - 1
#: OpenAI's range of presence_penalty and frequency_penalty.
OPENAI_PENALTY_RANGE = (-2.0, 2.0)
#: OpenAI's range of a logit_bias value.
LOGIT_BIAS_RANGE = (-100.0, 100.0)
#: Most logit_bias entries accepted (OpenAI's limit is 300 tokens).
MAX_LOGIT_BIAS_ENTRIES = 300
#: Most alternatives per token for top_logprobs (OpenAI's limit).
MAX_TOP_LOGPROBS = 20
#: Largest ``max_new_tokens`` accepted at all (each engine also caps it to its context).
MAX_NEW_TOKENS_LIMIT = 1 << 20


def _is_int(v: object) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    """A finite int or float that is not a bool."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


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
    #: OpenAI's penalties in [-2, 2] (0 disables): subtracted from a token's logit once it appeared
    #: (presence) and per appearance (frequency), counted over the generated tokens.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: ``(token_id, bias)`` pairs, bias in [-100, 100] added to that token's logit (OpenAI's ``logit_bias``;
    #: a mapping is accepted and stored sorted). Token ids are checked against the vocabulary by the engine.
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: Record each generated token's log-probability, and the ``top_logprobs`` (0..20) most likely tokens.
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        self._check_decoding()
        self._check_extras()

    def _check_decoding(self) -> None:
        """Validate the length, sampling and beam options."""
        is_int, is_num = _is_int, _is_num
        if not is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise InputError(
                f"max_new_tokens must be an int in [1, {MAX_NEW_TOKENS_LIMIT}], got {short_repr(self.max_new_tokens)}"
            )
        if not isinstance(self.do_sample, bool):
            raise InputError(f"do_sample must be True or False, got {short_repr(self.do_sample)}")
        low, high = TEMPERATURE_RANGE
        if not is_num(self.temperature) or not low <= self.temperature <= high:
            raise InputError(
                f"temperature must be a number in [{low:g}, {high:g}], got {short_repr(self.temperature)} (use "
                "do_sample=False for greedy decoding)"
            )
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {short_repr(self.top_p)} (1.0 disables nucleus sampling)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k must be an int >= 0, got {short_repr(self.top_k)} (0 disables top-k)")
        low, high = PENALTY_RANGE
        if not is_num(self.repetition_penalty) or not low <= self.repetition_penalty <= high:
            raise InputError(
                f"repetition_penalty must be a number in [{low:g}, {high:g}], got "
                f"{short_repr(self.repetition_penalty)} (1.0 disables it)"
            )
        if not is_int(self.num_beams) or self.num_beams < 1:
            raise InputError(f"num_beams must be an int >= 1, got {short_repr(self.num_beams)}")
        if self.num_beams > MAX_NUM_BEAMS:
            raise InputError(
                f"num_beams must be at most {MAX_NUM_BEAMS}, got {self.num_beams} (every beam holds its own "
                "KV cache; 3 is the authors' setting)"
            )
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise InputError(f"seed must be None or an int in [0, 2**64 - 1], got {short_repr(self.seed)}")
        if not is_num(self.length_penalty) or abs(self.length_penalty) > MAX_LENGTH_PENALTY:
            raise InputError(
                f"length_penalty must be a number in [-{MAX_LENGTH_PENALTY:g}, {MAX_LENGTH_PENALTY:g}], got "
                f"{short_repr(self.length_penalty)} (1.0 is the usual value)"
            )

    def _check_extras(self) -> None:
        """Validate the OpenAI penalties, logit_bias and logprobs, and the combinations refused."""
        is_int, is_num = _is_int, _is_num
        low, high = OPENAI_PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_num(value) or not low <= value <= high:
                raise InputError(
                    f"{name} must be a number in [{low:g}, {high:g}], got {short_repr(value)} (0 disables it)"
                )
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias, is_int, is_num))
        if not isinstance(self.logprobs, bool):
            raise InputError(f"logprobs must be True or False, got {short_repr(self.logprobs)}")
        if not is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InputError(
                f"top_logprobs must be an int in [0, {MAX_TOP_LOGPROBS}], got {short_repr(self.top_logprobs)}"
            )
        if self.top_logprobs and not self.logprobs:
            raise InputError("top_logprobs needs logprobs=True (OpenAI's rule).")
        if self.num_beams > 1 and (self.logprobs or self.presence_penalty or self.frequency_penalty or self.logit_bias):
            raise InputError(
                "logprobs, presence_penalty, frequency_penalty and logit_bias work with one beam (greedy or "
                "sampling): use num_beams=1."
            )
        if self.do_sample and self.num_beams > 1:
            raise InputError(
                "do_sample=True with num_beams>1 (beam sampling) is not supported: use num_beams=1 to "
                "sample, or do_sample=False for beam search."
            )

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


class GenerationOptions(TypedDict, total=False):
    """Generation options as keywords, the same names everywhere a user meets them (``HD4K``'s task
    methods, ``ChatHD4K``, ``ToolSettings``): :class:`GenerationConfig`'s fields, plus ``max_tokens`` (the
    OpenAI/LangChain name of ``max_new_tokens``). ``temperature`` follows LangChain and OpenAI: ``0`` is greedy
    decoding, a positive one turns sampling on unless ``do_sample`` says otherwise."""

    max_new_tokens: int
    max_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    num_beams: int
    seed: int
    length_penalty: float


#: Generation options accepted as keywords (:class:`GenerationOptions`).
GENERATION_OPTIONS: tuple[str, ...] = tuple(GenerationOptions.__annotations__)
_ALIASES = {"max_tokens": "max_new_tokens"}


def generation_keywords(options: Mapping[str, Any]) -> dict[str, Any]:
    """Generation keywords as :class:`GenerationConfig` fields: ``None`` dropped (the default), ``max_tokens``
    read as ``max_new_tokens``, ``temperature <= 0`` as greedy decoding and a positive one as sampling unless
    ``do_sample`` is given. Unknown names and an option given under both its names are typed errors."""
    unknown = sorted(set(options) - set(GENERATION_OPTIONS))
    if unknown:
        raise InputError(f"Unknown generation option(s) {unknown}; valid: {list(GENERATION_OPTIONS)}.")
    values: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        field = _ALIASES.get(name, name)
        if field in values:
            raise ConflictingOptionsError(f"{field} was given twice (as {name} too); give it once.")
        values[field] = value
    temperature = values.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        if temperature <= 0:
            # LangChain/OpenAI's convention for greedy decoding; GenerationConfig wants temperature > 0.
            del values["temperature"]
            values.setdefault("do_sample", False)
        else:
            values.setdefault("do_sample", True)
    return values


def merge_generation(
    generation: GenerationConfig | Mapping[str, Any] | None, keywords: Mapping[str, Any]
) -> GenerationConfig | dict[str, Any] | None:
    """The one place where ``generation=`` and generation keywords meet (every HD4K task method calls it).

    ``keywords`` (see :func:`generation_keywords`) are laid over a ``generation`` mapping, or replace fields
    of a :class:`GenerationConfig` (validated again). An option given both ways is a
    :class:`~hd4k_tools.errors.ConflictingOptionsError`: there is no silent winner.
    """
    if not keywords:
        return generation  # type: ignore[return-value]
    values = generation_keywords(keywords)
    if isinstance(generation, GenerationConfig):
        return generation.replace(**values)
    if generation is None:
        return values
    if not isinstance(generation, Mapping):
        raise InputError(
            f"generation must be a GenerationConfig or a mapping of option names to values, got "
            f"{type(generation).__name__}; e.g. generation={{'max_new_tokens': 256}}."
        )
    given = {_ALIASES.get(k, k) for k in keywords if keywords[k] is not None}
    both = sorted(given & {_ALIASES.get(k, k) for k in generation})
    if both:
        raise ConflictingOptionsError(
            f"{', '.join(both)} given both as a keyword and in generation=; pass each option once (either way works)."
        )
    return {**generation, **values}


def _logit_bias(value: Any, is_int: Any, is_num: Any) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted ``(token_id, bias)`` pairs: from a mapping (JSON object keys are strings of
    ids, as OpenAI sends them) or pairs."""
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = list(items)
    except TypeError:
        raise InputError(f"logit_bias must map token ids to biases, got {short_repr(value)}") from None
    if len(pairs) > MAX_LOGIT_BIAS_ENTRIES:
        raise InputError(f"logit_bias may name at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(pairs)}")
    out: dict[int, float] = {}
    low, high = LOGIT_BIAS_RANGE
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise InputError(f"logit_bias entries must be (token_id, bias) pairs, got {short_repr(pair)}")
        key, bias = pair
        if isinstance(key, str) and key.strip().lstrip("-").isdigit() and len(key) < 20:
            key = int(key)
        if not is_int(key) or key < 0:
            raise InputError(f"logit_bias keys must be token ids (ints >= 0), got {short_repr(key)}")
        if not is_num(bias) or not low <= bias <= high:
            raise InputError(f"logit_bias values must be numbers in [{low:g}, {high:g}], got {short_repr(bias)}")
        out[key] = float(bias)
    return tuple(sorted(out.items()))
