"""Constrained decoding in the native engine (issue 21): random weights still answer schema-valid JSON for a
catalogue of schemas, generation always ends (complete JSON or a typed error), schemas the grammar engine
cannot compile are refused before any model work; OpenAI's logprobs, penalties and logit_bias in the
sampling loop; ChatHD4K / LlamaIndex structured paths and create_agent in process."""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema
import numpy as np
import pytest
import torch
from pydantic import BaseModel, Field

pytest.importorskip("llguidance")

from hd4k_tools.errors import InputError
from hd4k_tools.runtime.generation_config import GenerationConfig
from hd4k_tools.runtime.grammar import WRAP_UP_TOKENS, JSONMatcher, apply_bitmask_
from hd4k_tools.runtime.runner import GenerationRequest, Message
from hd4k_tools.structured import JSONConstraint, StructuredOutputTruncatedError

CATALOGUE: dict[str, dict[str, Any] | None] = {
    "any_object": None,
    "flat_required": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested_objects": {
        "type": "object",
        "properties": {
            "invoice": {
                "type": "object",
                "properties": {"id": {"type": "string"}, "buyer": {"$ref": "#/$defs/Party"}},
                "required": ["id", "buyer"],
            }
        },
        "required": ["invoice"],
        "$defs": {"Party": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
            "points": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}},
        },
        "required": ["tags", "points"],
    },
    "enums_and_const": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "kind": {"const": "chart"},
            "flag": {"type": "boolean"},
            "nothing": {"type": "null"},
        },
        "required": ["color", "kind", "flag", "nothing"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "integer"}, "c": {"type": "boolean"}},
        "required": ["a"],
    },
    "string_patterns": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
            "short": {"type": "string", "minLength": 2, "maxLength": 5},
        },
        "required": ["code", "short"],
    },
    "number_bounds": {
        "type": "object",
        "properties": {
            "pct": {"type": "number", "minimum": 0, "maximum": 100},
            "count": {"type": "integer", "minimum": 10, "maximum": 20},
            "neg": {"type": "integer", "exclusiveMaximum": 0},
        },
        "required": ["pct", "count", "neg"],
    },
    "unions": {
        "type": "object",
        "properties": {"v": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 4}, {"type": "null"}]}},
        "required": ["v"],
    },
}


def _ask(runner, constraint: JSONConstraint | None, **generation: Any):
    config = GenerationConfig(**{"max_new_tokens": 160, **generation})
    request = GenerationRequest((Message.user("Answer in JSON."),), generation=config, constraint=constraint)
    return runner.generate(request)


@pytest.mark.parametrize("name", list(CATALOGUE))
@pytest.mark.parametrize(
    "sampling", [{}, {"do_sample": True, "temperature": 1.0, "seed": 7}], ids=["greedy", "sampled"]
)
def test_random_weights_answer_schema_valid_json(hd4k_tiny, name: str, sampling: dict[str, Any]) -> None:
    schema = CATALOGUE[name]
    result = _ask(hd4k_tiny.runner, JSONConstraint.of(schema), **sampling)
    data = json.loads(result.text)
    assert isinstance(data, dict)
    if schema is not None:
        jsonschema.validate(data, schema)
    assert result.finish_reason in ("stop", "length")


def test_unconstrained_random_weights_are_not_json(hd4k_tiny) -> None:
    """The catalogue above passes because of the constraint: without it the tiny model writes noise."""
    with pytest.raises(json.JSONDecodeError):
        json.loads(_ask(hd4k_tiny.runner, None, max_new_tokens=40).text)


def test_a_budget_too_small_for_the_json_is_a_typed_error(hd4k_tiny) -> None:
    schema = CATALOGUE["nested_objects"]
    with pytest.raises(StructuredOutputTruncatedError, match="max_new_tokens=3"):
        _ask(hd4k_tiny.runner, JSONConstraint.of(schema), max_new_tokens=3)
    stream = hd4k_tiny.runner.stream(
        GenerationRequest(
            (Message.user("?"),), generation=GenerationConfig(max_new_tokens=3), constraint=JSONConstraint.of(schema)
        )
    )
    with pytest.raises(StructuredOutputTruncatedError):
        list(stream)


def test_uncompilable_schemas_are_refused_before_model_work(hd4k_tiny, monkeypatch) -> None:
    runner = hd4k_tiny.runner
    monkeypatch.setattr(runner, "encode", lambda *a, **k: pytest.fail("model work for a refused schema"))
    for schema, keyword in (
        ({"type": "object", "dependentSchemas": {"a": {}}}, "dependentSchemas"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ):
        with pytest.raises(InputError, match=keyword):
            _ask(runner, JSONConstraint.of(schema))


def test_constraint_with_beams_is_refused(hd4k_tiny) -> None:
    with pytest.raises(InputError, match="one beam"):
        _ask(hd4k_tiny.runner, JSONConstraint.of(None), num_beams=2)


# -- logprobs, penalties, logit_bias in the sampling loop ------------------------------------------------------
def test_logprobs_are_the_models_own(hd4k_tiny) -> None:
    result = _ask(hd4k_tiny.runner, None, max_new_tokens=5, logprobs=True, top_logprobs=4)
    assert len(result.logprobs) == result.usage.completion_tokens == 5
    first = result.logprobs[0]
    # Greedy: the chosen token is the most likely one, and the top list is sorted.
    assert first.token == first.top_logprobs[0].token and first.logprob == pytest.approx(first.top_logprobs[0].logprob)
    assert [t.logprob for t in first.top_logprobs] == sorted((t.logprob for t in first.top_logprobs), reverse=True)
    assert bytes(first.bytes).decode("utf-8", errors="replace") == first.token
    assert _ask(hd4k_tiny.runner, None, max_new_tokens=2).logprobs is None


def test_logit_bias_forces_and_bans_tokens(hd4k_tiny) -> None:
    base = _ask(hd4k_tiny.runner, None, max_new_tokens=6, logprobs=True)
    forced = _ask(hd4k_tiny.runner, None, max_new_tokens=6, logprobs=True, logit_bias={"300": 100})
    assert {e.token for e in forced.logprobs} == {forced.logprobs[0].token} and forced.text != base.text
    first = base.logprobs[0]
    banned = _ask(hd4k_tiny.runner, None, max_new_tokens=6, logprobs=True, logit_bias={_id_of(hd4k_tiny, first): -100})
    assert banned.logprobs[0].token != first.token


def _id_of(hd4k_tiny, entry) -> str:
    """The id of a logprob entry's token (its piece: spaces are sentencepiece's ``▁``)."""
    return str(hd4k_tiny.runner.tokenizer.convert_tokens_to_ids(entry.token.replace(" ", "\u2581")))


def test_penalties_discourage_repeats(hd4k_tiny) -> None:
    base = _ask(hd4k_tiny.runner, None, max_new_tokens=30, logprobs=True)
    tokens = [e.token for e in base.logprobs]
    repeated = len(tokens) - len(set(tokens))
    assert repeated > 0  # the tiny model repeats itself greedily
    for option in ("frequency_penalty", "presence_penalty"):
        penalised = [
            e.token for e in _ask(hd4k_tiny.runner, None, max_new_tokens=30, logprobs=True, **{option: 2.0}).logprobs
        ]
        assert len(penalised) - len(set(penalised)) < repeated
    negative = [
        e.token for e in _ask(hd4k_tiny.runner, None, max_new_tokens=30, logprobs=True, presence_penalty=-2.0).logprobs
    ]
    assert len(negative) - len(set(negative)) >= repeated


def test_logit_bias_token_outside_the_vocabulary_is_refused(hd4k_tiny) -> None:
    with pytest.raises(InputError, match="vocabulary"):
        _ask(hd4k_tiny.runner, None, logit_bias={"10000000": 1})


# -- framework structured paths in process ---------------------------------------------------------------------
class Chart(BaseModel):
    """What a chart shows."""

    title: str = Field(max_length=20)
    kind: Literal["bar", "line", "pie"]
    values: list[int] = Field(max_length=3)


def test_chat_hd4k_structured_output_and_create_agent(hd4k_tiny) -> None:
    pytest.importorskip("langchain_hd4k")
    from langchain.agents import create_agent
    from langchain_hd4k import ChatHD4K

    chat = ChatHD4K(hd=hd4k_tiny, max_new_tokens=120)
    out = chat.with_structured_output(Chart).invoke("What does the chart show?")
    assert isinstance(out, Chart)
    raw = chat.with_structured_output(Chart, include_raw=True).invoke("The chart?")
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], Chart)
    agent = create_agent(chat, tools=[], response_format=Chart)
    state = agent.invoke({"messages": [{"role": "user", "content": "The chart?"}]})
    assert isinstance(state["structured_response"], Chart)


def test_llamaindex_structured_predict(hd4k_tiny) -> None:
    pytest.importorskip("llama_index.llms.hd4k")
    from llama_index.core.prompts import PromptTemplate
    from llama_index.llms.hd4k import HD4KMultiModalLLM

    llm = HD4KMultiModalLLM(hd=hd4k_tiny, max_new_tokens=120)
    assert isinstance(llm.structured_predict(Chart, PromptTemplate("The chart of {x}?"), x="sales"), Chart)


# -- the mask's fast path (runtime/grammar.py) -----------------------------------------------------------------
class _PlainMatcher:
    """The straightforward mask, written independently of ``JSONMatcher``'s fast paths: llguidance's bitmask
    as bytes, unpacked to ``[V]`` booleans, the wrap-up narrowing on those booleans (token classes read
    from llguidance's own token bytes), ``masked_fill_``. Without ``forced``/``allows`` (TokenConstraint's
    optional methods) greedy decoding masks every step and takes the argmax of the masked scores."""

    def __init__(self, vocab, constraint: JSONConstraint) -> None:
        import llguidance

        self._m = llguidance.LLMatcher(vocab.tokenizer, vocab.grammar(constraint))
        self.n = vocab.n_vocab
        tok = vocab.tokenizer
        pieces = [b"" if tok.is_special_token(i) else tok.decode_bytes([i]) for i in range(self.n)]
        self.closers = np.array([bool(p) and set(p) <= set(b'"}]') for p in pieces])  # [V]
        self.short = np.array([bool(p) and set(p) <= set(b",:0123456789") for p in pieces])  # [V]
        self.stops = np.array(vocab.stop_ids)
        self.wrapped_up = 0  # steps narrowed (the test checks the narrowing was exercised)

    def mask_(self, scores: torch.Tensor, remaining: int, max_new_tokens: int) -> torch.Tensor:
        bits = np.unpackbits(np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = bits[: self.n].astype(bool)  # [V]
        if remaining <= min(WRAP_UP_TOKENS, max_new_tokens // 2):
            self.wrapped_up += 1
            if allowed[self.stops].any():
                narrowed = np.zeros_like(allowed)
                narrowed[self.stops] = allowed[self.stops]
                allowed = narrowed
            else:
                for cls in (self.closers, self.short):
                    if (allowed & cls).any():
                        allowed = allowed & cls
                        break
        return scores.masked_fill_(torch.from_numpy(~allowed), float("-inf"))

    def advance(self, token: int) -> None:
        assert self._m.consume_token(token)

    @property
    def complete(self) -> bool:
        return bool(self._m.is_accepting())


def _outcome(runner, constraint: JSONConstraint, **generation: Any) -> tuple[str, str, int] | str:
    try:
        result = _ask(runner, constraint, **generation)
    except StructuredOutputTruncatedError:
        return "truncated"
    return result.text, result.finish_reason, result.usage.completion_tokens


@pytest.mark.parametrize(
    "sampling", [{}, {"do_sample": True, "temperature": 1.0, "seed": 3}], ids=["greedy", "sampled"]
)
def test_the_fast_mask_chooses_what_the_plain_mask_chooses(hd4k_tiny, monkeypatch, sampling: dict[str, Any]) -> None:
    """Over the whole catalogue, with a budget whose second half is wrapped up: the same answers, token
    for token, as the straightforward mask (greedy, and sampling with a seed)."""
    runner = hd4k_tiny.runner
    vocab = runner.grammar_vocabulary()
    plain: list[_PlainMatcher] = []
    shortcuts = {"forced": 0, "allows": 0}
    for name in shortcuts:
        method = getattr(JSONMatcher, name)

        def counted(self, *args, _method=method, _name=name):
            answer = _method(self, *args)
            shortcuts[_name] += answer not in (None, False)
            return answer

        monkeypatch.setattr(JSONMatcher, name, counted)

    def plain_matcher(constraint: JSONConstraint) -> _PlainMatcher:
        plain.append(_PlainMatcher(vocab, constraint))
        return plain[-1]

    for name, schema in CATALOGUE.items():
        constraint = JSONConstraint.of(schema)
        fast = _outcome(runner, constraint, max_new_tokens=48, **sampling)
        with monkeypatch.context() as patch:
            patch.setattr(vocab, "matcher", plain_matcher)
            assert _outcome(runner, constraint, max_new_tokens=48, **sampling) == fast, name
    assert sum(m.wrapped_up for m in plain) > 0 and len(plain) == len(CATALOGUE)
    # The fast matcher took its shortcuts: forced tokens, and (greedy) the unmasked argmax when allowed.
    assert shortcuts["forced"] > 0 and (shortcuts["allows"] > 0) == (not sampling)


@pytest.mark.parametrize("n_vocab", [1, 31, 32, 33, 800])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["numpy_view", "masked_fill"])
def test_apply_bitmask_sets_exactly_the_cleared_bits_to_minus_inf(n_vocab: int, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(n_vocab)
    words = rng.integers(-(2**31), 2**31, (n_vocab + 31) // 32, dtype=np.int64).astype(np.int32)  # [W]
    allowed = [bool((int(words[i // 32]) >> (i % 32)) & 1) for i in range(n_vocab)]
    for shape in ((1, n_vocab), (n_vocab,)):
        scores = torch.randn(shape, dtype=dtype)
        before = scores.clone()
        assert apply_bitmask_(scores, words) is scores
        flat, kept = scores.reshape(-1), before.reshape(-1)
        assert [bool(v > float("-inf")) for v in flat] == allowed
        assert torch.equal(flat[torch.tensor(allowed)], kept[torch.tensor(allowed)])
