"""The ``hd4k`` sub-commands that run the model: ``describe``, ``read``, ``chart`` and ``serve``, plus
``make-tiny-checkpoint`` to try the whole pipeline without downloading weights.

    hd4k read scan.pdf --pages 1-2 --model /models/internlm-xcomposer2-4khd-7b
    hd4k chart sales.png "Which year had the highest revenue?" --stream
    hd4k describe photo.jpg --remote http://gpu-box:8000/v1
    hd4k serve --model /models/internlm-xcomposer2-4khd-7b --port 8000

``--model`` defaults to the official checkpoint id (``$HD4K_MODEL`` overrides it); it downloads where
there is internet, and offline the error says how to fetch the weights and pass ``--model DIR``.
Progress (checkpoint shards, PDF pages) goes to stderr, as a bar on a terminal and as plain lines
otherwise (``HD4K_NO_PROGRESS=1`` turns it off); the answer to stdout.

Every input check happens before the model loads (the file exists and is an image or PDF, the page range
fits the document, the question is not empty, the device exists): a typo costs a second, not a model
load. ``hd4k read`` prints each page as soon as it is read, under a ``--- page N ---`` header for PDFs;
Ctrl-C keeps what was printed and says which pages are left (``--pages`` to resume).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from hd4k_tools.cli.args import EXIT_INTERRUPTED, PROG, parse_hd_num
from hd4k_tools.errors import InputError
from hd4k_tools.hd4k import HD4K
from hd4k_tools.inputs.images import SourceBytes, load_image, read_source_bytes
from hd4k_tools.inputs.pdf import select_pages
from hd4k_tools.models.xcomposer2_4khd.hub import add_model_argument
from hd4k_tools.progress import progress_line
from hd4k_tools.results import DocumentResult, TaskResult
from hd4k_tools.serve import app as server
from hd4k_tools.tasks import TASKS

# The facade's PDF resolution, read from its signature (one fact, one place).
_DEFAULT_DPI: int = inspect.signature(HD4K).parameters["dpi"].default

__all__ = ["register"]


def _progress() -> bool:
    """Progress for the command line: on (bar or plain lines) unless ``HD4K_NO_PROGRESS`` is set."""
    return os.environ.get("HD4K_NO_PROGRESS", "") in ("", "0")


def _check_device(args: argparse.Namespace) -> None:
    """The device exists and the dtype is known (native engine only), checked before the model loads."""
    if args.remote:
        return
    # torch: the native engine's extra
    from hd4k_tools.models.xcomposer2_4khd.checkpoint import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    try:
        resolve_dtype(args.dtype, device)
    except ValueError as err:
        raise InputError(f"--dtype: {err}") from None


def _open(args: argparse.Namespace) -> HD4K:
    if args.remote:
        return HD4K.remote(args.remote, args.remote_model or args.model, api_key=os.environ.get("HD4K_API_KEY"))
    return HD4K.from_pretrained(args.model, device=args.device, dtype=args.dtype, progress=_progress())


def _image_input(path: str) -> Any:
    """The image at ``path``, read and decoded before the model loads (missing file, not an image, too
    large: an error now)."""
    return load_image(read_source_bytes(path))


def _generation(args: argparse.Namespace) -> dict[str, Any] | None:
    options: dict[str, Any] = {}
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    if args.num_beams is not None:
        options["num_beams"] = args.num_beams
    if args.stream and options.get("num_beams", 1) > 1:
        raise InputError("--stream needs --num-beams 1: beam search only knows its answer at the end.")
    return options or None


def _emit(result: Any, args: argparse.Namespace) -> int:
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print(result.text)
    return 0


def _stream(deltas: Any) -> int:
    for delta in deltas:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _streaming_generation(args: argparse.Namespace) -> dict[str, Any] | None:
    gen = _generation(args)
    if args.stream:  # streaming shows tokens as they come: one beam
        return {"num_beams": 1, **(gen or {})}
    return gen


def _check_stream_json(args: argparse.Namespace) -> None:
    if args.stream and args.json:
        raise InputError("--stream and --json do not combine: choose one.")


def _cmd_describe(args: argparse.Namespace) -> int:
    _check_stream_json(args)
    hd_num = parse_hd_num(args.hd_num) if args.hd_num else None
    image = _image_input(args.image)
    _check_device(args)
    with _open(args) as hd:
        if args.stream:
            return _stream(
                hd.stream_describe_image(
                    image, detail=args.detail, hd_num=hd_num, generation=_streaming_generation(args)
                )
            )
        return _emit(hd.describe_image(image, detail=args.detail, hd_num=hd_num, generation=_generation(args)), args)


def _cmd_chart(args: argparse.Namespace) -> int:
    _check_stream_json(args)
    if args.stream and args.table:
        raise InputError(
            "--table and --stream do not combine: the table is parsed from the whole answer; drop --stream."
        )
    hd_num = parse_hd_num(args.hd_num) if args.hd_num else None
    if not args.table and not (args.question or "").strip():
        raise InputError(
            'The chart question is empty; pass it after the image, e.g. hd4k chart chart.png "Which year is '
            "highest?\", or --table to extract the chart's data."
        )
    image = _image_input(args.image)
    _check_device(args)
    with _open(args) as hd:
        if args.stream:
            return _stream(
                hd.stream_answer_chart_question(
                    image, args.question, hd_num=hd_num, generation=_streaming_generation(args)
                )
            )
        result = hd.answer_chart_question(
            image, args.question or "", hd_num=hd_num, extract_table=args.table, generation=_generation(args)
        )
        if args.table and not args.json and result.table is not None:
            print(" | ".join(result.table.columns))
            for row in result.table.rows:
                print(" | ".join(row))
            return 0
        return _emit(result, args)


def _document_pages(args: argparse.Namespace) -> tuple[SourceBytes, list[int | None]]:
    """The document read once, and the 1-based pages to read (``[None]`` for an image), checked before the
    model loads: the file exists and is an image or a PDF, the page range fits, ``--dpi`` is positive."""
    if args.dpi < 1:
        raise InputError(f"--dpi must be a positive number of dots per inch, got {args.dpi} (e.g. --dpi 200).")
    raw = read_source_bytes(args.document)
    if raw.kind == "pdf":
        return raw, [i + 1 for i in select_pages(raw, args.pages)]
    if args.pages not in (None, "1"):
        raise InputError(f"--pages {args.pages} was given but {raw.name} is a single image, not a PDF.")
    load_image(raw)  # an image that decodes (not a text file named .png)
    return raw, [None]


def _ranges(numbers: Sequence[int]) -> str:
    """``[3, 4, 5, 8]`` -> ``"3-5,8"``."""
    parts: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(parts)


def _cmd_read(args: argparse.Namespace) -> int:
    _check_stream_json(args)
    hd_num = parse_hd_num(args.hd_num) if args.hd_num else None
    raw, numbers = _document_pages(args)
    _check_device(args)
    with _open(args) as hd:
        return _read_pages(hd, raw, numbers, hd_num, args)


def _read_pages(hd: HD4K, raw: SourceBytes, numbers: list[int | None], hd_num: Any, args: argparse.Namespace) -> int:
    """Read page by page: each page printed as soon as it is done (under a header for PDFs); Ctrl-C keeps
    the printed pages and says which are left."""
    options = {"hd_num": hd_num, "output": args.output, "dpi": args.dpi, "progress": False}
    done: list[TaskResult] = []
    total = len(numbers)
    start = time.perf_counter()
    current = 0
    try:
        for current, number in enumerate(numbers):
            pages = [number] if number is not None else None
            if number is not None and not args.json:
                separator = "\n" if current else ""
                sys.stdout.write(f"{separator}--- page {number} ---\n")
            if args.stream:
                _stream(hd.stream_read_document(raw, pages=pages, generation=_streaming_generation(args), **options))
            else:
                page = hd.read_document(raw, pages=pages, generation=_generation(args), **options).pages[0]
                done.append(page)
                if not args.json:
                    print(page.text, flush=True)
            if _progress() and number is not None:
                elapsed = time.perf_counter() - start
                print(progress_line("Reading pages", current + 1, total, "page", elapsed), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        sys.stdout.flush()
        if args.json:
            print(DocumentResult(source=raw.name, pages=done).model_dump_json(indent=2))
        left = [n for n in numbers[current:] if n is not None]
        where = f"page {numbers[current]}" if numbers[current] is not None else "the image"
        resume = f"; to finish, run again with --pages {_ranges(left)}" if left else ""
        print(
            f"{PROG}: interrupted while reading {where}: {current} of {total} page(s) finished and printed above"
            f"{resume}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if args.json:
        print(DocumentResult(source=raw.name, pages=done).model_dump_json(indent=2))
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from hd4k_tools.models.xcomposer2_4khd.tiny import VLLM_HEAD_DIM, make_tiny_checkpoint

    sizes = {
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.layers,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab_size,
    }
    overrides = {key: value for key, value in sizes.items() if value is not None}
    head_dim = args.head_dim if args.head_dim is not None else (VLLM_HEAD_DIM if args.for_vllm else None)
    try:
        path = make_tiny_checkpoint(
            args.directory,
            seed=args.seed,
            format=args.format,
            shards=args.shards,
            config_overrides=overrides or None,
            head_dim=head_dim,
        )
    except ValueError as err:
        raise InputError(f"make-tiny-checkpoint: {err}") from err
    print(f"wrote a tiny random checkpoint (official layout, gibberish answers) to {path}")
    print(f"try: hd4k describe examples/page.png --model {path} --max-new-tokens 16")
    if head_dim is not None and head_dim >= VLLM_HEAD_DIM:
        print(f"or, with vLLM: VLLM_CPU_KVCACHE_SPACE=1 hd4k serve --engine vllm --model {path} -- --enforce-eager")
    return 0


def _add_model_options(p: argparse.ArgumentParser, *, task: str) -> None:
    spec = TASKS[task]
    add_model_argument(p)
    p.add_argument(
        "--hd-num",
        default=None,
        metavar="N|auto",
        help=f"maximum 336x336 tiles per image (default for this task: {spec.default_hd_num})",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument(
        "--dtype", default="auto", help="float32, bfloat16, float16 or auto (default: the checkpoint's dtype)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help=f"cap on the answer length (default for this task: {spec.max_new_tokens})",
    )
    p.add_argument(
        "--num-beams",
        type=int,
        default=None,
        metavar="N",
        help=f"beam search width (default for this task: {spec.num_beams})",
    )
    p.add_argument("--remote", default=None, metavar="BASE_URL", help="use an OpenAI-compatible server instead")
    p.add_argument("--remote-model", default=None, metavar="NAME", help="model name on the server (default: --model)")
    p.add_argument("--json", action="store_true", help="print the full result (plan, usage, timings) as JSON")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")


def register(commands: Any) -> None:
    """Add the model sub-commands to the ``hd4k`` parser's sub-parsers."""
    describe = commands.add_parser("describe", help="describe an image", description="Describe IMAGE.")
    describe.add_argument("image", metavar="IMAGE")
    describe.add_argument("--detail", choices=("detailed", "brief"), default="detailed")
    _add_model_options(describe, task="describe_image")
    describe.set_defaults(func=_cmd_describe)

    read = commands.add_parser(
        "read", help="transcribe a document image or PDF", description="Transcribe DOCUMENT page by page."
    )
    read.add_argument("document", metavar="DOCUMENT", help="image or PDF")
    read.add_argument("--pages", default=None, help="PDF pages, 1-based: 1 | 2-4 | 1,3,5 (default: all)")
    read.add_argument("--dpi", type=int, default=_DEFAULT_DPI, help=f"PDF render resolution (default {_DEFAULT_DPI})")
    read.add_argument("--output", choices=("markdown", "text"), default="markdown")
    _add_model_options(read, task="read_document")
    read.set_defaults(func=_cmd_read)

    chart = commands.add_parser("chart", help="answer a question about a chart", description="Ask about a chart.")
    chart.add_argument("image", metavar="IMAGE")
    chart.add_argument("question", nargs="?", default="", metavar="QUESTION")
    chart.add_argument(
        "--table", action="store_true", help="extract the chart's data as a table instead (not with --stream)"
    )
    _add_model_options(chart, task="answer_chart_question")
    chart.set_defaults(func=_cmd_chart)

    serve = commands.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API (extra: serve)",
        description=(
            "Serve InternLM-XComposer2-4KHD: /v1/chat/completions, /v1/models, /health, /metrics; the API is "
            "described at /docs and /openapi.json."
        ),
    )
    server.build_parser(serve)
    serve.set_defaults(func=server.serve_from_args)

    tiny = commands.add_parser(
        "make-tiny-checkpoint",
        help="write a tiny random checkpoint in the official layout (try the pipeline offline)",
    )
    tiny.add_argument("directory", metavar="DIR")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--format", choices=("bin", "safetensors"), default="bin")
    tiny.add_argument("--shards", type=int, default=2, help="weight files (default 2, with an index; 1: one file)")
    tiny.add_argument(
        "--for-vllm",
        action="store_true",
        help="head size 32, the smallest vLLM's CPU attention accepts (the default tiny head size is 16)",
    )
    tiny.add_argument("--head-dim", type=int, default=None, metavar="N", help="decoder head size (vLLM: 32..512)")
    tiny.add_argument("--hidden-size", type=int, default=None, metavar="N", help="decoder width (default 64)")
    tiny.add_argument("--intermediate-size", type=int, default=None, metavar="N", help="decoder FFN width")
    tiny.add_argument("--layers", type=int, default=None, metavar="N", help="decoder layers (default 2)")
    tiny.add_argument("--kv-heads", type=int, default=None, metavar="N", help="key/value heads (default 2)")
    tiny.add_argument(
        "--vocab-size", type=int, default=None, metavar="N", help="output rows (>= the ~800 pieces; benchmarks)"
    )
    tiny.set_defaults(func=_cmd_make_tiny)
