"""vLLM's server decodes an answer incrementally, over windows that start inside the prompt: the plugin's
tokenizer makes that text equal the native engine's (stripped) answer, with no leading space from the first
generated piece (``▁the`` -> ``the``), while spaces inside the answer stay. No engine needed: vLLM's own
incremental detokenizer (``detokenize_incrementally``, what its server runs) over the plugin's tokenizer.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.entrypoints.llm")

from vllm.tokenizers.detokenizer_utils import detokenize_incrementally

from hd4k_tools.models.xcomposer2_4khd.prompt import conversation_prompt
from hd4k_tools.models.xcomposer2_4khd.tokenizer import InternLM2Tokenizer
from hd4k_tools.models.xcomposer2_4khd.vllm.tokenizer import InternLMXComposer2Tokenizer
from hd4k_tools.runtime.generation import decode_output
from hd4k_tools.runtime.runner import Message


def _stream(tokenizer, prompt_ids: list[int], answer_ids: list[int]) -> str:
    """The text vLLM's server sends for ``answer_ids`` (its SlowIncrementalDetokenizer's loop)."""
    ids = list(prompt_ids)
    tokens, prefix, read = None, 0, 0
    text = ""
    for token_id in answer_ids:
        ids.append(token_id)
        new_tokens, piece, prefix, read = detokenize_incrementally(
            tokenizer, ids, tokens, prefix, read, skip_special_tokens=True, spaces_between_special_tokens=True
        )
        tokens = new_tokens if tokens is None else tokens + new_tokens
        text += piece
    return text


@pytest.mark.parametrize("answer", [" the chart shows 42 sales", "  \n the table", "The total is 7.", "\n\nrow 1"])
def test_served_text_starts_as_the_native_answer(vllm_checkpoint, answer: str) -> None:
    tokenizer = InternLMXComposer2Tokenizer(vocab_file=str(vllm_checkpoint / "tokenizer.model"))
    native = InternLM2Tokenizer.from_pretrained(vllm_checkpoint)
    prompt_ids = tokenizer.encode(conversation_prompt((Message.user("Describe the chart."),), "chat"))
    answer_ids = native.encode(answer, add_bos=False)
    expected = decode_output(native, answer_ids).strip()  # the native engine's answer
    assert _stream(tokenizer, prompt_ids, answer_ids) == expected
    # A whole conversation decoded at once gives the same answer after the assistant header.
    assert tokenizer.decode(prompt_ids + answer_ids, skip_special_tokens=True).endswith("assistant\n" + expected)


@pytest.mark.parametrize(
    "answer", ["The total is 7.\n", "row 1 \n\n row 2  ", "a  b\tc\n", " \n ", "x\n\ny", "end. \n"]
)
def test_served_text_ends_as_the_native_answer_at_every_cut(vllm_checkpoint, answer: str) -> None:
    # Wherever the answer stops (its end token, max_tokens, a stop string), the served text is the native
    # engine's stripped answer: whitespace at the end is held back, and sent once a later piece follows.
    tokenizer = InternLMXComposer2Tokenizer(vocab_file=str(vllm_checkpoint / "tokenizer.model"))
    native = InternLM2Tokenizer.from_pretrained(vllm_checkpoint)
    prompt_ids = tokenizer.encode(conversation_prompt((Message.user("Read the table."),), "chat"))
    answer_ids = native.encode(answer, add_bos=False)
    for cut in range(1, len(answer_ids) + 1):
        expected = decode_output(native, answer_ids[:cut]).strip()
        assert _stream(tokenizer, prompt_ids, answer_ids[:cut]) == expected, (answer, cut)


def test_one_id_decodes_to_its_piece_whitespace_included(vllm_checkpoint) -> None:
    # A log-prob's token text is the piece itself: a newline or space token is not emptied.
    tokenizer = InternLMXComposer2Tokenizer(vocab_file=str(vllm_checkpoint / "tokenizer.model"))
    native = InternLM2Tokenizer.from_pretrained(vllm_checkpoint)
    for text in ("\n", "\t"):
        for token_id in native.encode(text, add_bos=False):
            assert tokenizer.decode([token_id]) == decode_output(native, [token_id]) != ""
    assert tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=True) == ""
