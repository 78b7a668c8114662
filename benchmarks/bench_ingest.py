"""``hd4k ingest`` throughput (CPU, run by hand): pages per minute in local mode, on Ray with 1 and with 2
transcription actors, and the cost of a rerun that finds every page done.

    .venv/bin/python benchmarks/bench_ingest.py [--runs 2] [--pages 24] [--append-results]
    .venv/bin/python benchmarks/bench_ingest.py --pipeline [--pages 2000] [--append-results]

``--pipeline`` measures the pipeline itself at scale, with an instant stand-in engine
(:class:`hd4k_tools.ingestion.standin.InstantRunner`, no model): a synthetic corpus of ``--pages`` pages
(PDFs of 10 letter-size pages and PNG scans), pages/s of listing, hashing (read + hash + page count),
rendering (72 dpi, one render worker process) and writing (JSONL + Parquet), the whole run end to end and
its peak RSS at 1/4, 1/2 and all of the corpus (each in a fresh process: flat means the pipeline streams),
and a rerun over the finished folder.

* **Model.** The random checkpoint of ``bench_runner.py`` (decoder 4 layers × 512, vision 4 layers × 256),
  float32 on CPU, so the model, not the pipeline, takes most of the time.
* **Corpus.** ``--pages`` synthetic document pages in PDFs of 6 pages (800×1000 pt, rendered at 72 dpi),
  HD-4, greedy, 16 new tokens per page; ``--batch-size`` pages per rendering task and actor call (small, so
  that the pages spread over the actors: the native engine reads one page at a time anyway).
* **Runs.** Each configuration ingests into a fresh folder; the wall time of the whole ``ingest()`` call
  (listing, hashing, rendering, model loading in every actor, transcription, shards) gives pages/min. One
  Ray session (started once, its start timed separately) serves all Ray runs; configurations alternate,
  ``--runs`` rounds, medians reported. Then a rerun over a finished folder (nothing to do) is timed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results import cpu_name, write_section  # noqa: E402

from hd4k_tools import ingest  # noqa: E402

SECTION = "## Ingest"
PIPELINE_SECTION = "## Ingest pipeline at scale"
PIPELINE_PDF_PAGES = 10
PAGES_PER_PDF = 6
SETTINGS: dict[str, Any] = {"hd_num": 4, "dpi": 72, "generation": {"max_new_tokens": 16}}


def _corpus(root: Path, pages: int) -> Path:
    from bench_runner import _document  # torch: only for the model benchmark, not the --pipeline processes

    folder = root / "corpus"
    folder.mkdir(parents=True)
    images = [_document(800, 1000, seed) for seed in range(pages)]
    for start in range(0, pages, PAGES_PER_PDF):
        chunk = images[start : start + PAGES_PER_PDF]
        chunk[0].save(folder / f"doc{start // PAGES_PER_PDF:03d}.pdf", "PDF", save_all=True, append_images=chunk[1:])
    return folder


def _run(corpus: Path, out: Path, model: Path, ray: bool, workers: int, batch_size: int) -> tuple[float, Any]:
    start = time.perf_counter()
    manifest = ingest(
        [corpus],
        out,
        model=str(model),
        device="cpu",
        dtype="float32",
        ray=ray or None,
        workers=workers,
        batch_size=batch_size,
        progress=False,
        **SETTINGS,
    )
    return time.perf_counter() - start, manifest


def _pipeline_corpus(root: Path, pages: int) -> list[Path]:
    """Four folders of ``pages / 4`` pages each: PDFs of 10 simple letter-size pages, and PNG scans."""
    from PIL import Image, ImageDraw

    folders = []
    for part in range(4):
        folder = root / f"part{part}"
        folder.mkdir(parents=True)
        quota = pages // 4
        n = 0
        while quota > 0:
            size = min(PIPELINE_PDF_PAGES, quota) if n % 5 else 1  # every 5th file a single PNG
            images = []
            for i in range(size):
                page = Image.new("RGB", (612, 792), "white")
                draw = ImageDraw.Draw(page)
                for line in range(30):
                    draw.text((40, 40 + 22 * line), f"part {part} file {n} page {i} line {line} " * 3, fill="black")
                images.append(page)
            if size == 1:
                images[0].save(folder / f"scan{n:04d}.png")
            else:
                images[0].save(folder / f"doc{n:04d}.pdf", "PDF", save_all=True, append_images=images[1:])
            quota -= size
            n += 1
        folders.append(folder)
    return folders


def _child(inputs: list[str], out: str) -> None:
    """One whole run in this (fresh) process; prints pages, seconds and peak RSS as JSON."""
    import json

    from hd4k_tools import HD4K
    from hd4k_tools.ingestion.standin import InstantRunner

    start = time.perf_counter()
    manifest = ingest(inputs, out, hd=HD4K(InstantRunner()), model="stand-in", hd_num=4, dpi=72, progress=False)
    seconds = time.perf_counter() - start
    # VmHWM: the peak RSS of this program. (ru_maxrss would keep the parent's size from before exec.)
    status = Path("/proc/self/status").read_text()
    peak = int(status.split("VmHWM:")[1].split()[0]) if "VmHWM:" in status else 0
    print(json.dumps({"pages": manifest.pages_done, "seconds": seconds, "rss_kb": peak}))


def pipeline(args: argparse.Namespace) -> None:
    import json
    import subprocess

    from hd4k_tools import HD4K
    from hd4k_tools.ingestion.corpus import describe_file, scan_inputs
    from hd4k_tools.ingestion.render import RenderPool
    from hd4k_tools.ingestion.shards import ShardWriter, prepare_output
    from hd4k_tools.ingestion.standin import InstantRunner
    from hd4k_tools.ingestion.work import PageSettings, Transcriber, plan_work, render_tasks
    from hd4k_tools.inputs.policy import ImagePolicy

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = _pipeline_corpus(root / "corpus", args.pages)
        every = [str(f) for f in folders]
        stages: dict[str, float] = {}
        t = time.perf_counter()
        paths = scan_inputs(every).paths
        stages["listing"] = time.perf_counter() - t
        t = time.perf_counter()
        infos = [describe_file(p, None, ImagePolicy()) for p in paths]
        stages["hashing (read, hash, page count)"] = time.perf_counter() - t
        settings = PageSettings(hd_num=4, dpi=72)
        plan = plan_work(infos, settings, "stand-in", {})
        assert len(plan.tasks) == args.pages, len(plan.tasks)
        t = time.perf_counter()
        with RenderPool(1, settings.render_timeout_s, settings.render_memory_mb) as pool:
            rendered = []
            for start in range(0, len(plan.tasks), 8):
                batch = render_tasks(plan.tasks[start : start + 8], settings, pool)
                rendered.append(Transcriber(HD4K(InstantRunner()), settings, "stand-in")(batch))
        stages["rendering (+ stand-in engine)"] = time.perf_counter() - t
        records = [r for batch in rendered for r in batch]
        del rendered
        import pyarrow.parquet  # noqa: F401 - imported before the clock starts, as a run imports it once

        writer = ShardWriter(prepare_output(root / "write-only"), 64)
        t = time.perf_counter()
        for record in records:
            writer.add([record])
        writer.close()
        stages["writing (JSONL per page, Parquet per 64)"] = time.perf_counter() - t
        del records

        sizes = [(args.pages // 4, every[:1]), (args.pages // 2, every[:2]), (args.pages, every)]
        runs = []
        for pages, inputs in sizes:
            out = root / f"out-{pages}"
            run = subprocess.run(
                [sys.executable, __file__, "--child", str(out), *inputs], capture_output=True, text=True, check=True
            )
            result = json.loads(run.stdout.strip().splitlines()[-1])
            assert result["pages"] == pages, result
            runs.append(result)
            print(f"{pages} pages: {result}", flush=True)
        resumes = []
        for _ in range(args.runs):
            runner = InstantRunner()
            t = time.perf_counter()
            again = ingest(every, root / f"out-{args.pages}", hd=HD4K(runner), model="stand-in", hd_num=4, dpi=72,
                           progress=False)  # fmt: skip
            resumes.append(time.perf_counter() - t)
            assert again.pages_skipped == args.pages and runner.calls == 0
        print(f"resume: {resumes}", flush=True)
    load_after = os.getloadavg()

    stage_rows = [f"| {name} | {s:.2f} s | {args.pages / s:,.0f} |" for name, s in stages.items()]
    run_rows = [
        f"| {r['pages']:,} | {r['seconds']:.1f} s | {r['pages'] / r['seconds']:.1f} | {r['rss_kb'] / 1024:.0f} MiB |"
        for r in runs
    ]
    section = "\n".join(
        [
            PIPELINE_SECTION,
            "",
            f"`benchmarks/bench_ingest.py --pipeline --pages {args.pages} --runs {args.runs}` — {cpu_name()}, "
            f"{os.cpu_count()} cores, shared with other jobs (load average {load_before[0]:.1f} / "
            f"{load_before[1]:.1f} / {load_before[2]:.1f} before, {load_after[0]:.1f} / {load_after[1]:.1f} / "
            f"{load_after[2]:.1f} after); Python {platform.python_version()}; "
            f"{datetime.date.today().isoformat()}.",
            f"Corpus: {args.pages} synthetic pages in 4 folders (PDFs of {PIPELINE_PDF_PAGES} letter-size text pages, "
            "every 5th file a PNG scan of one page), rendered at 72 dpi (612×792 px), HD-4. Engine: the instant "
            "stand-in (`InstantRunner`, no model), so the figures are the pipeline's own cost.",
            "",
            "| stage (whole corpus, one process) | time | pages/s |",
            "|---|---|---|",
            *stage_rows,
            "",
            "| whole run (fresh process each) | wall time | pages/s | peak RSS of the ingest process |",
            "|---|---|---|---|",
            *run_rows,
            "",
            f"Rerun over the finished {args.pages}-page folder (lists, hashes and counts every file again, reads the "
            f"records, checks every Parquet file, transcribes nothing): {', '.join(f'{s:.2f} s' for s in resumes)} "
            f"({args.runs} runs). The render worker process (one per rendering thread) is not in the RSS column; its "
            "address space is capped by `--render-memory` (2048 MiB above its start-up size).",
            "",
        ]
    )
    print(section)
    if args.append_results:
        write_section(PIPELINE_SECTION, section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--pages", type=int, default=None, help="default 24 (2000 with --pipeline)")
    parser.add_argument("--batch-size", type=int, default=2, help="pages per rendering task and actor call")
    parser.add_argument("--pipeline", action="store_true", help="the pipeline at scale with a stand-in engine")
    parser.add_argument("--child", nargs="+", metavar=("OUT", "INPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--append-results", action="store_true", help="write the section of RESULTS.md")
    args = parser.parse_args()
    if args.child:
        _child(args.child[1:], args.child[0])
        return
    if args.pipeline:
        args.pages = args.pages or 2000
        pipeline(args)
        return
    args.pages = args.pages or 24

    import ray
    from bench_runner import BENCH_CONFIG

    from hd4k_tools.testing import make_tiny_checkpoint

    os.environ.setdefault("HD4K_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_checkpoint(root / "ckpt", config_overrides=BENCH_CONFIG)
        corpus = _corpus(root, args.pages)
        load_before = os.getloadavg()[0]
        t = time.perf_counter()
        cores = os.cpu_count() or 1
        ray.init(address="local", num_cpus=cores + 2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_start = time.perf_counter() - t

        configs = [("local mode (1 process)", False, 1), ("Ray, 1 actor", True, 1), ("Ray, 2 actors", True, 2)]
        times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
        resume: dict[str, list[float]] = {"local mode (1 process)": [], "Ray, 2 actors": []}
        for round_ in range(args.runs):
            order = configs if round_ % 2 == 0 else configs[::-1]
            for name, use_ray, workers in order:
                out = root / f"out-{round_}-{use_ray}-{workers}"
                seconds, manifest = _run(corpus, out, model, use_ray, workers, args.batch_size)
                assert manifest.pages_done == args.pages, manifest
                times[name].append(seconds)
                print(f"{name}: {seconds:.1f} s, {60 * args.pages / seconds:.1f} pages/min", flush=True)
                if name in resume:
                    again, manifest = _run(corpus, out, model, use_ray, workers, args.batch_size)
                    assert manifest.pages_skipped == args.pages and manifest.pages_done == 0
                    resume[name].append(again)
                    print(f"  rerun with everything done: {again:.2f} s", flush=True)
        ray.shutdown()
        load_after = os.getloadavg()[0]

    median = {name: statistics.median(v) for name, v in times.items()}
    rate = {name: 60 * args.pages / s for name, s in median.items()}
    rows = [f"| {name} | {median[name]:.1f} s | {rate[name]:.1f} |" for name, _, _ in configs]
    one, two = rate["Ray, 1 actor"], rate["Ray, 2 actors"]
    per_round = [a / b for a, b in zip(times["Ray, 1 actor"], times["Ray, 2 actors"], strict=True)]
    low, high = min(per_round), max(per_round)
    resume_rows = [
        f"| {name} | {statistics.median(v):.2f} s | {statistics.median(v) / median[name]:.1%} |"
        for name, v in resume.items()
    ]
    import torch

    section = "\n".join(
        [
            SECTION,
            "",
            f"`benchmarks/bench_ingest.py --runs {args.runs} --pages {args.pages} --batch-size {args.batch_size}` — "
            f"{cpu_name()}, {cores} cores; "
            f"torch {torch.__version__}; Ray {ray.__version__}; Python {platform.python_version()}; "
            f"{datetime.date.today().isoformat()}.",
            "Model: the random checkpoint of `bench_runner.py` (decoder 4 layers × 512, vision 4 layers × 256), "
            f"float32 on CPU. Corpus: {args.pages} synthetic 800×1000-pt pages in PDFs of {PAGES_PER_PDF}, "
            f"rendered at 72 dpi, HD-4, greedy, 16 new tokens, {args.batch_size} pages per batch. "
            "Wall time of the whole `ingest()` call (listing, "
            "hashing, rendering, loading the model in each actor, transcription, shards); medians of "
            f"{args.runs} rounds, configurations alternating. Ray started once ({ray_start:.1f} s, not included).",
            "",
            "| configuration | wall time | pages/min |",
            "|---|---|---|",
            *rows,
            "",
            f"2 actors / 1 actor: **{two / one:.2f}×** pages/min (per round {low:.2f}–{high:.2f}×; "
            f"local mode / Ray 1 actor: {rate['local mode (1 process)'] / one:.2f}×). Each Ray "
            "rendering task starts one PDF render worker process (time and memory limits), part of these figures.",
            "",
            "| rerun over a finished folder (nothing to transcribe) | time | share of the full run |",
            "|---|---|---|",
            *resume_rows,
            "",
            "A local Ray splits the cores between the actors (1 actor: 2 torch threads; 2 actors: 1 each). "
            f"The machine was shared with other jobs (load average {load_before:.1f} before, {load_after:.1f} "
            "after, on 2 cores): the OS shares the cores among every runnable thread of every job, so two "
            "actor processes win a larger share than one, and the ratio can exceed 2; read it as measured "
            "here, not as the scaling of a quiet machine. With one GPU per actor "
            "the pool scales with the GPUs. A rerun that finds everything done reads the files and the shards "
            "and plans nothing: it loads no model and starts no actor.",
            "",
        ]
    )
    print(section)
    if args.append_results:
        write_section(SECTION, section)


if __name__ == "__main__":
    main()
