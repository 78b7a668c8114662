"""``ingest(..., engine="vllm", ray=True)``: the Ray Data actor path opens its own in-process vLLM engine (one
per actor, here one actor on CPU) and writes the same records as the native engine in local mode.

Run in the vLLM environment with Ray (``pytest tests/engine_vllm``; ``.ci/run`` stage 2 installs
``ray[data]``). A local Ray of this module's own, in its own temp dir, stopped at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm.entrypoints.llm")
pytest.importorskip("ray.data")
pytest.importorskip("pypdfium2")

import ray
from PIL import Image, ImageDraw

from hd4k_tools import HD4K, LocalRunner, ingest
from hd4k_tools.ingestion import iter_records

OPTIONS = {"hd_num": 2, "dpi": 72, "generation": {"max_new_tokens": 8, "num_beams": 1}}


def _page(i: int) -> Image.Image:
    img = Image.new("RGB", (420, 560), ((i * 70) % 255, 120, 200 - i * 15))
    ImageDraw.Draw(img).text((30, 30), f"page {i}", fill="white")
    ImageDraw.Draw(img).rectangle((60, 120 + 20 * i, 300, 200 + 20 * i), fill=(250, 240, 20))
    return img


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("ray_docs")
    pdf = root / "report.pdf"
    _page(0).save(pdf, "PDF", save_all=True, append_images=[_page(1), _page(2)], resolution=72)
    png = root / "scan.png"
    _page(3).save(png)
    return [pdf, png]


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory: pytest.TempPathFactory):
    temp = tmp_path_factory.mktemp("ray")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=str(temp))
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def test_ray_actor_on_vllm_writes_the_native_records(ray_session, docs, vllm_checkpoint, tmp_path) -> None:
    model = str(vllm_checkpoint)
    manifest = ingest(
        docs,
        tmp_path / "ray_vllm",
        model=model,
        engine="vllm",
        ray=True,
        workers=1,
        batch_size=4,
        progress=False,
        engine_options={"enforce_eager": True, "max_model_len": 4096, "hd_num": 2},
        **OPTIONS,
    )
    assert manifest.status == "complete" and manifest.mode == "ray"
    assert (manifest.pages_done, manifest.pages_failed) == (4, 0)
    native = HD4K(LocalRunner.from_pretrained(model, device="cpu", dtype="float32", progress=False))
    reference = ingest(docs, tmp_path / "native", hd=native, model=model, batch_size=4, progress=False, **OPTIONS)
    assert reference.pages_done == 4
    ours = sorted((r.content() for r in iter_records(tmp_path / "ray_vllm")), key=lambda r: r["key"])
    theirs = sorted((r.content() for r in iter_records(tmp_path / "native")), key=lambda r: r["key"])
    assert ours == theirs and all(r["text"] for r in ours)
