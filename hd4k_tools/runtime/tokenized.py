"""What the in-process engines (native, vLLM) share about their tokenizer, written once."""

from __future__ import annotations

from typing import Any

__all__ = ["TokenizerOwner"]


class TokenizerOwner:
    """An engine holding its model's tokenizer in ``_tokenizer``: exposes it, and counts text tokens exactly
    (no BOS; the prompt's BOS rule is the family's, see ``prompt_text_tokens``)."""

    _tokenizer: Any

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (the family's, e.g. ``InternLM2Tokenizer``)."""
        return self._tokenizer

    def count_text_tokens(self, text: str) -> int:
        """Tokens of ``text`` with the model's own tokenizer (exact)."""
        return len(self._tokenizer.encode(text, add_bos=False))
