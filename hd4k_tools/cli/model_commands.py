"""The ``hd4k`` sub-commands that run the model: ``describe``, ``read``, ``chart`` and ``serve``, plus
``make-tiny-checkpoint`` to try the whole pipeline without downloading weights.

    hd4k read scan.pdf --pages 1-2 --model /models/internlm-xcomposer2-4khd-7b
    hd4k chart sales.png "Which year had the highest revenue?" --stream
    hd4k describe photo.jpg --remote http://gpu-box:8000/v1
    hd4k serve --model /models/internlm-xcomposer2-4khd-7b --port 8000

``--model`` defaults to the official checkpoint id (``$HD4K_MODEL`` overrides it); it downloads where
there is internet, and offline the error says how to fetch the weights and pass ``--model DIR``.
Progress (checkpoint shards, PDF pages) goes to stderr; the answer to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from hd4k_tools.cli.args import parse_hd_num
from hd4k_tools.errors import InputError
from hd4k_tools.hd4k import HD4K
from hd4k_tools.serve import app as server

OFFICIAL_MODEL = "internlm/internlm-xcomposer2-4khd-7b"


def default_model() -> str:
    """``$HD4K_MODEL`` or the official checkpoint id."""
    return os.environ.get("HD4K_MODEL") or OFFICIAL_MODEL


def _open(args: argparse.Namespace) -> HD4K:
    if args.remote:
        return HD4K.remote(args.remote, args.remote_model or args.model, api_key=os.environ.get("HD4K_API_KEY"))
    return HD4K.from_pretrained(args.model, device=args.device, dtype=args.dtype, progress=None)


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
    with _open(args) as hd:
        if args.stream:
            return _stream(
                hd.stream_describe_image(
                    args.image, detail=args.detail, hd_num=hd_num, generation=_streaming_generation(args)
                )
            )
        return _emit(
            hd.describe_image(args.image, detail=args.detail, hd_num=hd_num, generation=_generation(args)), args
        )


def _cmd_chart(args: argparse.Namespace) -> int:
    _check_stream_json(args)
    if args.stream and args.table:
        raise InputError(
            "--table and --stream do not combine: the table is parsed from the whole answer; drop --stream."
        )
    hd_num = parse_hd_num(args.hd_num) if args.hd_num else None
    with _open(args) as hd:
        if args.stream:
            return _stream(
                hd.stream_answer_chart_question(
                    args.image, args.question, hd_num=hd_num, generation=_streaming_generation(args)
                )
            )
        result = hd.answer_chart_question(
            args.image, args.question or "", hd_num=hd_num, extract_table=args.table, generation=_generation(args)
        )
        if args.table and not args.json and result.table is not None:
            print(" | ".join(result.table.columns))
            for row in result.table.rows:
                print(" | ".join(row))
            return 0
        return _emit(result, args)


def _cmd_read(args: argparse.Namespace) -> int:
    _check_stream_json(args)
    hd_num = parse_hd_num(args.hd_num) if args.hd_num else None
    options = {"pages": args.pages, "hd_num": hd_num, "output": args.output, "dpi": args.dpi, "progress": None}
    with _open(args) as hd:
        if args.stream:
            return _stream(hd.stream_read_document(args.document, generation=_streaming_generation(args), **options))
        return _emit(hd.read_document(args.document, generation=_generation(args), **options), args)


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from hd4k_tools.models.xcomposer2_4khd.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(args.directory, seed=args.seed, format=args.format)
    print(f"wrote a tiny random checkpoint (official layout, gibberish answers) to {path}")
    print(f"try: hd4k describe examples/page.png --model {path} --max-new-tokens 16")
    return 0


def _add_model_options(p: argparse.ArgumentParser, *, default_hd: int) -> None:
    p.add_argument(
        "--model",
        default=default_model(),
        metavar="DIR|HUB_ID",
        help=f"checkpoint folder or hub id (default: $HD4K_MODEL or {OFFICIAL_MODEL})",
    )
    p.add_argument(
        "--hd-num", default=None, metavar="N|auto", help=f"maximum tiles (default for this task: {default_hd})"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="cap on the answer length")
    p.add_argument("--num-beams", type=int, default=None, metavar="N", help="beam search width (task default)")
    p.add_argument("--remote", default=None, metavar="BASE_URL", help="use an OpenAI-compatible server instead")
    p.add_argument("--remote-model", default=None, metavar="NAME", help="model name on the server (default: --model)")
    p.add_argument("--json", action="store_true", help="print the full result (plan, usage, timings) as JSON")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")


def register(commands: Any) -> None:
    """Add the model sub-commands to the ``hd4k`` parser's sub-parsers."""
    describe = commands.add_parser("describe", help="describe an image", description="Describe IMAGE.")
    describe.add_argument("image", metavar="IMAGE")
    describe.add_argument("--detail", choices=("detailed", "brief"), default="detailed")
    _add_model_options(describe, default_hd=16)
    describe.set_defaults(func=_cmd_describe)

    read = commands.add_parser(
        "read", help="transcribe a document image or PDF", description="Transcribe DOCUMENT page by page."
    )
    read.add_argument("document", metavar="DOCUMENT", help="image or PDF")
    read.add_argument("--pages", default=None, help="PDF pages, 1-based: 1 | 2-4 | 1,3,5 (default: all)")
    read.add_argument("--dpi", type=int, default=200, help="PDF render resolution (default 200)")
    read.add_argument("--output", choices=("markdown", "text"), default="markdown")
    _add_model_options(read, default_hd=55)
    read.set_defaults(func=_cmd_read)

    chart = commands.add_parser("chart", help="answer a question about a chart", description="Ask about a chart.")
    chart.add_argument("image", metavar="IMAGE")
    chart.add_argument("question", nargs="?", default="", metavar="QUESTION")
    chart.add_argument(
        "--table", action="store_true", help="extract the chart's data as a table instead (not with --stream)"
    )
    _add_model_options(chart, default_hd=25)
    chart.set_defaults(func=_cmd_chart)

    serve = commands.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API (extra: serve)",
        description="Serve InternLM-XComposer2-4KHD: /v1/chat/completions, /v1/models, /health.",
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
    tiny.set_defaults(func=_cmd_make_tiny)
