"""Where a checkpoint comes from: a local folder, or a Hugging Face Hub repository (torch-free).

Hub options reach ``huggingface_hub`` as a user of ``transformers.from_pretrained`` expects them:
``revision`` (branch, tag or commit), ``token`` (``None``: the token saved by ``hf auth login`` /
``$HF_TOKEN``), ``cache_dir`` (``None``: the HF cache), ``local_files_only`` (never touch the network; also
set by ``$HF_HUB_OFFLINE=1``, which ``huggingface_hub`` reads itself).

One weight format is downloaded: the repository's file list is read first and, when it holds both
``.safetensors`` and ``.bin`` weights, only the safetensors files are fetched (``allow_patterns``), as
``transformers`` does. Offline, the cached snapshot is used as it is.

Failures are told apart: an authentication problem (401/403, a gated or private repository) is an
:class:`~hd4k_tools.errors.HubAuthError` that says how to log in; an unknown repository or revision is
:class:`~hd4k_tools.errors.ModelNotFoundError`; a missing network is "not in the local cache".

No network fails fast: before ``huggingface_hub`` is asked for anything (it retries a refused connection
five times with backoff, about 30 s), one request with a short connect timeout
(:data:`HUB_CONNECT_TIMEOUT_S`) checks that the Hub answers at all; when it does not, the cached snapshot
serves if there is one, else the error says so at once and names both ways on: a local folder and the tiny
checkpoint (its hint written for the reader: ``--model DIR`` / ``hd4k make-tiny-checkpoint`` on the command
line, ``HD4K.from_pretrained(DIR)`` / ``make_tiny_checkpoint`` in Python).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from hd4k_tools.errors import CLI, PYTHON, CheckpointError, HubAuthError, MissingDependencyError, ModelNotFoundError
from hd4k_tools.models.registry import FAMILIES

__all__ = [
    "DEFAULT_MODEL_ID",
    "HUB_CONNECT_TIMEOUT_S",
    "MODEL_ENV",
    "HubOptions",
    "add_model_argument",
    "checkpoint_config",
    "default_model",
    "download_patterns",
    "hub_offline",
    "hub_unreachable",
    "resolve_checkpoint_path",
]

#: The official checkpoint (the family row's default).
DEFAULT_MODEL_ID = FAMILIES["internlmxcomposer2"].default_checkpoint
#: The environment variable that overrides the default model of every command.
MODEL_ENV = "HD4K_MODEL"
TOKENIZER_FILE = "tokenizer.model"
CONFIG_FILE = "config.json"
#: Seconds the one reachability check waits to connect to the Hub (TCP and TLS). A reachable Hub connects
#: in well under a second; an unreachable one is told within this time instead of after ~30 s of retries.
HUB_CONNECT_TIMEOUT_S = 1.5

_CONFIG_PATTERNS = ("*.json", TOKENIZER_FILE)
_SAFETENSORS = "*.safetensors"
_BIN = "*.bin"


def default_model() -> str:
    """``$HD4K_MODEL`` or the official checkpoint id."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL_ID


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """``--model DIR|HUB_ID`` as every command that loads the model takes it (``hd4k read/chart/describe/serve/mcp``):
    ``$HD4K_MODEL`` or the official checkpoint by default."""
    parser.add_argument(
        "--model",
        default=default_model(),
        metavar="DIR|HUB_ID",
        help=f"checkpoint folder or hub id (default: ${MODEL_ENV} or {DEFAULT_MODEL_ID})",
    )


def hub_offline() -> bool:
    """``$HF_HUB_OFFLINE`` is set to a true value (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class HubOptions:
    """Options of a Hub download (the names ``transformers.from_pretrained`` uses)."""

    revision: str | None = None
    token: str | bool | None = None
    cache_dir: str | Path | None = None
    local_files_only: bool = False

    @property
    def offline(self) -> bool:
        return self.local_files_only or hub_offline()


def download_patterns(files: Sequence[str]) -> list[str]:
    """``allow_patterns`` for a repository with these files: configs and tokenizer, plus ONE weight format
    (safetensors when present, else ``.bin``)."""
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    return [*_CONFIG_PATTERNS, _SAFETENSORS if has_safetensors else _BIN]


def how_to_get(repo_id: str) -> str:
    """What to run to fetch ``repo_id`` by hand (the part every reader shares; see :func:`remedies`)."""
    return (
        "To get the weights, run on a machine with internet access: "
        f"`hf download {repo_id} --local-dir DIR` (older huggingface_hub: "
        f"`huggingface-cli download {repo_id} --local-dir DIR`) and copy DIR here."
    )


def remedies() -> dict[str, str]:
    """The two ways on without the Hub, per audience (:attr:`HD4KError.hints`): a local checkpoint folder,
    or the tiny random checkpoint that runs the whole pipeline offline (gibberish answers)."""
    return {
        CLI: "Pass the folder with `--model DIR`, or try the pipeline offline with a tiny random checkpoint: "
        "`hd4k make-tiny-checkpoint tiny` then `--model tiny`.",
        PYTHON: "Pass the folder: `HD4K.from_pretrained(DIR)`, or try the pipeline offline with a tiny random "
        "checkpoint: `HD4K.from_pretrained(str(hd4k_tools.make_tiny_checkpoint('tiny')))`.",
    }


def _not_found(message: str) -> ModelNotFoundError:
    return ModelNotFoundError(message, hints=remedies())


def hub_endpoint() -> str:
    """The Hub's base URL as ``huggingface_hub`` uses it (``$HF_ENDPOINT`` or https://huggingface.co)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return str(constants.ENDPOINT).rstrip("/")


def hub_unreachable(endpoint: str | None = None, timeout_s: float = HUB_CONNECT_TIMEOUT_S) -> str | None:
    """``None`` when the Hub answers at all (any HTTP status), else why not, after ONE attempt: a request
    to ``endpoint`` with a ``timeout_s`` connect timeout, no retries, proxies from the environment as
    ``huggingface_hub`` uses them."""
    url = endpoint or hub_endpoint()
    try:
        with httpx.Client(timeout=httpx.Timeout(10.0, connect=timeout_s), follow_redirects=False) as client:
            client.head(url)
    except httpx.TransportError as exc:  # refused, DNS failure, connect timeout, dropped, proxy refused
        return f"{type(exc).__name__}: {_first_line(exc) if str(exc) else 'no answer'} ({url})"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else "no details"


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _classify(exc: BaseException, repo_id: str, options: HubOptions) -> Exception:
    """A typed error for a failure of ``huggingface_hub`` (classes looked up by name: their module moved
    between versions)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    status = _status(exc)
    detail = f"{type(exc).__name__}: {_first_line(exc)}"
    if "GatedRepoError" in names or status in (401, 403):
        gated = "GatedRepoError" in names or status == 403
        return HubAuthError(
            f"the Hugging Face Hub refused access to {repo_id!r} ({detail}). "
            + (
                "The repository is gated or private: accept its conditions on huggingface.co and "
                if gated
                else "The token is missing or invalid: "
            )
            + "log in with `hf auth login`, set $HF_TOKEN, or pass token=... (a token with read access)."
        )
    if "RevisionNotFoundError" in names:
        return ModelNotFoundError(
            f"revision {options.revision!r} of {repo_id!r} does not exist ({detail}); pass an existing "
            "branch, tag or commit as revision=..."
        )
    if "RepositoryNotFoundError" in names:
        # The Hub answers 401 for a private repository without a token, which huggingface_hub reports as
        # "not found"; say both.
        return _not_found(
            f"the Hugging Face Hub has no repository {repo_id!r} visible to you ({detail}); check the id, or "
            f"log in (`hf auth login`, $HF_TOKEN) if it is private. {how_to_get(repo_id)}"
        )
    if "LocalEntryNotFoundError" in names or "OfflineModeIsEnabled" in names or options.offline:
        return _offline_error(repo_id, options, detail)
    return _not_found(
        f"model {repo_id!r} is not a local folder and could not be fetched from the Hugging Face Hub "
        f"({detail}). {how_to_get(repo_id)}"
    )


def _offline_error(repo_id: str, options: HubOptions, detail: str, *, unreachable: bool = False) -> Exception:
    if unreachable:
        where = "the Hugging Face Hub cannot be reached"
    elif hub_offline():
        where = "$HF_HUB_OFFLINE is set"
    elif options.local_files_only:
        where = "local_files_only=True"
    else:
        where = "the Hugging Face Hub cannot be reached"
    return _not_found(
        f"model {repo_id!r} is not a local folder and not in the Hugging Face cache"
        f"{' under ' + str(options.cache_dir) if options.cache_dir else ''}, and {where} ({detail}). "
        f"{how_to_get(repo_id)}"
    )


def _repo_files(api: Any, repo_id: str, options: HubOptions) -> list[str]:
    return list(api.list_repo_files(repo_id, revision=options.revision, token=options.token))


def _hub_id(path_or_hub_id: str | Path) -> tuple[Path | None, str]:
    """``(folder, text)``: the local folder when ``path_or_hub_id`` is one, else ``(None, hub id)``.

    Raises:
        ModelNotFoundError: a path (not a hub id) with no folder there.
    """
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path, str(path_or_hub_id)
    text = str(path_or_hub_id)
    looks_like_path = path.exists() or text.startswith((".", "/", "~")) or "\\" in text or text.count("/") != 1
    if looks_like_path:
        raise _not_found(f"model folder {text!r} does not exist (or is not a folder). {how_to_get(DEFAULT_MODEL_ID)}")
    return None, text


def _import_hub(repo_id: str) -> Any:
    try:
        import huggingface_hub
    except ImportError as exc:
        raise MissingDependencyError(
            f"{repo_id!r} is a Hugging Face Hub id, and fetching it needs huggingface_hub: "
            'pip install "hd4k-tools[local]" (or pass a local checkpoint folder).'
        ) from exc
    return huggingface_hub


def _fetch(repo_id: str, options: HubOptions, *, config_only: bool) -> Path:
    """The snapshot folder (``config_only``: the path of ``config.json`` alone) of a hub id: from the cache
    when offline or when the Hub cannot be reached (checked once, :func:`hub_unreachable`), else
    downloaded."""
    huggingface_hub = _import_hub(repo_id)
    common: dict[str, Any] = {"revision": options.revision, "token": options.token, "cache_dir": options.cache_dir}

    def cached() -> Path:
        if config_only:
            return Path(huggingface_hub.hf_hub_download(repo_id, CONFIG_FILE, local_files_only=True, **common))
        return Path(huggingface_hub.snapshot_download(repo_id=repo_id, local_files_only=True, **common))

    try:
        if options.offline:
            return cached()  # only what was downloaded before is there
        reason = hub_unreachable()
        if reason is not None:
            # No network: a snapshot cached earlier still serves, as in transformers; else fail now (no
            # retry loop of huggingface_hub against a Hub that is not there).
            try:
                return cached()
            except Exception:
                raise _offline_error(repo_id, options, reason, unreachable=True) from None
        if config_only:
            return Path(huggingface_hub.hf_hub_download(repo_id, CONFIG_FILE, **common))
        try:
            files = _repo_files(huggingface_hub.HfApi(), repo_id, options)
        except Exception as exc:
            if _answered(exc):
                raise
            # The Hub went away between the check and the listing: the cache, as above.
            return _cached_or_raise(huggingface_hub, repo_id, options, common, exc)
        return Path(
            huggingface_hub.snapshot_download(
                repo_id=repo_id, allow_patterns=download_patterns(files), local_files_only=False, **common
            )
        )
    except Exception as exc:  # typed by _classify: auth, not found, offline, network
        if isinstance(exc, HubAuthError | ModelNotFoundError):
            raise
        raise _classify(exc, repo_id, options) from exc


def resolve_checkpoint_path(path_or_hub_id: str | Path, options: HubOptions | None = None) -> Path:
    """A local folder as it is, or a hub id fetched (or found in the local HF cache) with
    ``snapshot_download`` under ``options``.

    Raises:
        ModelNotFoundError: no such folder; an unknown repository or revision; offline (or the Hub
            unreachable) and not cached.
        HubAuthError: the Hub refused the token (401/403, a gated or private repository).
        MissingDependencyError: ``huggingface_hub`` is not installed (a hub id needs it).
    """
    folder, repo_id = _hub_id(path_or_hub_id)
    if folder is not None:
        return folder
    return _fetch(repo_id, options or HubOptions(), config_only=False)


def checkpoint_config(path_or_hub_id: str | Path, options: HubOptions | None = None) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict, without torch and without the weights: read from a local
    folder, or for a hub id the one file fetched (cache first, as :func:`resolve_checkpoint_path`). Lets a
    caller check arguments against the model (e.g. ``hd_num`` against ``max_length``) before loading it.

    Raises:
        ModelNotFoundError, HubAuthError, MissingDependencyError: as :func:`resolve_checkpoint_path`.
        CheckpointError: the folder has no readable ``config.json``.
    """
    folder, repo_id = _hub_id(path_or_hub_id)
    path = folder / CONFIG_FILE if folder is not None else _fetch(repo_id, options or HubOptions(), config_only=True)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{str(path)!r} cannot be read as the checkpoint's config ({type(exc).__name__}: {_first_line(exc)}); "
            "a checkpoint folder holds config.json, tokenizer.model and the weights."
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} is not a JSON object; is this a checkpoint's config.json?")
    return data


def _answered(exc: BaseException) -> bool:
    """The Hub answered (an HTTP status: auth, not found...), as opposed to being unreachable."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return _status(exc) is not None or bool(names & {"HfHubHTTPError", "RepositoryNotFoundError"})


def _cached_or_raise(
    huggingface_hub: Any, repo_id: str, options: HubOptions, common: dict[str, Any], network_error: Exception
) -> Path:
    try:
        return Path(huggingface_hub.snapshot_download(repo_id=repo_id, local_files_only=True, **common))
    except Exception:
        raise _classify(network_error, repo_id, options) from network_error
