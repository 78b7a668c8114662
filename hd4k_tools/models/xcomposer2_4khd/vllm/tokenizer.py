"""``InternLMXComposer2Tokenizer``: the tokenizer class the checkpoint's ``tokenizer_config.json`` names,
as a ``transformers`` Python tokenizer over the shared sentencepiece
:class:`~hd4k_tools.models.xcomposer2_4khd.tokenizer.InternLM2Tokenizer` (no remote code, no conversion to a
``tokenizers`` model: the pieces are sentencepiece's own, so byte fallback, newlines and CJK stay exact).

``<ImageHere>`` is an added special token with the first id past the sentencepiece vocabulary, so text is
split on it exactly where the official chat splits its prompt. It is not a model token: the multimodal
processor replaces each one by the image's positions, and :meth:`get_vocab` leaves it out so that vLLM
rejects, as out of vocabulary, a prompt that still holds one (a placeholder without an image).

Answers start without whitespace, as the native engine's do (its text is stripped): vLLM's server decodes a
request's output incrementally, each step over a window that at first holds the end of the prompt, so the
answer's first piece (``▁The``) would come out as `` The``. :meth:`convert_tokens_to_string` drops the
whitespace that directly follows the assistant turn's header (``[UNUSED_TOKEN_146]assistant\n``) - in
the window and in a whole decoded conversation alike - the one place where it is never part of an answer.
vLLM's first window holds only the prompt's last 5 tokens, which may cut ``[UNUSED_TOKEN_146]`` off (the tiny
checkpoints spell ``assistant`` in 4 pieces, the real tokenizer in one), so a window that *starts* with
``assistant\n`` counts as the header too.

Answers also end without whitespace, as the native engine's do, however they end (the end token, ``max_tokens``
or a stop string): :meth:`convert_tokens_to_string` drops trailing whitespace too. vLLM's incremental decoder
emits only the text that a window *adds* past its prefix window's text, so whitespace at the end is held back
until a later piece follows it (it is then sent with that piece, as the native engine's stream does) and is
never sent when nothing follows. :meth:`decode` keeps trailing whitespace (text round-trips, and one id gives
its piece as it is: the token text vLLM's log-probs show); vLLM's incremental decoder calls
:meth:`convert_tokens_to_string` directly.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from transformers import PreTrainedTokenizer

from hd4k_tools.models.xcomposer2_4khd.special_tokens import IM_START, IMAGE_PLACEHOLDER
from hd4k_tools.models.xcomposer2_4khd.tokenizer import TOKENIZER_FILE, InternLM2Tokenizer
from hd4k_tools.models.xcomposer2_4khd.vllm.names import CHAT_TEMPLATE_PATH, TOKENIZER_CLASS

#: Where an answer starts in the official chat turns (the chat template ends every prompt with it).
ANSWER_ROLE = "assistant\n"
ANSWER_HEADER = IM_START + ANSWER_ROLE


def default_chat_template() -> str:
    """The shipped chat template (official turns, one ``<ImageHere>`` per image part)."""
    return CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


class InternLMXComposer2Tokenizer(PreTrainedTokenizer):
    """InternLM2 sentencepiece tokenizer for ``transformers`` / vLLM (see the module docstring).

    ``encode(text)`` gives BOS + the ids of the shared tokenizer; the chat markers
    ``[UNUSED_TOKEN_146]``/``[UNUSED_TOKEN_145]`` are ordinary sentencepiece pieces (matched atomically).
    """

    vocab_files_names: ClassVar[dict[str, str]] = {"vocab_file": TOKENIZER_FILE}
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "</s>",
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_file = vocab_file
        self.sp = InternLM2Tokenizer.from_pretrained(vocab_file)
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.pop("extra_special_tokens", None)
        kwargs.pop("additional_special_tokens", None)
        kwargs.pop("auto_map", None)
        kwargs["clean_up_tokenization_spaces"] = False  # spaces are sentencepiece's, never "cleaned"
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            extra_special_tokens=[IMAGE_PLACEHOLDER],
            chat_template=chat_template if chat_template is not None else default_chat_template(),
            **kwargs,
        )

    # -- vocabulary ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size

    @property
    def sp_model(self) -> Any:
        """The ``sentencepiece.SentencePieceProcessor``: what xgrammar (vLLM's structured outputs) reads to
        recognise a sentencepiece tokenizer with byte fallback; without it, JSON response formats fail in the
        engine with "Unsupported tokenizer type"."""
        return self.sp._sp

    @property
    def image_placeholder_id(self) -> int:
        """Id of ``<ImageHere>`` (first id past the sentencepiece vocabulary; not a model token)."""
        return self._added_tokens_encoder[IMAGE_PLACEHOLDER]

    def get_vocab(self) -> dict[str, int]:
        """The sentencepiece pieces (the model's vocabulary); ``<ImageHere>`` is deliberately absent."""
        return {self.sp.convert_ids_to_tokens([i])[0]: i for i in range(self.sp.vocab_size)}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        try:
            return self.sp.convert_tokens_to_ids(token)
        except KeyError:
            return self.sp.unk_id

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.convert_ids_to_tokens([index])[0]

    def _decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        """Ids to text (what :meth:`decode` returns): faithful, trailing whitespace included, so text round-trips
        and one id gives its piece as it is (a log-prob's token text); only the whitespace right after the
        assistant header is dropped, as in every answer."""
        tokens = self.convert_ids_to_tokens(token_ids, skip_special_tokens=skip_special_tokens)
        return _answer_view(self._pieces_text([tokens] if isinstance(tokens, str) else tokens), strip_end=False)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Pieces to text as vLLM's incremental decoder must see an answer (see the module docstring): no
        whitespace right after the assistant turn's header, none at the end."""
        return _answer_view(self._pieces_text(tokens), strip_end=True)

    def _pieces_text(self, tokens: list[str]) -> str:
        """Pieces to text: runs of ordinary pieces are decoded by sentencepiece (byte pieces joined into
        UTF-8), special tokens are kept as their text."""
        special = set(self.all_special_tokens)
        out: list[str] = []
        run: list[int] = []
        for token in tokens:
            if token in special:
                if run:
                    out.append(self.sp.decode(run, skip_special_tokens=False))
                    run = []
                out.append(token)
            else:
                run.append(self._convert_token_to_id(token))
        if run:
            out.append(self.sp.decode(run, skip_special_tokens=False))
        return "".join(out)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            out += bos + token_ids_1 + eos
        return out

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + TOKENIZER_FILE)
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            with open(self.vocab_file, "rb") as src, open(out, "wb") as dst:
                dst.write(src.read())
        return (out,)


def _answer_view(text: str, strip_end: bool) -> str:
    """``text`` without the whitespace that starts an answer (right after the assistant header, or after the
    header's end ``assistant\n`` where a window starts with it) and, with ``strip_end``, without trailing
    whitespace."""
    head, header, answer = text.rpartition(ANSWER_HEADER)
    if not header and text.startswith(ANSWER_ROLE):  # vLLM's first window holds 5 prompt tokens only
        head, header, answer = "", ANSWER_ROLE, text[len(ANSWER_ROLE) :]
    if header:
        answer = answer.lstrip()
    return head + header + (answer.rstrip() if strip_end else answer)


assert InternLMXComposer2Tokenizer.__name__ == TOKENIZER_CLASS  # transformers finds the class by this name
