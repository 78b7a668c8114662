"""InternLM2 tokenizer on sentencepiece, read from a checkpoint's ``tokenizer.model``.

Mirrors the official ``InternLMXComposer2Tokenizer`` (transformers 4.33 slow tokenizer over
``sp_model.encode(text, out_type=str)``), without transformers:

* **Encoding.** The text goes to sentencepiece as is, so the model's own normalizer settings apply
  (``add_dummy_prefix``, whitespace handling). The chat markers ``[UNUSED_TOKEN_146]`` (im_start) and
  ``[UNUSED_TOKEN_145]`` (im_end) are user-defined pieces of InternLM2's model, which sentencepiece
  matches atomically anywhere in the text. Special strings that a model does *not* match atomically
  (``<s>``, ``</s>``, ``<unk>`` are control pieces; or a model where the chat markers are ordinary
  pieces) are split out first and mapped to their ids, the text between them encoded piece by piece —
  which is what the transformers slow tokenizer does for its special tokens. Both paths give the same
  ids as the official tokenizer.
* **BOS.** ``encode(text, add_bos=True)`` prepends ``<s>`` (official ``add_bos_token=True``).
* **Decoding.** ``sp.decode`` of the ids with the special ids dropped (``skip_special_tokens=True``
  drops bos/eos/unk/pad *and* the chat markers; the official decoder keeps the marker text and its
  ``chat()`` cuts at ``[UNUSED_TOKEN_145]`` afterwards, which is equivalent for generated replies).
  The official decoder's leading-space juggling (``_maybe_add_prefix_space`` + ``[1:]``) is not
  copied: sentencepiece's own rule (strip the dummy-prefix space of the first piece when the model
  adds one) is used.
* **Streaming.** :meth:`InternLM2Tokenizer.decode_incremental` decodes a growing id list into text
  deltas, holding back text while the tail ends in an incomplete UTF-8 sequence (byte-fallback pieces
  ``<0xE4>`` etc. decode to U+FFFD until the character is complete).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from hd4k_tools.errors import CheckpointError, InputError
from hd4k_tools.models.xcomposer2_4khd.hub import TOKENIZER_FILE
from hd4k_tools.models.xcomposer2_4khd.special_tokens import IM_END, IM_START

_REPLACEMENT_CHAR = "\ufffd"


class InternLM2Tokenizer:
    """Sentencepiece tokenizer of InternLM2 / InternLM-XComposer2 (see the module docstring)."""

    def __init__(self, model_proto: bytes, *, source: str = "<bytes>") -> None:
        self.source = source
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as exc:
            raise CheckpointError(
                f"{source} is not a sentencepiece model ({exc}); re-download tokenizer.model."
            ) from exc
        self._bos_id = self._require_special(self._sp.bos_id(), "bos (<s>)")
        self._eos_id = self._require_special(self._sp.eos_id(), "eos (</s>)")
        self._unk_id = self._require_special(self._sp.unk_id(), "unk (<unk>)")
        self._pad_id = self._sp.pad_id()
        self._im_start_id = self._require_piece(IM_START)
        self._im_end_id = self._require_piece(IM_END)
        special = {self._bos_id, self._eos_id, self._unk_id, self._im_start_id, self._im_end_id}
        if self._pad_id >= 0:
            special.add(self._pad_id)
        self._special_ids = frozenset(special)
        # Special strings that sentencepiece would not map to their single id by itself.
        names = {self._sp.id_to_piece(i): i for i in sorted(self._special_ids)}
        self._split_tokens = {tok: i for tok, i in names.items() if not self._matched_natively(tok, i)}
        self._split_re = (
            re.compile("(" + "|".join(re.escape(t) for t in sorted(self._split_tokens, key=len)[::-1]) + ")")
            if self._split_tokens
            else None
        )

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> InternLM2Tokenizer:
        """Load ``tokenizer.model`` from a checkpoint folder (or the file itself)."""
        p = Path(path)
        file = p / TOKENIZER_FILE if p.is_dir() else p
        try:
            data = file.read_bytes()
        except FileNotFoundError as exc:
            raise CheckpointError(
                f"{file} not found: the checkpoint folder needs tokenizer.model (download the whole "
                "repository, e.g. `huggingface-cli download internlm/internlm-xcomposer2-4khd-7b "
                "--local-dir DIR`)."
            ) from exc
        return cls(data, source=str(file))

    def _require_special(self, idx: int, what: str) -> int:
        if idx < 0:
            raise CheckpointError(f"{self.source}: the sentencepiece model defines no {what} token.")
        return idx

    def _require_piece(self, piece: str) -> int:
        idx = self._sp.piece_to_id(piece)
        if idx == self._sp.unk_id() or self._sp.id_to_piece(idx) != piece:
            raise CheckpointError(
                f"{self.source}: the sentencepiece model has no {piece!r} piece; this is not an "
                "InternLM2 / InternLM-XComposer2 tokenizer."
            )
        return idx

    def _matched_natively(self, token: str, idx: int) -> bool:
        # User-defined pieces are matched by sentencepiece anywhere in the text; control pieces never.
        return idx in self._sp.encode("a" + token + "a")

    # ------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def pad_id(self) -> int:
        """The sentencepiece pad id, else eos (the official ``pad_token`` is ``</s>``)."""
        return self._pad_id if self._pad_id >= 0 else self._eos_id

    @property
    def im_start_id(self) -> int:
        """``[UNUSED_TOKEN_146]``: start of a chat turn."""
        return self._im_start_id

    @property
    def im_end_id(self) -> int:
        """``[UNUSED_TOKEN_145]``: end of a chat turn (a stop id next to eos)."""
        return self._im_end_id

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids dropped by ``decode(..., skip_special_tokens=True)``."""
        return self._special_ids

    def convert_tokens_to_ids(self, token: str) -> int:
        """Id of a piece; :class:`KeyError` if the model does not have it."""
        idx = self._sp.piece_to_id(token)
        if self._sp.id_to_piece(idx) != token:
            raise KeyError(f"{token!r} is not a piece of {self.source}")
        return idx

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._sp.id_to_piece(int(i)) for i in ids]

    # ------------------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings map to their single ids (trusted text only:
        prompt builders refuse them in untrusted text first, see ``prompt.check_untrusted_text``).

        Raises:
            InputError: ``text`` is not a str or holds a lone surrogate (not encodable as UTF-8).
        """
        if not isinstance(text, str):
            raise InputError(f"the tokenizer encodes str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InputError(
                f"the text contains {text[err.start : err.end]!r} at position {err.start}, a lone surrogate that "
                "is not valid Unicode text; fix the text's encoding."
            ) from None
        ids: list[int] = [self._bos_id] if add_bos else []
        parts = self._split_re.split(text) if self._split_re is not None else [text]
        for part in parts:
            if not part:
                continue
            special = self._split_tokens.get(part)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self._sp.encode(part))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """Pieces of ``text`` (no BOS)."""
        return self.convert_ids_to_tokens(self.encode(text, add_bos=False))

    def decode(self, ids: Sequence[int] | Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. With ``skip_special_tokens=False`` special tokens appear as their strings."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in self._special_ids])
        # Special pieces are decoded to their literal text, the runs between them by sentencepiece.
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special_ids:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def decode_incremental(
        self,
        ids: Sequence[int],
        prefix_offset: int = 0,
        read_offset: int = 0,
        *,
        skip_special_tokens: bool = True,
    ) -> tuple[str, int, int]:
        """Streaming detokenisation: the text added by ``ids[read_offset:]``.

        Call with the whole id list generated so far and the offsets returned by the previous call
        (start with ``0, 0``, or ``len(prompt_ids)`` twice to skip a prompt). Returns
        ``(delta, prefix_offset, read_offset)``. A window of already-read tokens is re-decoded so that
        sentencepiece's space handling is the same as in a full decode, and nothing is emitted while
        the text ends in an incomplete UTF-8 sequence. Concatenating every delta equals
        ``decode(ids[start:])`` once the sequence is complete (a possible leading dummy-prefix space
        of the first piece aside).
        """
        prefix_text = self.decode(ids[prefix_offset:read_offset], skip_special_tokens)
        full_text = self.decode(ids[prefix_offset:], skip_special_tokens)
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT_CHAR):
            return full_text[len(prefix_text) :], read_offset, len(ids)
        return "", prefix_offset, read_offset

    def __repr__(self) -> str:
        return f"InternLM2Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"
