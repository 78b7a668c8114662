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
load. ``hd4k read`` prints each page as soon as it is read, under a ``--- page N ---`` header for PDFs
(written with the page's text, so an interrupted page leaves no empty header);
Ctrl-C keeps what was printed and says which pages are left (``--pages`` to resume).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import sys
import time
import typing
from collections.abc import Sequence
from typing import Any

from pydantic.fields import FieldInfo

from hd4k_tools.arguments import add_model_argument
from hd4k_tools.cli.args import EXIT_INTERRUPTED, PROG, parse_hd_num
from hd4k_tools.cli.checks import check_before_load, document_sizes
from hd4k_tools.errors import InputError
from hd4k_tools.hd4k import HD4K
from hd4k_tools.inputs.images import SourceBytes, load_image, read_source_bytes
from hd4k_tools.inputs.pdf import select_pages
from hd4k_tools.models.registry import DEFAULT_FAMILY
from hd4k_tools.progress import progress_line
from hd4k_tools.results import DocumentResult, TaskResult
from hd4k_tools.runtime.engines import DEFAULT_ENGINE, ENGINES
from hd4k_tools.serve import app as server
from hd4k_tools.tasks import TASKS, CliSpec, TaskRegistry, TaskSpec
from hd4k_tools.zoom import check_region, check_windows

# The facade's PDF resolution, read from its signature (one fact, one place).
_DEFAULT_DPI: int = inspect.signature(HD4K).parameters["dpi"].default

__all__ = ["register"]


def _progress() -> bool:
    """Progress for the command line: on (bar or plain lines) unless ``HD4K_NO_PROGRESS`` is set."""
    return os.environ.get("HD4K_NO_PROGRESS", "") in ("", "0")


def _check_device(args: argparse.Namespace) -> None:
    """The device exists and the dtype is known (native engine only), checked before the model loads and
    after every check that needs no torch (:mod:`~hd4k_tools.cli.checks`)."""
    if args.remote or args.engine != "native":
        return
    checkpoint = DEFAULT_FAMILY.module("checkpoint")  # torch: the native engine's extra
    device = checkpoint.resolve_device(args.device)
    try:
        checkpoint.resolve_dtype(args.dtype, device)
    except ValueError as err:
        raise InputError(f"--dtype: {err}") from None


def _check_engine(args: argparse.Namespace) -> None:
    """``--engine`` combines with the options it takes (checked before the model loads)."""
    if args.engine == DEFAULT_ENGINE:
        return
    if args.remote:
        raise InputError(f"--remote and --engine {args.engine} do not combine: the server runs its own engine.")
    if args.device != "auto":
        raise InputError(f"--device is for --engine native; --engine {args.engine} picks its devices itself.")


def _open(args: argparse.Namespace) -> HD4K:
    if args.remote:
        return HD4K.remote(args.remote, args.remote_model or args.model, api_key=os.environ.get("HD4K_API_KEY"))
    if args.engine != DEFAULT_ENGINE:
        return HD4K.from_pretrained(args.model, engine=args.engine, dtype=args.dtype)
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


# Options of HD4K.run_task (beyond the task's own) that a task command passes on when its schema has them.
_RUN_OPTIONS = ("region", "windows")


def _task_options(spec: TaskSpec, args: argparse.Namespace) -> dict[str, Any]:
    """The task's own options (``spec.option_names()``) and ``--region``/``--windows`` as given."""
    names = (*spec.option_names(), *_RUN_OPTIONS)
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def _parsed_flags(spec: TaskSpec, args: argparse.Namespace) -> str:
    """The CLI-only options given with a non-default value, as flags (for the --stream refusal)."""
    cli = spec.cli
    if cli is None or cli.options is None:
        return "these options"
    given = [
        _flag(cli, name) for name, f in cli.options.model_fields.items() if getattr(args, name, f.default) != f.default
    ]
    return ", ".join(given) or "these options"


def _cmd_task(spec: TaskSpec, args: argparse.Namespace) -> int:
    """Any task's sub-command: every check before the model loads, then :meth:`HD4K.run_task` (or
    :meth:`HD4K.stream_task`); a task that reads documents goes page by page (:func:`_read_pages`)."""
    _check_stream_json(args)
    _check_engine(args)
    options = _task_options(spec, args)
    call = spec.call({k: v for k, v in options.items() if k not in _RUN_OPTIONS})  # e.g. an empty question
    if options.get("region") is not None:
        options["region"] = check_region(options["region"])  # "x0,y0,x1,y1", checked before the load
    if options.get("windows") is not None:
        options["windows"] = check_windows(options["windows"])
    if args.stream and call.parse is not None:
        raise InputError(
            f"{_parsed_flags(spec, args)} and --stream do not combine: the answer is parsed as a whole; drop --stream."
        )
    hd_num = parse_hd_num(args.hd_num) if args.hd_num else None
    if spec.documents:
        raw, numbers = _document_pages(args)
        check_before_load(args, task=spec, sizes=document_sizes(raw, numbers, dpi=args.dpi), hd_num=hd_num)
        _check_device(args)
        with _open(args) as hd:
            return _read_pages(hd, spec, raw, numbers, hd_num, options, args)
    image = _image_input(args.image)
    check_before_load(args, task=spec, sizes=[image.size], hd_num=hd_num)
    _check_device(args)
    with _open(args) as hd:
        if args.stream:
            return _stream(
                hd.stream_task(spec, image, hd_num=hd_num, generation=_streaming_generation(args), **options)
            )
        result = hd.run_task(spec, image, hd_num=hd_num, generation=_generation(args), **options)
        table = getattr(result, "table", None)
        if table is not None and not args.json:
            print(" | ".join(table.columns))
            for row in table.rows:
                print(" | ".join(row))
            return 0
        return _emit(result, args)


def _document_pages(args: argparse.Namespace) -> tuple[SourceBytes, list[int | None]]:
    """The document read once, and the 1-based pages to read (``[None]`` for an image), checked before the
    model loads: the file exists and is an image or a PDF, the page range fits, ``--dpi`` is positive."""
    if args.dpi < 1:
        raise InputError(f"--dpi must be a positive number of dots per inch, got {args.dpi} (e.g. --dpi 200).")
    raw = read_source_bytes(args.image)
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


def _read_pages(
    hd: HD4K,
    spec: TaskSpec,
    raw: SourceBytes,
    numbers: list[int | None],
    hd_num: Any,
    task_options: dict[str, Any],
    args: argparse.Namespace,
) -> int:
    """Read page by page: each page printed as soon as it is done (under a header for PDFs); Ctrl-C keeps
    the printed pages and says which are left."""
    options = {"hd_num": hd_num, "dpi": args.dpi, "progress": False, **task_options}
    done: list[TaskResult] = []
    total = len(numbers)
    start = time.perf_counter()
    current = 0
    try:
        for current, number in enumerate(numbers):
            pages = [number] if number is not None else None
            # The header comes with the page's text (its first streamed piece, or the finished page),
            # never before: an interrupted page leaves no empty header behind.
            header = ""
            if number is not None and not args.json:
                header = ("\n" if current else "") + f"--- page {number} ---\n"
            if args.stream:
                deltas = hd.stream_task(spec, raw, pages=pages, generation=_streaming_generation(args), **options)
                _stream(_after_header(header, deltas))
            else:
                document = hd.run_task(spec, raw, pages=pages, generation=_generation(args), **options)
                page = document.pages[0]  # type: ignore[union-attr]
                done.append(page)
                if not args.json:
                    sys.stdout.write(header)
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


def _after_header(header: str, deltas: Any) -> Any:
    """``deltas`` with ``header`` written before the first one (or at the end of an empty answer)."""
    pending = header
    for delta in deltas:
        if pending:
            sys.stdout.write(pending)
            pending = ""
        yield delta
    if pending:
        sys.stdout.write(pending)


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    tiny = DEFAULT_FAMILY.module("tiny")  # torch: the native engine's extra
    sizes = {
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.layers,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab_size,
    }
    overrides = {key: value for key, value in sizes.items() if value is not None}
    head_dim = args.head_dim if args.head_dim is not None else (tiny.VLLM_HEAD_DIM if args.for_vllm else None)
    try:
        path = tiny.make_tiny_checkpoint(
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
    if head_dim is not None and head_dim >= tiny.VLLM_HEAD_DIM:
        print(f"or, with vLLM: VLLM_CPU_KVCACHE_SPACE=1 hd4k serve --engine vllm --model {path} -- --enforce-eager")
    return 0


def _add_model_options(p: argparse.ArgumentParser, spec: TaskSpec) -> None:
    add_model_argument(p)
    p.add_argument(
        "--engine",
        choices=tuple(ENGINES),
        default=DEFAULT_ENGINE,
        help=f"where the model runs (default {DEFAULT_ENGINE}; vllm needs the vllm extra)",
    )
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


def _flag(cli: CliSpec, name: str) -> str:
    return "--" + cli.flags.get(name, name).replace("_", "-")


def _add_field(p: argparse.ArgumentParser, cli: CliSpec, name: str, field: FieldInfo) -> None:
    """One ``--option`` from a pydantic field: a Literal gives choices, a bool a switch, an int ``type=int``."""
    help_text = field.description
    kinds = {a for a in (typing.get_args(field.annotation) or (field.annotation,)) if a is not type(None)}
    if name == "region":
        help_text = "look at a part only: x0,y0,x1,y1 in page fractions, e.g. 0,0,0.5,0.5 (the top-left quarter)"
    if field.annotation is bool:
        p.add_argument(_flag(cli, name), dest=name, action="store_true", help=help_text)
    elif typing.get_origin(field.annotation) is typing.Literal:
        choices = typing.get_args(field.annotation)
        p.add_argument(_flag(cli, name), dest=name, choices=choices, default=field.default, help=help_text)
    else:
        kind = int if kinds == {int} else str
        p.add_argument(_flag(cli, name), dest=name, type=kind, default=field.default, help=help_text)


# Arguments every task command gets from _add_model_options (or as its first positional).
_MODEL_OPTION_FIELDS = ("image", "hd_num")


def add_task_command(commands: Any, spec: TaskSpec) -> argparse.ArgumentParser:
    """The sub-command of ``spec`` (its :class:`~hd4k_tools.tasks.CliSpec`), generated from the task's
    argument schema and CLI options, running :func:`_cmd_task`."""
    cli = spec.cli
    assert cli is not None and spec.args is not None
    p = commands.add_parser(cli.command, help=cli.help, description=cli.description or cli.help)
    first, *rest = cli.positionals
    p.add_argument(first, metavar=cli.metavar, help="image or PDF" if spec.documents else None)
    for name in rest:
        p.add_argument(name, nargs="?", default="", metavar=name.upper())
    fields = {**spec.args.model_fields, **(cli.options.model_fields if cli.options else {})}
    for name, field in fields.items():
        if name not in cli.positionals and name not in _MODEL_OPTION_FIELDS:
            _add_field(p, cli, name, field)
    if spec.documents:
        p.add_argument("--dpi", type=int, default=_DEFAULT_DPI, help=f"PDF render resolution (default {_DEFAULT_DPI})")
    _add_model_options(p, spec)
    p.set_defaults(func=functools.partial(_cmd_task, spec))
    return p


def register(commands: Any, tasks: TaskRegistry | None = None) -> None:
    """Add the model sub-commands to the ``hd4k`` parser's sub-parsers: one per task of ``tasks`` (default
    :data:`~hd4k_tools.tasks.TASKS`) that has a :class:`~hd4k_tools.tasks.CliSpec`, then ``serve`` and
    ``make-tiny-checkpoint``."""
    for spec in (TASKS if tasks is None else tasks).values():
        if spec.cli is not None and spec.args is not None:
            add_task_command(commands, spec)

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
