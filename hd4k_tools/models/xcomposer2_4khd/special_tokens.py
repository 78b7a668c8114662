"""The special token strings of IXC2-4KHD's prompt format (docs/model.md §4.1), written once.

``[UNUSED_TOKEN_146]`` / ``[UNUSED_TOKEN_145]`` open and close a chat turn (user-defined pieces of
InternLM2's sentencepiece model, one token each); ``<s>`` / ``</s>`` are BOS / EOS; ``<ImageHere>`` marks
where an image's embeddings go in the prompt string (it never reaches the tokenizer).
"""

from __future__ import annotations

IM_START = "[UNUSED_TOKEN_146]"
IM_END = "[UNUSED_TOKEN_145]"
BOS = "<s>"
EOS = "</s>"
IMAGE_PLACEHOLDER = "<ImageHere>"
UNK = "<unk>"

#: Every string with a meaning in the prompt format; untrusted text must not contain any of them
#: (docs/decisions.md, "Special tokens in untrusted text are refused").
RESERVED_STRINGS: tuple[str, ...] = (IM_START, IM_END, BOS, EOS, UNK, IMAGE_PLACEHOLDER)

__all__ = ["BOS", "EOS", "IMAGE_PLACEHOLDER", "IM_END", "IM_START", "RESERVED_STRINGS", "UNK"]
