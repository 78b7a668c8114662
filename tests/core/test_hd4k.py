"""HD4K and the local runner end to end on the tiny checkpoint: tasks, PDF pages, async, streaming,
concurrency, the embedding cache, context limits and cancellation."""

from __future__ import annotations

import asyncio
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from hd4k_tools import HD4K, LocalRunner, Message, make_tiny_checkpoint, plan
from hd4k_tools.errors import ContextOverflowError, InputError, TableParseError
from hd4k_tools.models.xcomposer2_4khd import load_pretrained

FAST = {"max_new_tokens": 4, "num_beams": 1}


def _image(w: int = 640, h: int = 480, seed: int = 0) -> Image.Image:
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    for i in range(6):
        y = 20 + i * 40 + seed * 7
        draw.rectangle([20 + seed * 13, y, 200 + 60 * i, y + 25], fill=(40 * i, 100 + seed * 20, 200 - 30 * i))
        draw.text((30, y + 5), f"Row {i} value {i * 17 + seed}", fill="black")
    return img


def test_describe_image_uses_task_defaults(hd4k_tiny: HD4K) -> None:
    img = _image()
    result = hd4k_tiny.describe_image(img, generation=FAST)
    assert result.task == "describe_image"
    assert result.hd_num == 16
    assert result.plan == result.plans[0]
    assert result.plan.image_tokens == plan(640, 480, 16).num_tokens
    assert result.usage.image_tokens == result.plan.image_tokens
    assert result.usage.prompt_tokens > result.usage.image_tokens
    assert result.usage.completion_tokens == 4
    assert result.text  # the tiny model answers in visible text
    assert result.model == "tiny-ixc2-4khd"
    assert result.timings.total_s > 0


def test_chart_question_default_hd_num_and_eval_layout(hd4k_tiny: HD4K) -> None:
    result = hd4k_tiny.answer_chart_question(_image(), "What is the value of row 3?", generation=FAST)
    assert result.hd_num == 25
    assert result.question == "What is the value of row 3?"
    assert result.table is None
    # Eval layout: BOS + image + user turn, no system prompt -> far fewer text tokens than the chat layout.
    chat = hd4k_tiny.chat("What is the value of row 3?", [_image()], hd_num=25, generation=FAST)
    assert result.usage.prompt_tokens < chat.usage.prompt_tokens


def test_chart_table_extraction_is_typed_when_output_is_not_a_table(hd4k_tiny: HD4K) -> None:
    with pytest.raises(TableParseError, match="not a table"):
        hd4k_tiny.answer_chart_question(_image(), extract_table=True, hd_num=1, generation={"max_new_tokens": 6})


def test_empty_chart_question_is_refused_before_any_work(hd4k_tiny: HD4K) -> None:
    with pytest.raises(InputError, match="question"):
        hd4k_tiny.answer_chart_question(_image(), "  ")


def test_read_document_image_is_one_page(hd4k_tiny: HD4K) -> None:
    doc = hd4k_tiny.read_document(_image(), hd_num=4, generation=FAST)
    assert len(doc.pages) == 1
    assert doc.pages[0].page is None
    assert doc.pages[0].hd_num == 4
    assert doc.text == doc.pages[0].text


def test_read_document_default_is_hd55(hd4k_tiny: HD4K, tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    _image(1200, 1700).save(path)
    doc = hd4k_tiny.read_document(path, generation={"max_new_tokens": 2})
    assert doc.pages[0].hd_num == 55
    assert doc.pages[0].plan.image_tokens == plan(1200, 1700, 55).num_tokens
    assert doc.source == str(path)


def _pdf(pages: int) -> bytes:
    images = [_image(400, 560, seed=i) for i in range(pages)]
    buf = io.BytesIO()
    images[0].save(buf, "PDF", save_all=True, append_images=images[1:], resolution=72)
    return buf.getvalue()


def test_read_pdf_page_by_page(hd4k_tiny: HD4K) -> None:
    doc = hd4k_tiny.read_document(_pdf(3), pages="2-3", hd_num=2, dpi=72, generation=FAST, progress=False)
    assert [p.page for p in doc.pages] == [2, 3]
    assert all(p.hd_num == 2 for p in doc.pages)
    # Each page's image went through the model: the plan is the rendered page's (400x560 at 72 dpi).
    assert doc.pages[0].plan.input_size == (400, 560)
    with pytest.raises(InputError, match="single image"):
        hd4k_tiny.read_document(_image(), pages="2")


def test_stream_read_document_streams_every_pdf_page(hd4k_tiny: HD4K) -> None:
    pdf = _pdf(3)
    doc = hd4k_tiny.read_document(pdf, hd_num=2, dpi=72, generation=FAST, progress=False)
    cancel = threading.Event()  # the caller's event guards the whole document, page after page
    deltas = list(hd4k_tiny.stream_read_document(pdf, hd_num=2, dpi=72, generation=FAST, progress=False, cancel=cancel))
    pages = "".join(deltas).split("\n\n")
    assert [p.strip() for p in pages] == [p.text for p in doc.pages]
    assert not cancel.is_set()


def test_stream_read_document_closed_early_cancels_the_rest(hd4k_tiny: HD4K) -> None:
    cancel = threading.Event()
    stream = hd4k_tiny.stream_read_document(
        _pdf(3), hd_num=1, dpi=72, generation={"max_new_tokens": 400}, progress=False, cancel=cancel
    )
    next(stream)
    stream.close()
    assert cancel.is_set()
    assert hd4k_tiny.chat("hi", generation=FAST).usage.completion_tokens == 4


async def test_async_stream_twins_match_sync(hd4k_tiny: HD4K) -> None:
    img, pdf = _image(), _pdf(2)
    chart = hd4k_tiny.answer_chart_question(img, "Which row is longest?", hd_num=2, generation=FAST)
    chat = hd4k_tiny.chat("Describe it.", [img], hd_num=2, generation=FAST)
    doc = hd4k_tiny.read_document(pdf, hd_num=2, dpi=72, generation=FAST, progress=False)

    async def joined(stream) -> str:  # type: ignore[no-untyped-def]
        return "".join([d async for d in stream])

    a_chart = await joined(
        hd4k_tiny.astream_answer_chart_question(img, "Which row is longest?", hd_num=2, generation=FAST)
    )
    a_chat = await joined(hd4k_tiny.astream_chat("Describe it.", [img], hd_num=2, generation=FAST))
    a_doc = await joined(hd4k_tiny.astream_read_document(pdf, hd_num=2, dpi=72, generation=FAST, progress=False))
    assert a_chart.strip() == chart.text
    assert a_chat.strip() == chat.text
    assert [p.strip() for p in a_doc.split("\n\n")] == [p.text for p in doc.pages]


def test_hd_num_auto_fits_the_context(tiny_checkpoint: Path, tmp_path: Path) -> None:
    small = make_tiny_checkpoint(tmp_path / "ckpt", config_overrides={"max_length": 3000})
    hd = HD4K(LocalRunner(load_pretrained(small, dtype="float32", device="cpu", progress=False)))
    result = hd.describe_image(_image(), hd_num="auto", generation=FAST)
    assert result.usage.prompt_tokens + FAST["max_new_tokens"] <= 3000
    assert plan(640, 480, result.hd_num + 1).num_tokens > 3000 - FAST["max_new_tokens"] - 256
    with pytest.raises(ContextOverflowError, match=r"largest hd_num that fits is \d+"):
        hd.describe_image(_image(), hd_num=55, generation=FAST)


def test_streaming_joins_to_the_plain_answer(hd4k_tiny: HD4K) -> None:
    gen = {"max_new_tokens": 8, "num_beams": 1}
    plain = hd4k_tiny.chat("Describe it.", [_image()], hd_num=2, generation=gen)
    stream = hd4k_tiny.stream_chat("Describe it.", [_image()], hd_num=2, generation=gen)
    deltas = list(stream)
    assert len(deltas) > 1
    assert "".join(deltas).strip() == plain.text
    assert stream.result is not None and stream.result.text == plain.text


def test_closing_a_stream_cancels_and_frees_the_runner(hd4k_tiny: HD4K) -> None:
    stream = hd4k_tiny.stream_chat("Describe it.", [_image()], hd_num=1, generation={"max_new_tokens": 400})
    next(stream)
    stream.close()
    # The lock was released: another call completes.
    assert hd4k_tiny.chat("hi", generation=FAST).usage.completion_tokens == 4


def test_cancel_event_stops_between_tokens(hd4k_tiny: HD4K) -> None:
    cancel = threading.Event()
    cancel.set()
    result = hd4k_tiny.chat("hi", generation={"max_new_tokens": 50}, cancel=cancel)
    assert result.finish_reason == "cancelled"
    assert result.usage.completion_tokens < 50


async def test_async_twins_match_sync(hd4k_tiny: HD4K) -> None:
    img = _image()
    sync = hd4k_tiny.describe_image(img, hd_num=2, generation=FAST)
    a_desc, a_chart = await asyncio.gather(
        hd4k_tiny.adescribe_image(img, hd_num=2, generation=FAST),
        hd4k_tiny.aanswer_chart_question(img, "Which row is longest?", hd_num=2, generation=FAST),
    )
    assert a_desc.text == sync.text
    assert a_chart.task == "answer_chart_question"
    doc = await hd4k_tiny.aread_document(img, hd_num=2, generation=FAST)
    assert len(doc.pages) == 1
    deltas = [d async for d in hd4k_tiny.astream_describe_image(img, hd_num=2, generation=FAST)]
    assert "".join(deltas).strip() == sync.text
    chat = await hd4k_tiny.achat("hello", generation=FAST)
    assert chat.usage.completion_tokens == 4


async def test_cancelling_the_awaiting_task_cancels_the_call(hd4k_tiny: HD4K) -> None:
    task = asyncio.ensure_future(hd4k_tiny.achat("hi", [_image()], hd_num=1, generation={"max_new_tokens": 2000}))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The runner is free again soon after: the worker stopped at the next token instead of running 2000.
    result = await asyncio.wait_for(hd4k_tiny.achat("hi", generation=FAST), timeout=60)
    assert result.usage.completion_tokens == 4


def test_second_question_about_an_image_skips_the_vision_tower(tiny_model) -> None:
    hd = HD4K(LocalRunner(tiny_model))
    img = _image(seed=3)
    first = hd.answer_chart_question(img, "first?", hd_num=4, generation=FAST)
    second = hd.answer_chart_question(img.copy(), "second?", hd_num=4, generation=FAST)
    assert first.timings.vision_cache_hits == 0
    assert second.timings.vision_cache_hits == 1
    cache = hd.runner.embedding_cache
    assert (cache.hits, cache.misses) == (1, 1)
    # A different hd_num is a different key.
    hd.answer_chart_question(img, "third?", hd_num=2, generation=FAST)
    assert cache.misses == 2


def test_embedding_cache_hit_answers_like_uncached(tiny_model) -> None:
    """An embedding-cache hit alone (prefix cache off) gives the very answer of a runner with no cache."""
    cached = HD4K(LocalRunner(tiny_model, prefix_cache_bytes=0))
    uncached = HD4K(LocalRunner(tiny_model, prefix_cache_bytes=0, cache_bytes=0))
    img = _image(seed=5)
    gen = {"max_new_tokens": 8, "num_beams": 2}
    cached.answer_chart_question(img, "first?", hd_num=4, generation=gen)  # fills the cache
    hit = cached.answer_chart_question(img, "second?", hd_num=4, generation=gen)
    assert hit.timings.vision_cache_hits == 1
    assert cached.runner.embedding_cache.hits == 1
    reference = uncached.answer_chart_question(img, "second?", hd_num=4, generation=gen)
    assert uncached.runner.embedding_cache.hits == 0
    assert hit.text == reference.text
    assert hit.usage == reference.usage


def test_sixteen_threads_get_the_sequential_answers(hd4k_tiny: HD4K) -> None:
    prompts = [(f"Question {i}: what is in row {i % 4}?", _image(320, 240, seed=i % 4)) for i in range(64)]
    gen = {"max_new_tokens": 5, "num_beams": 1}
    sequential = [hd4k_tiny.chat(q, [img], hd_num=1, generation=gen).text for q, img in prompts]
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(lambda qi: hd4k_tiny.chat(qi[0], [qi[1]], hd_num=1, generation=gen).text, prompts))
    assert concurrent == sequential
    assert len(set(sequential)) > 1  # the questions really differ


def test_multi_turn_messages_and_system_prompt(hd4k_tiny: HD4K) -> None:
    img = _image()
    request = hd4k_tiny.build_request(
        [
            Message("system", ("Be terse.",)),
            Message.user(img, "What is this?"),
            Message("assistant", ("A chart.",)),
            Message.user("And the top row?"),
        ],
        hd_num=2,
        generation=FAST,
    )
    prompt = hd4k_tiny.runner.prompt_text(request)
    assert prompt.count("<ImageHere>") == 1
    assert prompt.index("Be terse.") < prompt.index("<ImageHere>") < prompt.index("A chart.")
    assert prompt.rstrip().endswith("assistant")
    out = hd4k_tiny.run(request)
    assert out.usage.image_tokens == plan(640, 480, 2).num_tokens
    with pytest.raises(InputError, match="end with a user message"):
        hd4k_tiny.run(hd4k_tiny.build_request([Message("assistant", ("x",))]))


@pytest.mark.parametrize("task", ["chat", "chart"])
def test_literal_image_marker_in_text_is_refused(hd4k_tiny: HD4K, task: str) -> None:
    """Untrusted text cannot claim an image position: the marker is a typed error, not a shifted prompt."""
    with pytest.raises(InputError, match=r"contains <ImageHere>"):
        if task == "chat":
            hd4k_tiny.chat("What is <ImageHere> showing?", [_image()], hd_num=1, generation=FAST)
        else:
            hd4k_tiny.answer_chart_question(_image(), "Compare <ImageHere> with it", hd_num=1, generation=FAST)


def test_auto_hd_num_stops_at_the_largest_evaluated_budget(hd4k_tiny: HD4K) -> None:
    from hd4k_tools.hd4k import MAX_AUTO_HD_NUM

    # A 16k context would allow HD-100 for a page; "auto" caps at the authors' largest budget (65).
    request = hd4k_tiny.build_request([Message.user(_image(1240, 1754), "read")], hd_num="auto", generation=FAST)
    assert request.hd_nums == (MAX_AUTO_HD_NUM,)


def test_stream_deltas_are_the_stripped_answer(hd4k_tiny: HD4K) -> None:
    gen = {"max_new_tokens": 6, "num_beams": 1}
    stream = hd4k_tiny.stream_describe_image(_image(), hd_num=1, generation=gen)
    deltas = list(stream)
    assert deltas and not deltas[0][:1].isspace() and not deltas[-1][-1:].isspace()
    assert "".join(deltas) == stream.result.text == hd4k_tiny.describe_image(_image(), hd_num=1, generation=gen).text
