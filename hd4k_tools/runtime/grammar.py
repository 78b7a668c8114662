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
* **Per-step cost.** A tiny model's token takes a millisecond, so the matcher keeps its own work to tens
  of microseconds (benchmarks/RESULTS.md, "Constrained decoding"). Where the grammar forces the next bytes
  (``{"title":"``, ``","kind":"``, ...) llguidance allows one token, the first of their canonical
  tokenization (:meth:`JSONMatcher.forced`), known without a mask; otherwise llguidance writes its bitmask
  into a buffer the matcher owns, the wrap-up narrowing is integer arithmetic on it, and the mask reaches
  the scores through a numpy view. Greedy decoding asks :meth:`JSONMatcher.allows` about the unmasked
  argmax first and applies the mask only when the grammar refuses that token (the choice is the same
  either way).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

import numpy as np
import torch

from hd4k_tools.errors import InputError, MissingDependencyError
from hd4k_tools.structured import JSONConstraint

__all__ = ["WRAP_UP_TOKENS", "GrammarVocabulary", "JSONMatcher", "apply_bitmask_"]

#: Steps before the end of ``max_new_tokens`` from which the grammar steers towards closing the JSON.
WRAP_UP_TOKENS = 64
_SPECIAL = b"\xff"  # llguidance's marker of a special token's bytes
_COMPILE_OPTIONS = {"whitespace_flexible": False, "lenient": False}
_CLOSERS = frozenset(b'"}]')
_SHORT = frozenset(b",:0123456789")
_MEMO_SIZE = 4096  # tokenizations of forced bytes remembered per vocabulary (_Wrapper)


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
        self._memo: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        # llguidance tokenizes the grammar's forced bytes at every forced step (JSONMatcher.forced). They
        # are the schema's keys and punctuation, the same in every answer to a schema: remembered (a
        # bounded memo) they cost a dict lookup instead of a sentencepiece call from Rust through Python.
        ids = self._memo.get(text)
        if ids is None:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            ids = self._memo[text] = list(self._tokenizer.encode(text, add_bos=False))
        return ids


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
        stops = np.zeros(n_vocab, dtype=np.bool_)
        stops[self.stop_ids] = True
        self.n_words = (n_vocab + 31) // 32
        # The wrap-up classes (stop ids, closers, short tokens, in the order they are tried) as Python ints
        # whose bit i is token i, llguidance's bitmask read as one little-endian integer: narrowing the
        # grammar's mask is then an `&` and a truth test per class, well under a microsecond, where numpy's
        # fixed cost per call would be several.
        self.wrap_up_classes = tuple(_as_int(cls) for cls in (stops, closers, short))
        self.all_tokens = (1 << n_vocab) - 1
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


_UNKNOWN = -2  # JSONMatcher._forced before this step's forced bytes were read


class JSONMatcher:
    """One generation's grammar state: masks scores, follows the chosen tokens.

    Per step (module docstring, "Per-step cost") it works out the allowed tokens once, as an int whose bit
    ``i`` is token ``i``: the forced token alone, or llguidance's bitmask (written into a buffer the
    matcher owns) narrowed in the wrap-up window. :meth:`forced`, :meth:`allows` and :meth:`mask_` read
    it; :meth:`advance` moves to the next step."""

    def __init__(self, vocab: GrammarVocabulary, matcher: Any) -> None:
        self.vocab = vocab
        self._matcher = matcher
        if matcher.is_error():  # pragma: no cover - grammar() validated it
            raise InputError(f"The constrained-decoding grammar failed to start: {matcher.get_error()}")
        self._words = np.zeros(vocab.n_words, dtype=np.int32)  # [W] llguidance's bitmask, rewritten per step
        self._fill_args = (self._words.ctypes.data, self._words.nbytes)
        self._forced = _UNKNOWN  # this step's forced token (None: not forced)
        self._allowed: int | None = None  # this step's allowed tokens, once computed

    def forced(self) -> int | None:
        """The next token when the grammar allows only that one (the caller may take it without scoring),
        else ``None``.

        This is llguidance's own rule, not a guess: where the grammar forces the next bytes (its JSON
        grammars allow forcing, and the tokenizer given to it is canonical), its mask is exactly the first
        token of their canonical tokenization, ``compute_ff_tokens()[0]`` (``TokenParser.compute_mask``).
        Asking for those tokens costs no more than the mask would (a mask computed afterwards reuses
        them), and a forced step needs no mask at all; tests compare every choice with the plain mask's."""
        if self._forced == _UNKNOWN:
            tokens = self._matcher.compute_ff_tokens()
            self._forced = int(tokens[0]) if tokens else None
        return self._forced

    def _step_allowed(self, remaining: int, max_new_tokens: int) -> int:
        """This step's allowed tokens as an int (bit ``i`` = token ``i``; module docstring)."""
        if self._allowed is None:
            forced = self.forced()
            if forced is not None:  # a single token stays itself under the wrap-up narrowing
                self._allowed = 1 << forced
                return self._allowed
            # llguidance writes the bitmask (bit i of word j is token 32 * j + i) with the GIL released.
            self._matcher.unsafe_compute_mask_ptr(*self._fill_args)
            allowed = int.from_bytes(self._words, "little")
            if remaining <= min(WRAP_UP_TOKENS, max_new_tokens // 2):
                for cls in self.vocab.wrap_up_classes:  # a stop id where the JSON may end, else closers, ...
                    if narrowed := allowed & cls:
                        allowed = narrowed
                        break
            self._allowed = allowed
        return self._allowed

    def allows(self, token: int, remaining: int, max_new_tokens: int) -> bool:
        """Whether ``token`` is allowed next (``remaining`` steps left: the wrap-up narrowing counts)."""
        return bool(self._step_allowed(remaining, max_new_tokens) >> token & 1)

    def allowed(self) -> torch.Tensor:
        """Tokens the grammar allows next (llguidance's mask, no narrowing), as a bool tensor ``[V]`` (CPU)."""
        self._matcher.unsafe_compute_mask_ptr(*self._fill_args)
        return torch.from_numpy(_bits(self._words.tobytes(), self.vocab.n_vocab).copy())  # [V]

    def mask_(self, scores: torch.Tensor, remaining: int, max_new_tokens: int) -> torch.Tensor:
        """Set disallowed tokens of ``scores [1, V]`` to -inf (in place); near the end of the budget
        (``remaining`` steps left) narrow to the tokens that close the JSON (module docstring)."""
        vocab = self.vocab
        if scores.shape[-1] != vocab.n_vocab:  # pragma: no cover - vocab built from the same model
            raise ValueError(f"scores have {scores.shape[-1]} columns, the grammar vocabulary {vocab.n_vocab}")
        disallowed = vocab.all_tokens ^ self._step_allowed(remaining, max_new_tokens)
        return _fill_(scores, _bits(disallowed.to_bytes(self._words.nbytes, "little"), vocab.n_vocab))

    def advance(self, token: int) -> None:
        """Follow the chosen token (a stop id ends the grammar)."""
        if not self._matcher.consume_token(int(token)):  # pragma: no cover - tokens come from the mask
            raise RuntimeError(f"the grammar refused token {token}: {self._matcher.get_error()}")
        self._forced, self._allowed = _UNKNOWN, None

    @property
    def complete(self) -> bool:
        """Whether what was generated so far is a whole, valid JSON answer."""
        return bool(self._matcher.is_accepting())


def _as_int(tokens: np.ndarray) -> int:
    """A bool array ``[V]`` as an int whose bit ``i`` is token ``i``."""
    return int.from_bytes(np.packbits(tokens, bitorder="little").tobytes(), "little")


def apply_bitmask_(scores: torch.Tensor, words: np.ndarray) -> torch.Tensor:
    """Set the scores ``[..., V]`` of the tokens whose bit is clear in ``words [W]`` (llguidance's int32
    bitmask: bit ``i`` of word ``j`` is token ``32 * j + i``) to -inf, in place."""
    return _fill_(scores, _bits(np.invert(np.asarray(words, dtype=np.int32)).tobytes(), scores.shape[-1]))


def _bits(packed: bytes, n: int) -> np.ndarray:
    """The first ``n`` bits of ``packed`` (little-endian, bit ``i`` of byte ``j`` is item ``8 * j + i``)
    as a bool array ``[n]``."""
    return np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=n, bitorder="little").view(np.bool_)


def _fill_(scores: torch.Tensor, where: np.ndarray) -> torch.Tensor:
    """Set ``scores [..., V]`` to -inf where ``where [V]`` is true, in place.

    On CPU float32 scores (the decode loop's) this writes through a numpy view: one ``copyto`` instead of
    building a bool tensor and calling ``masked_fill_``, whose fixed cost dominates at small vocabularies."""
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and not scores.requires_grad:
        np.copyto(scores.numpy(), -np.inf, where=where)  # broadcasts [V] over the leading dims
        return scores
    return scores.masked_fill_(torch.from_numpy(where).to(scores.device), float("-inf"))
