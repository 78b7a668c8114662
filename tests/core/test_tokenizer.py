"""InternLM2Tokenizer on the tiny checkpoint's sentencepiece model."""

from __future__ import annotations

import io

import pytest
import sentencepiece as spm

from hd4k_tools.errors import CheckpointError
from hd4k_tools.models.xcomposer2_4khd import InternLM2Tokenizer
from hd4k_tools.models.xcomposer2_4khd.tiny import tiny_corpus
from hd4k_tools.models.xcomposer2_4khd.tokenizer import IM_END, IM_START


@pytest.fixture(scope="module")
def tok(tiny_checkpoint) -> InternLM2Tokenizer:
    return InternLM2Tokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def sp(tiny_checkpoint) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))


def test_special_ids_come_from_the_model(tok, sp):
    assert tok.bos_id == sp.bos_id() == 1
    assert tok.eos_id == sp.eos_id() == 2
    assert tok.unk_id == sp.unk_id() == 0
    assert tok.im_start_id == sp.piece_to_id(IM_START)
    assert tok.im_end_id == sp.piece_to_id(IM_END)
    assert tok.convert_tokens_to_ids(IM_START) == tok.im_start_id
    assert tok.vocab_size == sp.get_piece_size()
    assert {tok.bos_id, tok.eos_id, tok.im_start_id, tok.im_end_id} <= tok.special_ids
    with pytest.raises(KeyError):
        tok.convert_tokens_to_ids("[NOT_A_PIECE]")


def test_chat_markers_encode_to_single_ids(tok):
    ids = tok.encode(f"{IM_START}user\nHello there{IM_END}\n{IM_START}assistant\n", add_bos=False)
    assert ids[0] == tok.im_start_id
    assert ids.count(tok.im_start_id) == 2
    assert ids.count(tok.im_end_id) == 1
    assert tok.decode(ids, skip_special_tokens=False) == (f"{IM_START}user\nHello there{IM_END}\n{IM_START}assistant\n")
    # Text around a marker is encoded exactly as without it.
    assert ids[1 : ids.index(tok.im_end_id)] == tok.encode("user\nHello there", add_bos=False)


def test_bos_handling(tok):
    assert tok.encode("table")[0] == tok.bos_id
    assert tok.encode("table", add_bos=False)[0] != tok.bos_id
    assert tok.encode("", add_bos=True) == [tok.bos_id]
    assert tok.encode("", add_bos=False) == []
    # Control tokens written in text map to their ids (sentencepiece alone would spell them out).
    assert tok.encode("a<s>b</s>", add_bos=False) == [
        *tok.encode("a", add_bos=False),
        tok.bos_id,
        *tok.encode("b", add_bos=False),
        tok.eos_id,
    ]


def test_decode_skips_special_tokens(tok):
    body = tok.encode("The chart shows revenue.", add_bos=False)
    ids = [tok.bos_id, tok.im_start_id, *body, tok.im_end_id, tok.eos_id]
    assert tok.decode(ids) == "The chart shows revenue."
    assert tok.decode(ids, skip_special_tokens=False) == (f"<s>{IM_START}The chart shows revenue.{IM_END}</s>")


@pytest.mark.parametrize(
    "text",
    [
        "Hello world 12345!",
        "  two  spaces\tand a tab\nnew line",
        "Grüße, naïve café — 世界 📈 ½ ∑",
        "| a | 1 | 2.50 |\n|---|---|---|",
        "",
    ],
)
def test_round_trip_with_byte_fallback(tok, text):
    ids = tok.encode(text, add_bos=True)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_decode_incremental_matches_full_decode(tok):
    text = "Total: 1,234 € — 中文 ✓ done."
    prompt = tok.encode("[UNUSED_TOKEN_146]assistant\n")
    ids = prompt + tok.encode(text, add_bos=False) + [tok.im_end_id]
    prefix = read = len(prompt)
    pieces = []
    for n in range(len(prompt) + 1, len(ids) + 1):
        delta, prefix, read = tok.decode_incremental(ids[:n], prefix, read)
        assert "\ufffd" not in delta
        pieces.append(delta)
    assert "".join(pieces) == text
    assert any(p == "" for p in pieces)  # multi-byte characters were held back until complete


def test_tokenize_returns_pieces(tok):
    assert tok.tokenize(IM_START + "user")[0] == IM_START


def _train(user_defined: list[str]) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus(100)),
        model_writer=model,
        vocab_size=400,
        hard_vocab_limit=False,
        byte_fallback=True,
        user_defined_symbols=user_defined,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def test_model_without_chat_markers_is_rejected():
    with pytest.raises(CheckpointError, match=r"UNUSED_TOKEN_146"):
        InternLM2Tokenizer(_train([IM_END]))


def test_garbage_and_missing_files_are_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="not a sentencepiece model"):
        InternLM2Tokenizer(b"not a model")
    with pytest.raises(CheckpointError, match=r"tokenizer\.model"):
        InternLM2Tokenizer.from_pretrained(tmp_path)
