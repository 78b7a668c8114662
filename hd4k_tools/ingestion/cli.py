"""``hd4k ingest``: the command over :func:`hd4k_tools.ingestion.ingest`.

    hd4k ingest archive/ scans/*.png --out out/ --model /models/ixc2-4khd
    hd4k ingest archive/ --out out/ --engine remote --remote http://gpu-box:8000/v1
    hd4k ingest /shared/archive --out /shared/out --workers 8 --ray auto

``--ray`` with no value starts a local Ray; with a value it joins that cluster. Since its value is
optional, put the inputs before it (or write ``--ray=ADDRESS``).

Exit codes: 0 every page done; 1 stopped early because pages kept failing the same way (or the server
cannot be reached); 2 bad arguments, an unusable ``--out`` folder or a write error (one line, nothing
half-written); 3 finished, but some pages failed (``--allow-failures`` makes that 0); 130 Ctrl-C and 143
SIGTERM (finished pages kept; the same command resumes).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from hd4k_tools.arguments import parse_hd_num
from hd4k_tools.errors import InputError
from hd4k_tools.ingestion import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SHARD_SIZE,
    IngestOptions,
    Manifest,
    SystemicFailureError,
    Terminated,
    ingest,
)
from hd4k_tools.ingestion.local import DEFAULT_MAX_CONSECUTIVE_FAILURES
from hd4k_tools.ingestion.records import ENGINES, TASK
from hd4k_tools.ingestion.render import DEFAULT_RENDER_MEMORY_MB, DEFAULT_RENDER_TIMEOUT_S

LOCAL_RAY = ""
EXIT_OK = 0
EXIT_SYSTEMIC = 1
EXIT_FAILED_PAGES = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


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


def _errors(manifest: Manifest) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in sorted(manifest.errors.items(), key=lambda kv: -kv[1]))


def _interrupted(out: str, signal_name: str) -> None:
    try:
        manifest = Manifest.load(out)
        kept = f"{manifest.pages_done + manifest.pages_failed} pages of this run are"
        where = manifest.out
    except Exception:  # the manifest may not exist yet: say what is sure
        kept, where = "the finished pages are", out
    print(
        f"hd4k ingest: stopped by {signal_name}; {kept} on disk in {where}. Run the same command again to resume "
        "(finished pages are skipped).",
        file=sys.stderr,
    )


def cmd_ingest(args: argparse.Namespace) -> int:
    """Run ``hd4k ingest`` and print a one-line summary (or the manifest with ``--json``); see the module
    docstring for the exit codes."""
    options = _options_from_args(args)
    try:
        manifest = ingest(args.inputs, args.out, options)
    except SystemicFailureError as err:
        print(f"hd4k: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_SYSTEMIC
    except Terminated:
        _interrupted(args.out, "SIGTERM")
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        _interrupted(args.out, "Ctrl-C")
        return EXIT_SIGINT
    return _report(manifest, args)


# IngestOptions fields that take the flag of the same name as it is.
_AS_GIVEN = (
    "model",
    "engine",
    "remote",
    "pages",
    "dpi",
    "workers",
    "batch_size",
    "shard_size",
    "device",
    "dtype",
    "follow_symlinks",
    "max_consecutive_failures",
)


def _options_from_args(args: argparse.Namespace) -> IngestOptions:
    """The :class:`IngestOptions` that ``hd4k ingest``'s flags ask for."""
    generation: dict[str, Any] = {}
    if args.max_new_tokens is not None:
        generation["max_new_tokens"] = args.max_new_tokens
    return IngestOptions(
        **{name: getattr(args, name) for name in _AS_GIVEN},
        hd_num=parse_hd_num(args.hd_num) if args.hd_num else None,
        ray=_ray_argument(args.ray),
        generation=generation or None,
        progress=None,
        render_timeout_s=args.render_timeout,
        render_memory_mb=args.render_memory,
    )


def _report(manifest: Manifest, args: argparse.Namespace) -> int:
    """Print the summary (or the manifest with ``--json``) and any failed pages; return the exit code."""
    failed = manifest.pages_failed + manifest.pages_failed_before
    if args.json:
        print(manifest.model_dump_json(indent=2))
    else:
        print(
            f"ingested {manifest.pages_done} pages ({manifest.pages_failed} failed, {manifest.pages_skipped} already "
            f"done, {sum(len(v) - 1 for v in manifest.duplicates.values())} duplicate files) into {manifest.out} in "
            f"{manifest.elapsed_s:.1f} s; records: {os.path.join(manifest.out, 'parquet')} (Parquet), "
            f"{os.path.join(manifest.out, 'jsonl')} (JSON lines)",
            file=sys.stdout,
        )
    if failed and not args.allow_failures:
        before = (
            f" (+{manifest.pages_failed_before} failed for good in earlier runs)"
            if manifest.pages_failed_before
            else ""
        )
        print(
            f"hd4k ingest: {manifest.pages_failed} pages failed{before}: {_errors(manifest) or 'see earlier runs'}; "
            "their records say why (error.type, error.message). Exit code 3; --allow-failures makes it 0.",
            file=sys.stderr,
        )
        return EXIT_FAILED_PAGES
    return EXIT_OK


def register(commands: Any, *, default_model: str) -> None:
    """Add ``ingest`` to the ``hd4k`` sub-commands."""
    p = commands.add_parser(
        "ingest",
        help="transcribe a corpus of PDFs and images into page records (local or on Ray)",
        description=(
            "Transcribe every PDF page and image of INPUT... (files, folders walked recursively, glob patterns) "
            "into Parquet and JSONL records and a manifest under --out. A rerun with the same --out skips the pages "
            "already done. Exit codes: 0 done; 1 stopped early (pages kept failing the same way); 2 bad arguments or "
            "--out; 3 some pages failed (see --allow-failures); 130/143 interrupted (rerun to resume)."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or glob patterns")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (parquet/, jsonl/ and manifest.json)")
    p.add_argument("--engine", choices=ENGINES, default=None, help="native (default), vllm or remote")
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
    _add_run_arguments(p)
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_ingest)


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The batching, engine, failure and rendering flags of ``hd4k ingest``."""
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N", help="pages per engine batch")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N", help="records per shard")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="cap on each page's transcription")
    p.add_argument("--device", default="auto", help="native engine: cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--dtype", default="auto", help="native engine: float32, bfloat16, float16 or auto")
    p.add_argument(
        "--allow-failures",
        action="store_true",
        help="exit 0 even when some pages failed (their records hold the error); default: exit 3",
    )
    p.add_argument(
        "--max-consecutive-failures",
        type=int,
        default=DEFAULT_MAX_CONSECUTIVE_FAILURES,
        metavar="N",
        help="stop (exit 1) after N pages in a row fail the same retryable way "
        f"(default {DEFAULT_MAX_CONSECUTIVE_FAILURES}; 0: never)",
    )
    p.add_argument(
        "--follow-symlinks", action="store_true", help="follow symlinks that lead out of the folders/patterns given"
    )
    p.add_argument(
        "--render-timeout",
        type=float,
        default=DEFAULT_RENDER_TIMEOUT_S,
        metavar="S",
        help=f"seconds one PDF page may take to render (default {DEFAULT_RENDER_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--render-memory",
        type=int,
        default=DEFAULT_RENDER_MEMORY_MB,
        metavar="MB",
        help=f"MiB one PDF page may take to render (default {DEFAULT_RENDER_MEMORY_MB})",
    )
