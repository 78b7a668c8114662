"""``hd4k ingest``: the command over :func:`hd4k_tools.ingestion.ingest`.

    hd4k ingest archive/ scans/*.png --out out/ --model /models/ixc2-4khd
    hd4k ingest archive/ --out out/ --engine remote --remote http://gpu-box:8000/v1
    hd4k ingest /shared/archive --out /shared/out --workers 8 --ray auto

``--ray`` with no value starts a local Ray; with a value it joins that cluster. Since its value is
optional, put the inputs before it (or write ``--ray=ADDRESS``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from hd4k_tools.arguments import parse_hd_num
from hd4k_tools.errors import InputError
from hd4k_tools.ingestion import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE, ingest
from hd4k_tools.ingestion.records import ENGINES, TASK

LOCAL_RAY = ""


def _ray_argument(value: str | None) -> bool | str | None:
    if value is None:
        return None
    if value == LOCAL_RAY:
        return True
    if Path(value).exists() and "://" not in value:
        raise InputError(
            f"--ray took {value!r} as the Ray cluster address, but it is a path; put the inputs before --ray "
            "(hd4k ingest DOCS --out OUT --ray) or write --ray=ADDRESS."
        )
    return value


def cmd_ingest(args: argparse.Namespace) -> int:
    """Run ``hd4k ingest`` and print a one-line summary (or the manifest with ``--json``)."""
    if args.engine == "remote" and not args.remote:
        raise InputError("--engine remote needs the server's base URL: --remote http://host:8000/v1")
    generation: dict[str, Any] = {}
    if args.max_new_tokens is not None:
        generation["max_new_tokens"] = args.max_new_tokens
    manifest = ingest(
        args.inputs,
        args.out,
        model=args.model,
        engine="remote" if args.remote else args.engine,
        remote=args.remote,
        hd_num=parse_hd_num(args.hd_num) if args.hd_num else None,
        pages=args.pages,
        dpi=args.dpi,
        workers=args.workers,
        ray=_ray_argument(args.ray),
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        generation=generation or None,
        device=args.device,
        dtype=args.dtype,
        progress=None,
    )
    if args.json:
        print(manifest.model_dump_json(indent=2))
        return 0
    print(
        f"ingested {manifest.pages_done} pages ({manifest.pages_failed} failed, {manifest.pages_skipped} already done"
        f", {sum(len(v) - 1 for v in manifest.duplicates.values())} duplicate files) into {manifest.out} in "
        f"{manifest.elapsed_s:.1f} s; records: {os.path.join(manifest.out, 'shards', '*.jsonl')}",
        file=sys.stdout,
    )
    return 0


def register(commands: Any, *, default_model: str) -> None:
    """Add ``ingest`` to the ``hd4k`` sub-commands."""
    p = commands.add_parser(
        "ingest",
        help="transcribe a corpus of PDFs and images into page records (local or on Ray)",
        description=(
            "Transcribe every PDF page and image of INPUT... (files, folders walked recursively, glob patterns) "
            "into JSONL/Parquet shards and a manifest under --out. A rerun with the same --out skips the pages "
            "already done."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or glob patterns")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (shards/ and manifest.json)")
    p.add_argument("--engine", choices=ENGINES, default="native", help="native (default), vllm or remote")
    p.add_argument("--remote", default=None, metavar="URL", help="OpenAI-compatible server (implies --engine remote)")
    p.add_argument(
        "--model",
        default=default_model,
        metavar="DIR|HUB_ID|NAME",
        help="checkpoint folder or hub id; with --remote the model name on the server (default: $HD4K_MODEL)",
    )
    p.add_argument("--hd-num", default=None, metavar="N|auto", help=f"tiles per page (default {TASK.default_hd_num})")
    p.add_argument("--pages", default=None, help="PDF pages of every document, 1-based: 1-3 | 1,4 | 2- (default all)")
    p.add_argument("--dpi", type=int, default=200, help="PDF render resolution (default 200)")
    p.add_argument(
        "--workers", type=int, default=1, metavar="N", help="Ray: transcription actors; local: rendering threads"
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL_RAY,
        default=None,
        metavar="ADDRESS",
        help="run on Ray: alone starts a local Ray; with ADDRESS (auto, ray://head:10001) joins a cluster",
    )
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N", help="pages per engine batch")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N", help="records per shard")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="cap on each page's transcription")
    p.add_argument("--device", default="auto", help="native engine: cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--dtype", default="auto", help="native engine: float32, bfloat16, float16 or auto")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_ingest)
