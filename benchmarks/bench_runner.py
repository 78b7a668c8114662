"""Runner and server benchmarks (CPU, run by hand): the task layer's overhead over the raw runner call,
and ``hd4k serve`` + ``RemoteRunner`` against the same model in process.

    .venv/bin/python benchmarks/bench_runner.py [--runs 7] [--append-results]

* **Model.** A small random configuration (decoder 4 layers × 512 hidden, 8 heads / 2 KV heads, FFN
  1376; vision 4 layers × 256 hidden) written with ``make_tiny_checkpoint(config_overrides=...)``, float32.
* **(a) Task-layer overhead.** ``HD4K.describe_image(path, hd_num=9)`` (image decoded from a PNG on disk,
  request built, pydantic result) against ``runner.generate(request)`` with the very same request built
  once beforehand. Greedy, one beam, 32 new tokens; the embedding cache is cleared before every call so
  both sides run the whole pipeline (tiling, vision tower, prefill, decode). Calls alternate A/B.
* **(b) Server vs in process.** ``python -m hd4k_tools.serve.app`` on 127.0.0.1 serving the same checkpoint;
  the same requests through ``RemoteRunner`` (pre-sizing on, PNG upload) and through an in-process
  ``LocalRunner``. Every run uses a different image, so neither side's embedding cache ever hits. Also the
  upload size of a 4000×3000 photo-like image at HD-9 with and without pre-sizing.

Medians over ``--runs`` repetitions (after one warm-up). No GPU needed. Both processes share the
machine's cores; on a loaded machine the ratios are noisy.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import cpu_name, write_section  # noqa: E402

from hd4k_tools import HD4K  # noqa: E402
from hd4k_tools.inputs.images import load_image  # noqa: E402
from hd4k_tools.models.xcomposer2_4khd.tiny import make_tiny_checkpoint  # noqa: E402
from hd4k_tools.runtime.generation import GenerationConfig  # noqa: E402
from hd4k_tools.runtime.local import LocalRunner  # noqa: E402
from hd4k_tools.runtime.remote import RemoteRunner, _data_url, presize  # noqa: E402
from hd4k_tools.runtime.runner import GenerationRequest, Message, RunnerResult, TextStream  # noqa: E402
from hd4k_tools.tasks import TASKS, describe_prompt  # noqa: E402

BENCH_CONFIG: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "wqkv_lora_r": 8,
    "wqkv_lora_alpha": 16,
    "lora_r": 32,
    "lora_alpha": 32,
    "vision_config": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4},
}
SECTION = "## Runner and server"
HD_NUM = 9
NEW_TOKENS = 32
HOST = "127.0.0.1"


def _document(width: int, height: int, seed: int) -> Image.Image:
    """A synthetic page: light background, noise, lines of 'text' boxes."""
    rng = np.random.RandomState(seed)
    base = 235 + rng.randint(0, 20, size=(height, width, 1), dtype=np.uint8)
    image = Image.fromarray(np.repeat(base, 3, axis=2), "RGB")
    draw = ImageDraw.Draw(image)
    for y in range(40, height - 40, 36):
        x = 40
        while x < width - 120:
            w = int(rng.randint(20, 110))
            draw.rectangle((x, y, x + w, y + 14), fill=(int(rng.randint(0, 80)),) * 3)
            x += w + 12
    return image


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus sensor-like noise: compresses like a photograph, not like a flat page."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [127 + 100 * np.sin(xx / (150 + 40 * c) + c) * np.cos(yy / (210 - 30 * c)) for c in range(3)]
    pixels = np.stack(channels, axis=2) + rng.normal(0, 6, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _median(times: list[float]) -> float:
    return statistics.median(times)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def _server(checkpoint: Path) -> Iterator[str]:
    import httpx

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HD4K_NO_PROGRESS": "1"}
    env.pop("HD4K_API_KEY", None)
    cmd = [
        sys.executable,
        "-m",
        "hd4k_tools.serve.app",
        "--model",
        str(checkpoint),
        "--host",
        HOST,
        "--port",
        str(port),
        "--served-model-name",
        "bench",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy in 120 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bench_task_overhead(hd: HD4K, runner: LocalRunner, workdir: Path, runs: int) -> dict[str, float]:
    path = workdir / "page.png"
    _document(1600, 1000, seed=0).save(path)
    gen = {"max_new_tokens": NEW_TOKENS, "num_beams": 1}
    # The request describe_image builds, built once by hand from public pieces.
    request = GenerationRequest(
        messages=(Message.user(load_image(path), describe_prompt("detailed")),),
        hd_nums=(HD_NUM,),
        generation=GenerationConfig(**gen),
        layout=TASKS["describe_image"].layout,
    )
    runner.embedding_cache.clear()
    runner.prefix_cache.clear()
    if hd.describe_image(str(path), hd_num=HD_NUM, generation=gen).text != runner.generate(request).text:
        raise RuntimeError("describe_image and the hand-built request disagree; the comparison would be unfair")

    def task() -> None:
        runner.embedding_cache.clear()
        runner.prefix_cache.clear()
        hd.describe_image(str(path), hd_num=HD_NUM, generation=gen)

    def raw() -> None:
        runner.embedding_cache.clear()
        runner.prefix_cache.clear()
        runner.generate(request)

    # Paired rounds in alternating order (task-raw, raw-task, ...): load from other processes drifts over
    # seconds, so the ratio within a round is far steadier than the ratio of two separate medians.
    task_times, raw_times, ratios = [], [], []
    for i in range(runs):
        if i % 2:
            r_i = _timed(raw)
            t_i = _timed(task)
        else:
            t_i = _timed(task)
            r_i = _timed(raw)
        task_times.append(t_i)
        raw_times.append(r_i)
        ratios.append(t_i / r_i)
    t, r = _median(task_times), _median(raw_times)

    # The task layer alone, without the model: the same call over a runner that answers at once. Less
    # noisy than the difference of two multi-second medians on a shared machine.
    canned = runner.generate(request)
    instant = HD4K(_InstantRunner(runner, canned))
    layer = _median(
        [_timed(lambda: instant.describe_image(str(path), hd_num=HD_NUM, generation=gen)) for _ in range(30)]
    )
    return {
        "task_s": t,
        "raw_s": r,
        "overhead_pct": 100 * (_median(ratios) - 1),
        "overhead_lo_pct": 100 * (min(ratios) - 1),
        "overhead_hi_pct": 100 * (max(ratios) - 1),
        "layer_s": layer,
        "layer_pct": 100 * layer / r,
    }


class _InstantRunner:
    """A runner with the real one's identity that returns a fixed result immediately."""

    def __init__(self, real: LocalRunner, result: RunnerResult) -> None:
        self._real = real
        self._result = result

    @property
    def model_id(self) -> str:
        return self._real.model_id

    @property
    def context_length(self) -> int:
        return self._real.context_length

    def count_text_tokens(self, text: str) -> int:
        return self._real.count_text_tokens(text)

    def generate(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult:
        return self._result

    def stream(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> TextStream:
        raise NotImplementedError

    def close(self) -> None:
        pass


def bench_server(checkpoint: Path, local: LocalRunner, runs: int) -> dict[str, float]:
    ttft_runs = min(runs, 3)
    images = [_document(1600, 1000, seed=100 + i) for i in range(2 * runs + 2 + ttft_runs)]

    def request(image: Image.Image) -> GenerationRequest:
        return GenerationRequest(
            messages=(Message.user(image, "Transcribe the page."),),
            hd_nums=(HD_NUM,),
            generation=GenerationConfig(max_new_tokens=NEW_TOKENS),
        )

    with _server(checkpoint) as base, RemoteRunner(base, "bench") as remote:
        same = remote.generate(request(images[0])).text == local.generate(request(images[0])).text
        remote.generate(request(images[1]))
        local.generate(request(images[1]))  # warm-up
        local_times, remote_times = [], []
        for i in range(runs):
            local_times.append(_timed(lambda i=i: local.generate(request(images[2 + 2 * i]))))
            remote_times.append(_timed(lambda i=i: remote.generate(request(images[3 + 2 * i]))))
        stream_first: list[float] = []
        for i in range(ttft_runs):
            t0 = time.perf_counter()
            stream = remote.stream(request(images[2 * runs + 2 + i]))  # images the server has not seen
            next(iter(stream))
            stream_first.append(time.perf_counter() - t0)
            stream.close()
    lt, rt = _median(local_times), _median(remote_times)
    return {
        "local_s": lt,
        "remote_s": rt,
        "ratio": rt / lt,
        "same_text": float(same),
        "remote_ttft_s": _median(stream_first),
    }


def bench_upload() -> dict[str, float]:
    photo = _photo(4000, 3000, seed=7)
    t0 = time.perf_counter()
    # The encoding RemoteRunner uses for PNG uploads.
    original = len(_data_url(photo, "PNG"))
    small_image = presize(photo, HD_NUM)
    small = len(_data_url(small_image, "PNG"))
    presize_s = time.perf_counter() - t0
    return {
        "original_bytes": original,
        "presized_bytes": small,
        "presized_w": small_image.width,
        "presized_h": small_image.height,
        "encode_both_s": presize_s,
    }


def _machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in both processes (1 is steadiest on a shared machine)"
    )
    parser.add_argument("--append-results", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server process
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = make_tiny_checkpoint(workdir / "ckpt", config_overrides=BENCH_CONFIG, shards=1)
        local = LocalRunner.from_pretrained(str(checkpoint))
        hd = HD4K(local)
        a = bench_task_overhead(hd, local, workdir, args.runs)
        print(
            f"(a) task {a['task_s']:.3f} s, raw {a['raw_s']:.3f} s, overhead {a['overhead_pct']:+.1f}%; "
            f"task layer alone {1000 * a['layer_s']:.1f} ms = {a['layer_pct']:.2f}%"
        )
        b = bench_server(checkpoint, local, args.runs)
        print(
            f"(b) in process {b['local_s']:.3f} s, server {b['remote_s']:.3f} s, ratio {b['ratio']:.3f}, "
            f"same text {bool(b['same_text'])}, remote TTFT {b['remote_ttft_s']:.3f} s"
        )
        u = bench_upload()
        print(f"(c) upload {u['original_bytes']:,} -> {u['presized_bytes']:,} bytes")
        local.close()

    overhead = f"{a['overhead_pct']:+.1f}% (rounds: {a['overhead_lo_pct']:+.1f}% to {a['overhead_hi_pct']:+.1f}%)"
    section = f"""{SECTION}

`benchmarks/bench_runner.py --runs {args.runs} --threads {args.threads}` — {_machine()};
torch {torch.__version__}; Python {platform.python_version()}; {datetime.date.today().isoformat()}.
Model: random checkpoint from
`make_tiny_checkpoint` with decoder 4 layers × 512 (8 heads / 2 KV heads, FFN 1376), vision 4 layers × 256,
float32 on CPU. Question about a 1600×1000 synthetic page at HD-{HD_NUM} (1489 image tokens), greedy,
{NEW_TOKENS} new tokens; embedding cache cold on every call. Medians of {args.runs} runs after a warm-up.

| measurement | value |
|---|---|
| (a) `HD4K.describe_image(path)` | {a["task_s"]:.3f} s |
| (a) `runner.generate(prebuilt request)` | {a["raw_s"]:.3f} s |
| (a) end-to-end difference, median of per-round ratios (target ≤ 5%) | {overhead} |
| (a) task layer alone (same call over an instant runner) | {1000 * a["layer_s"]:.1f} ms = {a["layer_pct"]:.2f}% |
| (b) in process (`LocalRunner.generate`) | {b["local_s"]:.3f} s |
| (b) `hd4k serve` + `RemoteRunner.generate` (127.0.0.1) | {b["remote_s"]:.3f} s |
| (b) server / in process | {b["ratio"]:.3f} |
| (b) same greedy text through the server | {"yes" if b["same_text"] else "NO"} |
| (b) time to first streamed delta through the server | {b["remote_ttft_s"]:.3f} s |
| upload of a 4000×3000 photo at HD-{HD_NUM}: PNG data URL as is | {u["original_bytes"] / 2**20:.1f} MiB |
| upload pre-sized to {u["presized_w"]}×{u["presized_h"]} | {u["presized_bytes"] / 2**20:.2f} MiB |

The task layer adds decoding the PNG from disk, the HD-N choice and the pydantic result; the server adds
PNG encoding of the pre-sized image, base64, JSON, HTTP over loopback and PNG decoding on the other side.
Both processes share the machine's cores with other jobs: single rounds vary (the range above), so (a) is
the median of per-round ratios (task and raw back to back, alternating order) and the task layer alone,
timed without the model, is the steadier figure. {args.threads} torch thread(s) per process.

"""
    print(section)
    if args.append_results:
        write_section(SECTION, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
