"""A windowed read on the vLLM engine vs the native one (tiny model, CPU; run by hand in the vLLM environment).

    VLLM_CPU_KVCACHE_SPACE=2 .venv-vllm/bin/python benchmarks/bench_windows_engines.py [--rounds 3] [--append-results]

``read_document(page, windows=N, hd_num=4)`` on a synthetic page: the N windows go to the engine through
``generate_all`` (vLLM: all at once, continuously batched; native: one after another). Both engines are
loaded once (the small random configuration of ``bench_engines.py``, float32) and timed in ABAB rounds.
Equal threads, as in ``bench_engines.py``: vLLM's CPU worker computes on one OpenMP thread bound to
``--core`` (``VLLM_CPU_OMP_THREADS_BIND``); the native engine reads with ``torch.set_num_threads(1)`` in a
thread pinned to the same core. Reported: median wall time per engine, the per-round ratios native / vLLM
(their range), and whether the merged texts agree (greedy, fp32). Writes its section of RESULTS.md with
``--append-results``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from bench_engines import BENCH_CONFIG, _pinned
from bench_zoom import SECTION as LOOK_CLOSER
from bench_zoom import WINDOWS_SUBSECTION as SECTION
from results import cpu_name, write_subsection

from hd4k_tools import HD4K
from hd4k_tools.models.xcomposer2_4khd.tiny import make_tiny_checkpoint

HD_NUM = 4


def _page(width: int, height: int) -> Image.Image:
    page = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(page)
    for i, y in enumerate(range(20, height, 40)):
        pen.text((20, y), f"line {i}: small print " * 8, fill="black")
    return page


def _read(hd: HD4K, page: Image.Image, windows: int, new_tokens: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    doc = hd.read_document(page, windows=windows, hd_num=HD_NUM, max_new_tokens=new_tokens)
    return time.perf_counter() - t0, doc.text


def _timed(
    pool: ThreadPoolExecutor | None, hd: HD4K, page: Image.Image, windows: int, new_tokens: int
) -> tuple[float, str]:
    """``_read`` on the pool's pinned thread (the native engine), or here (vLLM computes in its own process)."""
    if pool is None:
        return _read(hd, page, windows, new_tokens)
    return pool.submit(_read, hd, page, windows, new_tokens).result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--append-results", action="store_true")
    parser.add_argument("--machine-note", default="", help="what else loads the machine, stated in the results")
    parser.add_argument("--core", type=int, default=(os.cpu_count() or 1) - 1, help="the core both engines compute on")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(args.core)
    import torch

    torch.set_num_threads(1)
    pinned = ThreadPoolExecutor(max_workers=1, initializer=_pinned(args.core))  # the native engine's one thread
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench_windows_"))
    checkpoint = make_tiny_checkpoint(work / "ckpt", seed=0, config_overrides=BENCH_CONFIG, shards=1)
    page = _page(2400, 3400)
    native = HD4K.from_pretrained(str(checkpoint), device="cpu", dtype="float32", progress=False)
    vllm = HD4K.from_pretrained(
        str(checkpoint), engine="vllm", hd_num=HD_NUM, dtype="float32", enforce_eager=True, max_model_len=4096
    )
    engines = {"native": (native, pinned), "vllm": (vllm, None)}
    for hd, pool in engines.values():  # warm-up, with the timed batch size (vLLM's first batch of a size costs more)
        _timed(pool, hd, page, args.windows, 4)
    times: dict[str, list[float]] = {"native": [], "vllm": []}
    texts: dict[str, str] = {}
    for _ in range(args.rounds):  # ABAB
        for name, (hd, pool) in engines.items():
            seconds, texts[name] = _timed(pool, hd, page, args.windows, args.new_tokens)
            times[name].append(seconds)
            print(f"{name}: {seconds:.2f} s", flush=True)
    ratios = [n / v for n, v in zip(times["native"], times["vllm"], strict=True)]
    load_end = os.getloadavg()[0]
    note = args.machine_note.rstrip(".")
    note = f" {note[:1].upper()}{note[1:]}." if note else ""
    section = "\n".join(
        [
            SECTION,
            "",
            f"`benchmarks/bench_windows_engines.py --windows {args.windows} --rounds {args.rounds}` — "
            f"{datetime.date.today().isoformat()}, {cpu_name()} ({os.cpu_count()} cores), 1-min load average "
            f"{load_start:.1f} at the start and {load_end:.1f} at the end.{note} Tiny random model "
            f"(bench_engines configuration, float32), a 2400×3400 page read in {args.windows} windows at HD-{HD_NUM}, "
            f"{args.new_tokens} new tokens per window, ABAB rounds. Threads: both engines compute on one thread "
            f"bound to core {args.core} (vLLM: `VLLM_CPU_OMP_THREADS_BIND`; native: one torch thread, pinned).",
            "",
            "| engine | median wall (s) |",
            "|---|---|",
            f"| native (windows one after another) | {statistics.median(times['native']):.2f} |",
            f"| vLLM (windows batched) | {statistics.median(times['vllm']):.2f} |",
            "",
            f"native / vLLM: **{statistics.median(ratios):.2f}x** (rounds {min(ratios):.2f}–{max(ratios):.2f}); "
            f"merged texts equal: {texts['native'] == texts['vllm']}.",
            "",
        ]
    )
    print(section)
    if args.append_results:
        write_subsection(LOOK_CLOSER, SECTION, section)
    pinned.shutdown()
    native.close()
    vllm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
