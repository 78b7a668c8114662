"""Constrained decoding for the native engine: a JSON schema (or "any JSON object") as a per-step token
mask, computed by llguidance (the Rust grammar engine vLLM also ships) over the model's own vocabulary.

* **Vocabulary.** llguidance needs every token's bytes. They come from the checkpoint's sentencepiece
  model (:class:`~hd4k_tools.models.xcomposer2_4khd.tokenizer.InternLM2Tokenizer`): ``▁`` is a space,
  byte-fallback pieces ``<0xE4>`` are that single byte (so multi-byte characters are spelled byte by byte
  and only valid UTF-8 is ever allowed), control pieces and the chat markers are special tokens (never
  allowed inside the JSON), and rows of the model's vocabulary beyond the tokenizer's are dead tokens.
  Both stop ids (``</s>`` and ``[UNUSED_TOKEN_145]``) end the answer, and only where the JSON is
  complete. :class:`GrammarVocabulary` builds this once per runner (about a millisecond per thousand
  tokens) and compiles grammars against it.
* **Grammar.** ``whitespace_flexible`` is off: the JSON is compact (``{"a":1}``), so a model cannot spend
  its budget on whitespace. Unknown keywords are refused (llguidance's ``lenient`` off): the error names
  the keyword, and the server answers 400 before any model work.
* **Termination.** A schema-valid answer always exists, but a model (random weights, or a real one
  rambling inside a string) need not head for it. In the last :data:`WRAP_UP_TOKENS` steps of the budget
  (at most half of it) the choice is narrowed, within the grammar's mask, to a stop id where the JSON
  may end, else tokens made only of ``"``, ``}``, ``]`` (closing what is open), else tokens made only of
  ``,``, ``:`` and digits (the shortest way through required fields, numbers and arrays); the model's
  scores still pick among them. If the budget still runs out before the JSON is complete, the caller
  raises :class:`~hd4k_tools.structured.StructuredOutputTruncatedError` (never returns invalid JSON).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

import numpy as np
import torch

from hd4k_tools.errors import InputError, MissingDependencyError
from hd4k_tools.structured import JSONConstraint

__all__ = ["WRAP_UP_TOKENS", "GrammarVocabulary", "JSONMatcher"]

#: Steps before the end of ``max_new_tokens`` from which the grammar steers towards closing the JSON.
WRAP_UP_TOKENS = 64
_SPECIAL = b"\xff"  # llguidance's marker of a special token's bytes
_COMPILE_OPTIONS = {"whitespace_flexible": False, "lenient": False}
_CLOSERS = frozenset(b'"}]')
_SHORT = frozenset(b",:0123456789")


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as err:  # pragma: no cover - part of the local extra
        raise MissingDependencyError(
            "Constrained decoding (response_format json_object/json_schema) on the native engine needs "
            "llguidance: pip install 'hd4k-tools[local]' (or pip install 'llguidance>=1.7.3,<2')."
        ) from err
    return llguidance


def _piece_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes a sentencepiece piece stands for (see the module docstring)."""
    sp = tokenizer._sp
    piece = sp.id_to_piece(token_id)
    if token_id in tokenizer.special_ids or sp.is_control(token_id) or sp.is_unknown(token_id):
        return _SPECIAL + piece.encode("utf-8")
    if sp.is_byte(token_id):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


class _Wrapper:
    """What ``llguidance.TokenizerWrapper`` reads from a tokenizer."""

    def __init__(self, tokenizer: Any, n_vocab: int, stop_ids: Collection[int]) -> None:
        self.eos_token_id = int(tokenizer.eos_id)
        self.bos_token_id = int(tokenizer.bos_id)
        size = int(tokenizer.vocab_size)
        self.tokens = [_piece_bytes(tokenizer, i) for i in range(size)]
        # Rows of the embedding past the tokenizer's vocabulary: never produced by the tokenizer.
        self.tokens += [_SPECIAL + f"<extra_{i}>".encode() for i in range(size, n_vocab)]
        self.special_token_ids = sorted({*tokenizer.special_ids, *stop_ids})
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_bos=False))


class GrammarVocabulary:
    """The model's vocabulary as llguidance sees it, plus the token classes used to wrap up. One per
    runner (tokenizer + model vocabulary size); :meth:`matcher` compiles a :class:`JSONConstraint`."""

    def __init__(self, tokenizer: Any, n_vocab: int, stop_ids: Collection[int]) -> None:
        llg = _llguidance()
        wrapper = _Wrapper(tokenizer, n_vocab, stop_ids)
        self.n_vocab = n_vocab
        self.stop_ids = sorted(int(i) for i in stop_ids)
        self._llg = llg
        self.tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(wrapper), n_vocab=n_vocab, eos_token=self.stop_ids)
        closers = np.zeros(n_vocab, dtype=np.bool_)
        short = np.zeros(n_vocab, dtype=np.bool_)
        for i, raw in enumerate(wrapper.tokens):
            if raw and not raw.startswith(_SPECIAL):
                chars = set(raw)
                closers[i] = chars <= _CLOSERS
                short[i] = chars <= _SHORT
        self.closers = closers  # [V]
        self.short = short  # [V]
        self.stop_array = np.array(self.stop_ids, dtype=np.int64)
        self._grammars: dict[str | None, str] = {}

    def grammar(self, constraint: JSONConstraint) -> str:
        """The llguidance grammar of ``constraint`` (cached by schema text).

        Raises:
            InputError: the schema uses a keyword or a construct the grammar engine cannot compile (named).
        """
        key = constraint.schema_json
        if key in self._grammars:
            return self._grammars[key]
        schema: dict[str, Any] = json.loads(key) if key is not None else {"type": "object"}
        llm = self._llg.LLMatcher
        try:
            grammar = llm.grammar_from_json_schema(schema, overrides=_COMPILE_OPTIONS)
        except ValueError as err:
            raise InputError(f"The JSON schema cannot be compiled for constrained decoding: {err}") from err
        is_error, messages = llm.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise InputError(
                "The JSON schema cannot be used for constrained decoding (the grammar engine, llguidance, "
                f"refused it): {'; '.join(messages)[:500]}. Drop or rewrite that keyword."
            )
        if len(self._grammars) > 64:  # schemas are client data: keep the cache small
            self._grammars.clear()
        self._grammars[key] = grammar
        return grammar

    def matcher(self, constraint: JSONConstraint) -> JSONMatcher:
        """A fresh matcher for one generation."""
        return JSONMatcher(self, self._llg.LLMatcher(self.tokenizer, self.grammar(constraint)))


class JSONMatcher:
    """One generation's grammar state: masks scores, follows the chosen tokens."""

    def __init__(self, vocab: GrammarVocabulary, matcher: Any) -> None:
        self.vocab = vocab
        self._matcher = matcher
        if matcher.is_error():  # pragma: no cover - grammar() validated it
            raise InputError(f"The constrained-decoding grammar failed to start: {matcher.get_error()}")

    def _allowed(self) -> np.ndarray:
        """Tokens the grammar allows next, as a bool array ``[V]``: llguidance's bitmask (bit ``i`` of
        little-endian 32-bit word ``j`` is token ``32 * j + i``) unpacked in one numpy call (numpy, not
        torch: on a few thousand elements its per-call overhead is ten times smaller)."""
        words = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)  # [4 * ceil(V/32)]
        return np.unpackbits(words, bitorder="little")[: self.vocab.n_vocab].view(np.bool_)  # [V]

    def allowed(self) -> torch.Tensor:
        """Tokens the grammar allows next, as a bool tensor ``[V]`` (CPU)."""
        return torch.from_numpy(self._allowed().copy())

    def mask_(self, scores: torch.Tensor, remaining: int, max_new_tokens: int) -> torch.Tensor:
        """Set disallowed tokens of ``scores [1, V]`` to -inf (in place); near the end of the budget
        (``remaining`` steps left) narrow to the tokens that close the JSON (module docstring)."""
        allowed = self._allowed()  # [V]
        if scores.shape[-1] != allowed.shape[0]:  # pragma: no cover - vocab built from the same model
            raise ValueError(f"scores have {scores.shape[-1]} columns, the grammar vocabulary {allowed.shape[0]}")
        if remaining <= min(WRAP_UP_TOKENS, max_new_tokens // 2):
            vocab = self.vocab
            stops = allowed[vocab.stop_array]
            if stops.any():
                narrowed = np.zeros_like(allowed)
                narrowed[vocab.stop_array] = stops
                allowed = narrowed
            else:
                for cls in (vocab.closers, vocab.short):
                    both = allowed & cls
                    if both.any():
                        allowed = both
                        break
        disallowed = torch.from_numpy(~allowed).to(scores.device, non_blocking=True)  # [V]
        return scores.masked_fill_(disallowed, float("-inf"))

    def advance(self, token: int) -> None:
        """Follow the chosen token (a stop id ends the grammar)."""
        if not self._matcher.consume_token(int(token)):  # pragma: no cover - tokens come from the mask
            raise RuntimeError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """Whether what was generated so far is a whole, valid JSON answer."""
        return bool(self._matcher.is_accepting())
