"""Benchmark: the two Partial LoRA forms of the vLLM plugin (gather vs static shape) on one decoder layer's
projections at the full IXC2-4KHD-7B sizes (hidden 4096, FFN 14336, wqkv 6144; LoRA r=8 on wqkv, 256
elsewhere), CPU, float32.

Run by hand from the repository root::

    .venv/bin/python benchmarks/bench_plora.py            # prints the table, updates RESULTS.md
    .venv/bin/python benchmarks/bench_plora.py --no-write # prints only

Per batch shape, three variants run in alternating rounds in the same process: the base projections alone
(wqkv, wo, w1, w3, w2: what a layer costs without Partial LoRA), ``gather`` (LoRA on the image rows only:
nothing in a decode step; data-dependent shapes) and ``static`` (LoRA over every row, multiplied by the
mask: static shapes, CUDA graphs / torch.compile can stay on). Decode batches have no image row; prefill
chunks are half image. The figure is the median of per-round ratios to the base (its range in brackets).
Results of the two forms are checked equal first. A GPU decode is memory-bound, so the weight-read share
(LoRA weights / base weights, printed) is the better predictor there than these CPU ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import cpu_name, write_section

from hd4k_tools.models.xcomposer2_4khd.configuration import XComposer2Config
from hd4k_tools.models.xcomposer2_4khd.vllm.lora import image_rows, plora_gather, plora_static

SECTION = "## Partial LoRA forms in the vLLM plugin"
# (label, tokens in the step, image rows)
SHAPES = (
    ("decode, 1 sequence", 1, 0),
    ("decode, 16 sequences", 16, 0),
    ("decode, 64 sequences", 64, 0),
    ("prefill chunk 512, half image", 512, 256),
)


def layer_weights(
    cfg: XComposer2Config, gen: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """``(W [out, in], A [r, in], B [out, r], scale)`` of wqkv, wo, w1, w3, w2 at the config's sizes."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd
    shapes = [
        (qkv, d, cfg.wqkv_lora_r, cfg.wqkv_lora_scaling),
        (d, d, cfg.lora_r, cfg.lora_scaling),
        (f, d, cfg.lora_r, cfg.lora_scaling),
        (f, d, cfg.lora_r, cfg.lora_scaling),
        (d, f, cfg.lora_r, cfg.lora_scaling),
    ]
    return [
        (
            torch.randn(o, i, generator=gen) * i**-0.5,
            torch.randn(r, i, generator=gen) * i**-0.5,
            torch.randn(o, r, generator=gen) * r**-0.5,
            s,
        )
        for o, i, r, s in shapes
    ]


def run(weights, inputs, mode: str, mask: torch.Tensor) -> list[torch.Tensor]:
    rows = image_rows(mask) if mode == "gather" else None
    fmask = mask.to(torch.float32)
    outs = []
    for (w, a, b, s), x in zip(weights, inputs, strict=True):
        out = x @ w.t()
        if mode == "gather":
            out = plora_gather(out, x, a, b, s, rows)
        elif mode == "static":
            out = plora_static(out, x, a, b, s, fmask)
        outs.append(out)
    return outs


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = XComposer2Config()  # the 7B defaults
    gen = torch.Generator().manual_seed(0)
    weights = layer_weights(cfg, gen)
    base_params = sum(w.numel() for w, *_ in weights)
    lora_params = sum(a.numel() + b.numel() for _, a, b, _ in weights)
    rows = []
    with torch.inference_mode():
        for label, t, n_img in SHAPES:
            mask = torch.zeros(t, dtype=torch.bool)
            mask[:n_img] = True
            inputs = [torch.randn(t, w.shape[1], generator=gen) for w, *_ in weights]
            g, s = run(weights, inputs, "gather", mask), run(weights, inputs, "static", mask)
            for a, b in zip(g, s, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            for mode in ("base", "gather", "static"):  # warm-up
                run(weights, inputs, mode, mask)
            times: dict[str, list[float]] = {"base": [], "gather": [], "static": []}
            for i in range(args.rounds):
                order = ("base", "gather", "static") if i % 2 == 0 else ("static", "gather", "base")
                for mode in order:
                    times[mode].append(
                        timed(lambda mode=mode, inputs=inputs, mask=mask: run(weights, inputs, mode, mask))
                    )
            ratio = {m: [x / b for x, b in zip(times[m], times["base"], strict=True)] for m in ("gather", "static")}
            rows.append((label, statistics.median(times["base"]) * 1e3, ratio))
    lines = [
        SECTION,
        "",
        f"`benchmarks/bench_plora.py`, {dt.date.today().isoformat()}, {cpu_name()} ({torch.get_num_threads()} torch "
        f"threads), torch {torch.__version__}, Python {platform.python_version()}, float32, {args.rounds} alternating "
        "rounds. One decoder layer's projections at the 7B sizes; ratios to the same projections without Partial "
        "LoRA, median [range] of per-round ratios. Load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs shared the 2 cores: wide ranges).",
        "",
        f"LoRA weights per layer: {lora_params / 1e6:.1f} M parameters = "
        f"{100 * lora_params / base_params:.1f} % of the base projections' {base_params / 1e6:.0f} M "
        "(the extra weight reads of a static-shape decode step).",
        "",
        "| step | base projections | gather | static shape |",
        "|---|---|---|---|",
    ]
    for label, base_ms, ratio in rows:
        cells = [f"{statistics.median(r):.3f}x [{min(r):.2f}-{max(r):.2f}]" for r in ratio.values()]
        lines.append(f"| {label} | {base_ms:.1f} ms | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "`gather` costs nothing in decode (no image rows, the LoRA is skipped) but its shapes depend on the data, so "
        "it needs `enforce_eager`; `static` keeps CUDA graphs / torch.compile possible and pays the LoRA matmuls over "
        'every row (in decode: the extra weight reads above). The plugin\'s `plora_mode="auto"` picks `gather` in '
        "eager mode and `static` otherwise.",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section(SECTION, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
