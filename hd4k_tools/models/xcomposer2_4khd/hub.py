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
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hd4k_tools.errors import HubAuthError, MissingDependencyError, ModelNotFoundError
from hd4k_tools.models.registry import FAMILIES

__all__ = [
    "DEFAULT_MODEL_ID",
    "HubOptions",
    "download_patterns",
    "hub_offline",
    "resolve_checkpoint_path",
]

#: The official checkpoint (the family row's default).
DEFAULT_MODEL_ID = FAMILIES["internlmxcomposer2"].default_checkpoint
TOKENIZER_FILE = "tokenizer.model"

_CONFIG_PATTERNS = ("*.json", TOKENIZER_FILE)
_SAFETENSORS = "*.safetensors"
_BIN = "*.bin"


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
    """What to run to fetch ``repo_id`` by hand."""
    return (
        "To get the weights, run on a machine with internet access: "
        f"`hf download {repo_id} --local-dir DIR` (older huggingface_hub: "
        f"`huggingface-cli download {repo_id} --local-dir DIR`), copy DIR here and pass it: "
        "`--model DIR` on the command line or `HD4K.from_pretrained(DIR)` in Python."
    )


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
        return ModelNotFoundError(
            f"the Hugging Face Hub has no repository {repo_id!r} visible to you ({detail}); check the id, or "
            f"log in (`hf auth login`, $HF_TOKEN) if it is private. {how_to_get(repo_id)}"
        )
    if "LocalEntryNotFoundError" in names or "OfflineModeIsEnabled" in names or options.offline:
        if hub_offline():
            where = "$HF_HUB_OFFLINE is set"
        elif options.local_files_only:
            where = "local_files_only=True"
        else:
            where = "the Hub cannot be reached"
        return ModelNotFoundError(
            f"model {repo_id!r} is not a local folder and not in the Hugging Face cache"
            f"{' under ' + str(options.cache_dir) if options.cache_dir else ''}, and {where} ({detail}). "
            f"{how_to_get(repo_id)}"
        )
    return ModelNotFoundError(
        f"model {repo_id!r} is not a local folder and could not be fetched from the Hugging Face Hub "
        f"({detail}). {how_to_get(repo_id)}"
    )


def _repo_files(api: Any, repo_id: str, options: HubOptions) -> list[str]:
    return list(api.list_repo_files(repo_id, revision=options.revision, token=options.token))


def resolve_checkpoint_path(path_or_hub_id: str | Path, options: HubOptions | None = None) -> Path:
    """A local folder as it is, or a hub id fetched (or found in the local HF cache) with
    ``snapshot_download`` under ``options``.

    Raises:
        ModelNotFoundError: no such folder; an unknown repository or revision; offline and not cached.
        HubAuthError: the Hub refused the token (401/403, a gated or private repository).
        MissingDependencyError: ``huggingface_hub`` is not installed (a hub id needs it).
    """
    options = options or HubOptions()
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    looks_like_path = path.exists() or text.startswith((".", "/", "~")) or "\\" in text or text.count("/") != 1
    if looks_like_path:
        raise ModelNotFoundError(
            f"model folder {text!r} does not exist (or is not a folder). {how_to_get(DEFAULT_MODEL_ID)}"
        )
    try:
        import huggingface_hub
    except ImportError as exc:
        raise MissingDependencyError(
            f"{text!r} is a Hugging Face Hub id, and fetching it needs huggingface_hub: "
            'pip install "hd4k-tools[local]" (or pass a local checkpoint folder).'
        ) from exc
    common: dict[str, Any] = {"revision": options.revision, "token": options.token, "cache_dir": options.cache_dir}
    try:
        if options.offline:
            # The cached snapshot as it is (only what was downloaded before is there).
            folder = huggingface_hub.snapshot_download(repo_id=text, local_files_only=True, **common)
        else:
            try:
                files = _repo_files(huggingface_hub.HfApi(), text, options)
            except Exception as exc:
                if _answered(exc):
                    raise
                # The Hub cannot be reached: a snapshot cached earlier still serves, as in transformers.
                return _cached_or_raise(huggingface_hub, text, options, common, exc)
            folder = huggingface_hub.snapshot_download(
                repo_id=text, allow_patterns=download_patterns(files), local_files_only=False, **common
            )
    except Exception as exc:  # typed by _classify: auth, not found, offline, network
        if isinstance(exc, HubAuthError | ModelNotFoundError):
            raise
        raise _classify(exc, text, options) from exc
    return Path(folder)


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
