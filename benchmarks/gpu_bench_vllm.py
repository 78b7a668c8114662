"""vLLM on a GPU with the full-size IXC2-4KHD architecture and random weights (prepared; run by
``benchmarks/gpu_bench_vllm.sh`` on a machine with one CUDA GPU and CUDA vLLM installed).

    python benchmarks/gpu_bench_vllm.py [--concurrency 1 16 64] [--hd-nums 25 55] [--new-tokens 128]

* **Model.** The official configuration (InternLM2-7B decoder: 32 layers x 4096, 32 heads / 8 KV heads,
  FFN 14336, vocab 92544; Partial LoRA r=8 on wqkv, r=256 elsewhere; CLIP ViT-L/14-336) in bfloat16 with
  vLLM's ``load_format="dummy"`` random weights: no 17 GB download, same shapes and FLOPs. The folder holds
  only ``config.json`` and the tokenizer files (from the tiny checkpoint writer).
* **Engine.** ``HD4K.from_pretrained(engine="vllm")`` (``VllmRunner``), CUDA graphs on (``enforce_eager``
  off, so the plugin's static-shape Partial LoRA runs), prefix caching on, engine hd_num = the largest of
  ``--hd-nums``.
* **Load.** For each hd_num and concurrency N: N different A4-sized pages (2480x3508; HD-25 = 3,097 image
  tokens, HD-55 = 7,165), greedy, ``--new-tokens`` each, submitted at once from N threads.
* **Reported.** Wall time, generated tokens/s, time to first token (median and max over the N requests,
  measured from submission), and peak GPU memory (``nvidia-smi`` sampled every 50 ms; includes vLLM's
  pre-allocated KV cache, i.e. ``--gpu-memory-utilization``). Results go to stdout and, with
  ``--append-results``, to RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import write_section  # noqa: E402

from hd4k_tools.models.xcomposer2_4khd.tiny import make_tiny_checkpoint  # noqa: E402
from hd4k_tools.runtime.generation_config import GenerationConfig  # noqa: E402
from hd4k_tools.runtime.runner import GenerationRequest, Message  # noqa: E402
from hd4k_tools.tasks import document_prompt  # noqa: E402

SECTION = "## vLLM on a GPU, full-size architecture"
FULL_SIZE = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 92544,
    "torch_dtype": "bfloat16",
}
# Absent from the official config.json: the loader's defaults are the real sizes (ViT-L/14-336, LoRA).
NOT_IN_OFFICIAL_CONFIG = ("vision_config", "wqkv_lora_r", "wqkv_lora_alpha", "lora_r", "lora_alpha")


def full_size_folder(work: Path) -> Path:
    """A folder with the official config.json (full sizes) and the tiny tokenizer files, no weights."""
    tiny = make_tiny_checkpoint(work / "tiny", seed=0, shards=1)
    folder = work / "ixc2-4khd-full-size-random"
    folder.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(tiny / name, folder / name)
    config = json.loads((tiny / "config.json").read_text())
    for key in NOT_IN_OFFICIAL_CONFIG:
        config.pop(key, None)
    config.update(FULL_SIZE)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def a4_page(seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    image = Image.new("RGB", (2480, 3508), "white")
    draw = ImageDraw.Draw(image)
    for y in range(150, 3350, 60):
        x = 150
        while x < 2250:
            w = int(rng.randint(40, 220))
            draw.rectangle((x, y, x + w, y + 28), fill=tuple(int(c) for c in rng.randint(0, 80, size=3)))
            x += w + int(rng.randint(15, 40))
    return image


class PeakGpuMemory:
    """Peak ``memory.used`` of GPU 0 (MiB) while the block runs, sampled with nvidia-smi."""

    def __enter__(self) -> PeakGpuMemory:
        self.peak_mib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
            ).stdout
            if out.strip():
                self.peak_mib = max(self.peak_mib, int(out.strip().splitlines()[0]))
            self._stop.wait(0.05)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--hd-nums", type=int, nargs="+", default=[25, 55])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args()

    import torch
    import vllm

    from hd4k_tools.runtime.vllm_runner import VllmRunner

    work = Path(tempfile.mkdtemp(prefix="gpu_bench_vllm_"))
    folder = full_size_folder(work)
    t0 = time.perf_counter()
    with PeakGpuMemory() as start_mem:
        runner = VllmRunner(
            folder,
            hd_num=max(args.hd_nums),
            dtype="bfloat16",
            load_format="dummy",
            max_model_len=16384,
            max_num_seqs=max(args.concurrency),
            gpu_memory_utilization=args.gpu_memory_utilization,
        )
    start_s = time.perf_counter() - t0
    gen = GenerationConfig(max_new_tokens=args.new_tokens)
    prompt = document_prompt("markdown")
    rows = []
    try:
        runner.generate(GenerationRequest((Message.user(a4_page(0), prompt),), (min(args.hd_nums),), gen, "eval"))
        for hd in args.hd_nums:
            for n in args.concurrency:
                requests = [
                    GenerationRequest((Message.user(a4_page(1000 * hd + 100 * n + i), prompt),), (hd,), gen, "eval")
                    for i in range(n)
                ]
                with PeakGpuMemory() as mem, ThreadPoolExecutor(max_workers=n) as pool:
                    t = time.perf_counter()
                    results = list(pool.map(runner.generate, requests))
                    wall = time.perf_counter() - t
                tokens = sum(r.usage.completion_tokens for r in results)
                ttft = [r.timings.prefill_s for r in results]
                row = {
                    "hd_num": hd,
                    "concurrency": n,
                    "prompt_tokens": results[0].usage.prompt_tokens,
                    "wall_s": wall,
                    "tok_s": tokens / wall,
                    "ttft_median_s": statistics.median(ttft),
                    "ttft_max_s": max(ttft),
                    "peak_gib": mem.peak_mib / 1024,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        runner.close()

    gpu = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"], capture_output=True, text=True
    ).stdout.strip()
    lines = [
        SECTION,
        "",
        f"`benchmarks/gpu_bench_vllm.py`, {datetime.date.today().isoformat()}, {gpu}, torch {torch.__version__}, "
        f"vllm {vllm.__version__}. Full-size architecture, random bf16 weights (`load_format=dummy`), CUDA graphs "
        f"on, A4 pages, greedy, {args.new_tokens} new tokens, all requests at once. Engine start {start_s:.0f} s "
        f"(peak {start_mem.peak_mib / 1024:.1f} GiB with the KV cache pre-allocated at "
        f"gpu_memory_utilization {args.gpu_memory_utilization}).",
        "",
        "| hd_num | concurrent | prompt tokens | wall s | generated tok/s | TTFT median s | TTFT max s | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['hd_num']} | {r['concurrency']} | {r['prompt_tokens']} | {r['wall_s']:.1f} | {r['tok_s']:.0f} | "
        f"{r['ttft_median_s']:.2f} | {r['ttft_max_s']:.2f} | {r['peak_gib']:.1f} |"
        for r in rows
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if args.append_results:
        write_section(SECTION, section)


if __name__ == "__main__":  # vLLM starts its engine process with spawn
    main()
