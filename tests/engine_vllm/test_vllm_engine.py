"""``HD4K.from_pretrained(..., engine="vllm")``: the in-process vLLM engine answers as the native runner.

Run in the vLLM environment only (``pytest tests/engine_vllm``; see ``.ci/run``). One engine for the whole module
(vLLM takes 20-35 s to start on CPU) on a tiny checkpoint whose head size vLLM's CPU attention accepts
(head_dim 32), in float32, greedy: the texts must be equal to the native runner's, token for token.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading

import pytest

pytest.importorskip("vllm.entrypoints.llm")

from PIL import Image, ImageDraw

from hd4k_tools import HD4K, LocalRunner
from hd4k_tools.errors import InputError, InvalidHDNumError
from hd4k_tools.runtime.generation_config import GenerationConfig
from hd4k_tools.runtime.runner import GenerationRequest, Message

ENGINE_HD_NUM = 9
GREEDY = {"max_new_tokens": 24, "num_beams": 1}


def _image(width: int, height: int, seed: int) -> Image.Image:
    img = Image.new("RGB", (width, height), (250, 250, 245))
    draw = ImageDraw.Draw(img)
    for i in range(12):
        x = (seed * 37 + i * 53) % max(1, width - 40)
        y = (seed * 91 + i * 29) % max(1, height - 30)
        draw.rectangle((x, y, x + 30 + i * 3, y + 20 + i), fill=((seed * 40 + i * 20) % 255, 90, 200 - i * 10))
        draw.text((x + 2, y + 2), f"{seed}{i}", fill="black")
    return img


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    from hd4k_tools.models.xcomposer2_4khd.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_vllm"), seed=0, head_dim=32, shards=1)


@pytest.fixture(scope="module")
def native(checkpoint) -> HD4K:
    return HD4K(LocalRunner.from_pretrained(str(checkpoint), device="cpu", dtype="float32", progress=False))


@pytest.fixture(scope="module")
def engine(checkpoint):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    hd = HD4K.from_pretrained(
        str(checkpoint),
        engine="vllm",
        hd_num=ENGINE_HD_NUM,
        # No dtype, no max_model_len: the defaults must be the checkpoint's (float32, max_length 16384), or
        # the texts below would not equal the native engine's.
        enforce_eager=True,
        max_num_seqs=8,
        enable_chunked_prefill=True,
        max_num_batched_tokens=2048,
    )
    yield hd
    hd.close()


@pytest.fixture(scope="module")
def landscape() -> Image.Image:
    return _image(800, 420, 1)


@pytest.fixture(scope="module")
def portrait() -> Image.Image:
    return _image(360, 700, 2)


def test_defaults_are_the_checkpoints(engine: HD4K, checkpoint) -> None:
    import json

    import torch

    config = json.loads((checkpoint / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["max_length"] == 16384
    model_config = engine.runner._engine.model_config  # what vLLM runs with
    assert model_config.dtype == torch.float32  # vLLM's own "auto" would downcast to bfloat16
    assert model_config.max_model_len == engine.runner.context_length == 16384  # not 32768


def test_three_tasks_equal_native(engine: HD4K, native: HD4K, landscape: Image.Image, portrait: Image.Image) -> None:
    calls = [
        lambda hd: hd.describe_image(landscape, hd_num=4, generation=GREEDY),
        lambda hd: hd.answer_chart_question(portrait, "What is the largest value?", hd_num=9, generation=GREEDY),
        lambda hd: hd.read_document(landscape, hd_num=6, generation=GREEDY).pages[0],
    ]
    for call in calls:
        ours, theirs = call(engine), call(native)
        assert ours.text == theirs.text and ours.text
        assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
        assert ours.usage.image_tokens == theirs.usage.image_tokens
        assert ours.plans == theirs.plans


def test_chat_two_images_and_text_only(engine: HD4K, native: HD4K, landscape, portrait) -> None:
    both = engine.chat("Compare them.", [landscape, portrait], hd_num=4, generation=GREEDY)
    assert both.text == native.chat("Compare them.", [landscape, portrait], hd_num=4, generation=GREEDY).text
    text = engine.chat("Write a line about a chart.", generation=GREEDY)
    assert text.text == native.chat("Write a line about a chart.", generation=GREEDY).text
    assert text.usage.image_tokens == 0


def test_stream_joins_to_the_native_text(engine: HD4K, native: HD4K, landscape) -> None:
    stream = engine.stream_chat("Describe the picture.", [landscape], hd_num=4, generation=GREEDY)
    deltas = list(stream)
    assert len(deltas) > 1  # arrives in pieces, not at the end
    expected = native.chat("Describe the picture.", [landscape], hd_num=4, generation=GREEDY).text
    assert "".join(deltas) == expected
    assert stream.result is not None and stream.result.text == expected


async def test_async_callers_are_batched_and_exact(engine: HD4K, native: HD4K) -> None:
    images = [_image(500 + 40 * i, 300 + 30 * i, 10 + i) for i in range(4)]
    ours = await asyncio.gather(*(engine.adescribe_image(img, hd_num=4, generation=GREEDY) for img in images))
    for img, result in zip(images, ours, strict=True):
        assert result.text == native.describe_image(img, hd_num=4, generation=GREEDY).text


def test_pdf_pages_go_in_one_batch(engine: HD4K, native: HD4K, landscape, portrait, tmp_path) -> None:
    pytest.importorskip("pypdfium2")
    pdf = tmp_path / "two.pdf"
    landscape.save(pdf, "PDF", save_all=True, append_images=[portrait], resolution=72)
    sizes: list[int] = []
    original = engine.runner.generate_batch

    def spy(requests, *, cancel=None):
        sizes.append(len(requests))
        return original(requests, cancel=cancel)

    engine.runner.generate_batch = spy  # type: ignore[method-assign]
    try:
        doc = engine.read_document(pdf, hd_num=4, dpi=72, generation=GREEDY)
    finally:
        del engine.runner.generate_batch
    assert sizes == [2]
    expected = native.read_document(pdf, hd_num=4, dpi=72, generation=GREEDY)
    assert [p.text for p in doc.pages] == [p.text for p in expected.pages]
    assert [p.page for p in doc.pages] == [1, 2]


def test_one_hd_num_per_image(engine: HD4K, native: HD4K, landscape, portrait) -> None:
    ours = engine.chat("Compare them.", [landscape, portrait], hd_num=[1, 9], generation=GREEDY)
    theirs = native.chat("Compare them.", [landscape, portrait], hd_num=[1, 9], generation=GREEDY)
    assert ours.text == theirs.text
    assert [p.hd_num for p in ours.plans] == [1, 9]
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens


def test_per_request_hd_num_within_the_budget(engine: HD4K, landscape) -> None:
    small = engine.describe_image(landscape, hd_num=1, generation=GREEDY)
    full = engine.describe_image(landscape, hd_num=ENGINE_HD_NUM, generation=GREEDY)
    assert small.usage.image_tokens < full.usage.image_tokens
    assert (small.hd_num, full.hd_num) == (1, ENGINE_HD_NUM)


def test_refusals_are_typed(engine: HD4K, landscape, portrait) -> None:
    with pytest.raises(InvalidHDNumError, match="budget of 9"):  # refused by the plugin's processor
        engine.describe_image(landscape, hd_num=16, generation=GREEDY)
    with pytest.raises(InputError, match="beam search"):
        engine.describe_image(landscape, hd_num=4, generation={"num_beams": 3})
    with pytest.raises(InputError, match="<ImageHere>"):
        engine.chat("look: <ImageHere>", [landscape], hd_num=4, generation=GREEDY)


def test_task_defaults_decode_greedily(engine: HD4K, native: HD4K, landscape) -> None:
    # describe_image defaults to 3 beams natively; vLLM has no beam search, so its default is greedy.
    ours = engine.describe_image(landscape, hd_num=4, generation={"max_new_tokens": 12})
    assert ours.text == native.describe_image(landscape, hd_num=4, generation={**GREEDY, "max_new_tokens": 12}).text


def test_cancel_and_closed_stream(engine: HD4K, landscape) -> None:
    cancel = threading.Event()
    cancel.set()
    out = engine.describe_image(landscape, hd_num=4, generation=GREEDY, cancel=cancel)
    assert out.finish_reason == "cancelled" and out.text == ""
    stream = engine.stream_chat("Tell a long story.", [landscape], hd_num=4, generation={"max_new_tokens": 200})
    first = next(iter(stream))
    stream.close()
    assert first
    # The engine keeps serving after an abandoned stream.
    assert engine.chat("Again.", generation=GREEDY).text


def test_image_bytes_source(engine: HD4K, native: HD4K, landscape) -> None:
    buf = io.BytesIO()
    landscape.save(buf, "PNG")
    data = buf.getvalue()
    assert engine.describe_image(data, hd_num=4, generation=GREEDY).text == (
        native.describe_image(data, hd_num=4, generation=GREEDY).text
    )


def test_generate_batch_keeps_order(engine: HD4K, native: HD4K) -> None:
    images = [_image(300 + 100 * i, 300, 20 + i) for i in range(3)]
    config = GenerationConfig(**GREEDY)
    requests = [
        GenerationRequest(messages=(Message.user(img, f"Item {i}?"),), hd_nums=(4,), generation=config)
        for i, img in enumerate(images)
    ]
    ours = engine.runner.generate_batch(requests)
    assert [r.text for r in ours] == [native.runner.generate(r).text for r in requests]


def test_langchain_chat_model_runs_on_the_engine(engine: HD4K, native: HD4K, landscape) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.messages import HumanMessage
    from langchain_hd4k import ChatHD4K

    from hd4k_tools import to_data_url

    message = HumanMessage(
        content=[
            {"type": "text", "text": "What is in the picture?"},
            {"type": "image_url", "image_url": {"url": to_data_url(landscape)}},
        ]
    )
    ours = ChatHD4K(hd=engine, hd_num=4, max_new_tokens=24, num_beams=1).invoke([message])
    theirs = ChatHD4K(hd=native, hd_num=4, max_new_tokens=24, num_beams=1).invoke([message])
    assert ours.content == theirs.content and ours.content
    streamed = "".join(c.content for c in ChatHD4K(hd=engine, hd_num=4, max_new_tokens=24).stream([message]))
    assert streamed == theirs.content


def test_each_image_is_planned_once(engine: HD4K, landscape, portrait, monkeypatch) -> None:
    """The facade plans each image once; the in-process processor tiles those plans (hd_plans) without
    planning again (issue 18 item 1)."""
    from hd4k_tools.models.xcomposer2_4khd import tiling

    calls: list[int] = []
    original = tiling._resolve_one

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tiling, "_resolve_one", counting)
    result = engine.chat("Compare.", [landscape, portrait], hd_num=[1, 4], generation={"max_new_tokens": 2})
    assert [p.hd_num for p in result.plans] == [1, 4]
    assert len(calls) == 2


def _corpus(root) -> list:
    """Two 2-page PDFs and one PNG: five pages of three documents."""
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for d in range(2):
        pages = [_image(420, 560, 40 + 2 * d + p) for p in range(2)]
        path = root / f"doc{d}.pdf"
        pages[0].save(path, "PDF", save_all=True, append_images=pages[1:], resolution=72)
        files.append(path)
    png = root / "scan.png"
    _image(500, 380, 50).save(png)
    return [*files, png]


def test_ingest_batches_pages_of_several_documents(engine: HD4K, native: HD4K, tmp_path) -> None:
    pytest.importorskip("pypdfium2")
    from hd4k_tools import ingest
    from hd4k_tools.ingestion import iter_records

    files = _corpus(tmp_path / "docs")
    options = {"model": "tiny", "hd_num": 2, "dpi": 72, "generation": {"max_new_tokens": 8, "num_beams": 1}}
    sizes: list[int] = []
    original = engine.runner.generate_batch

    def spy(requests, *, cancel=None):
        sizes.append(len(requests))
        return original(requests, cancel=cancel)

    engine.runner.generate_batch = spy  # type: ignore[method-assign]
    try:
        ours = ingest(files, tmp_path / "vllm", hd=engine, batch_size=4, progress=False, **options)
    finally:
        del engine.runner.generate_batch
    theirs = ingest(files, tmp_path / "native", hd=native, batch_size=4, progress=False, **options)
    assert sum(sizes) == 5 and max(sizes) > 2  # a batch held pages of more than one document
    assert ours.pages_done == theirs.pages_done == 5 and ours.pages_failed == 0
    records = sorted((r.content() for r in iter_records(tmp_path / "vllm")), key=lambda r: r["key"])
    assert records == sorted((r.content() for r in iter_records(tmp_path / "native")), key=lambda r: r["key"])
    assert all(r["text"] for r in records)


# -- issue 21: structured outputs and OpenAI's options pass through to vLLM -----------------------------------
def test_json_schema_constraint_reaches_vllm(engine: HD4K) -> None:
    import json

    import jsonschema

    from hd4k_tools.structured import JSONConstraint

    schema = {
        "type": "object",
        "properties": {
            "kind": {"enum": ["bar", "line"]},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
            "ok": {"type": "boolean"},
        },
        "required": ["kind", "n", "ok"],
        "additionalProperties": False,
    }
    config = GenerationConfig(max_new_tokens=64)
    request = GenerationRequest((Message.user("JSON?"),), generation=config, constraint=JSONConstraint.of(schema))
    jsonschema.validate(json.loads(engine.runner.generate(request).text), schema)


def test_logprobs_penalties_and_logit_bias_match_native(engine: HD4K, native: HD4K) -> None:
    for options in (
        {"logprobs": True, "top_logprobs": 3},
        {"logprobs": True, "frequency_penalty": 1.5},
        {"logprobs": True, "logit_bias": {"300": 100}},
    ):
        config = GenerationConfig(max_new_tokens=6, **options)
        request = GenerationRequest((Message.user("hello"),), generation=config)
        ours, theirs = native.runner.generate(request), engine.runner.generate(request)
        assert [e.token for e in theirs.logprobs] == [e.token for e in ours.logprobs], options
        assert [e.logprob for e in theirs.logprobs] == pytest.approx([e.logprob for e in ours.logprobs], abs=1e-3)
        if options.get("top_logprobs"):
            assert [[t.token for t in e.top_logprobs] for e in theirs.logprobs] == [
                [t.token for t in e.top_logprobs] for e in ours.logprobs
            ]
