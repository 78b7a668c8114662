"""Hugging Face loading (issue 13.5): options reach the hub client, one weight format, typed auth errors,
dtype="auto" as the checkpoint's dtype. ``huggingface_hub`` is monkeypatched: no test touches the network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hd4k_tools import HD4K
from hd4k_tools.errors import HubAuthError, ModelNotFoundError
from hd4k_tools.models.xcomposer2_4khd import hub as hub_module
from hd4k_tools.models.xcomposer2_4khd.checkpoint import checkpoint_dtype, load_pretrained, resolve_dtype
from hd4k_tools.models.xcomposer2_4khd.configuration import XComposer2Config
from hd4k_tools.models.xcomposer2_4khd.hub import HubOptions, download_patterns, resolve_checkpoint_path
from hd4k_tools.runtime.engines import check_engine_options
from hd4k_tools.runtime.local import LocalRunner

REPO = "org/model"
BOTH = ["config.json", "tokenizer.model", "model.safetensors", "pytorch_model.bin", "README.md"]


class FakeHub:
    """Records calls to ``HfApi().list_repo_files`` and ``snapshot_download``."""

    def __init__(self, folder: Path, files: list[str] | None = None, error: BaseException | None = None) -> None:
        self.folder = folder
        self.files = files if files is not None else BOTH
        self.error = error
        self.listed: list[dict[str, Any]] = []
        self.downloads: list[dict[str, Any]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
        hub = self

        class FakeApi:
            def list_repo_files(self, repo_id: str, **kwargs: Any) -> list[str]:
                hub.listed.append({"repo_id": repo_id, **kwargs})
                if hub.error is not None:
                    raise hub.error
                return list(hub.files)

        def snapshot_download(repo_id: str, **kwargs: Any) -> str:
            hub.downloads.append({"repo_id": repo_id, **kwargs})
            if hub.error is not None:
                raise hub.error
            return str(hub.folder)

        monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)

        def hf_hub_download(repo_id: str, filename: str, **kwargs: Any) -> str:
            snapshot_download(repo_id, **kwargs)  # the same options, recorded the same way
            return str(hub.folder / filename)

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
        # The one reachability check before any hub call: the fake Hub "answers" (no real request).
        monkeypatch.setattr(hub_module, "hub_unreachable", lambda *a, **k: None)
        return self


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO}"))


@pytest.fixture(autouse=True)
def _online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_options_reach_the_hub_client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hub = FakeHub(tmp_path).install(monkeypatch)
    options = HubOptions(revision="v1.2", token="hf_secret", cache_dir=tmp_path / "cache")
    assert resolve_checkpoint_path(REPO, options) == tmp_path
    assert hub.listed == [{"repo_id": REPO, "revision": "v1.2", "token": "hf_secret"}]
    (call,) = hub.downloads
    assert call["revision"] == "v1.2" and call["token"] == "hf_secret" and call["cache_dir"] == tmp_path / "cache"
    assert call["local_files_only"] is False


def test_one_weight_format_is_downloaded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hub = FakeHub(tmp_path).install(monkeypatch)
    resolve_checkpoint_path(REPO)
    patterns = hub.downloads[-1]["allow_patterns"]
    assert "*.safetensors" in patterns and "*.bin" not in patterns and "tokenizer.model" in patterns
    hub.files = ["config.json", "tokenizer.model", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"]
    resolve_checkpoint_path(REPO)
    patterns = hub.downloads[-1]["allow_patterns"]
    assert "*.bin" in patterns and "*.safetensors" not in patterns
    assert download_patterns(["a.safetensors", "b.bin"]).count("*.bin") == 0


@pytest.mark.parametrize("how", ["argument", "env"])
def test_local_files_only_and_hf_hub_offline_never_list(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, how: str
) -> None:
    hub = FakeHub(tmp_path).install(monkeypatch)
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolve_checkpoint_path(REPO, HubOptions(local_files_only=how == "argument", revision="main"))
    assert hub.listed == []
    assert hub.downloads[-1]["local_files_only"] is True and hub.downloads[-1]["revision"] == "main"


@pytest.mark.parametrize(
    ("error", "expected", "fragment"),
    [
        (GatedRepoError("Access to model org/model is restricted.", response=_response(403)), HubAuthError, "gated"),
        (HfHubHTTPError("401 Unauthorized", response=_response(401)), HubAuthError, "hf auth login"),
        (HfHubHTTPError("403 Forbidden", response=_response(403)), HubAuthError, "HF_TOKEN"),
        (
            RepositoryNotFoundError("404 Repository Not Found", response=_response(404)),
            ModelNotFoundError,
            "no repository",
        ),
        (RevisionNotFoundError("404 Revision Not Found", response=_response(404)), ModelNotFoundError, "revision 'v9'"),
    ],
)
def test_errors_are_told_apart(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: Exception, expected: type, fragment: str
) -> None:
    FakeHub(tmp_path, error=error).install(monkeypatch)
    with pytest.raises(expected, match=fragment) as info:
        resolve_checkpoint_path(REPO, HubOptions(revision="v9"))
    if expected is ModelNotFoundError:
        assert not isinstance(info.value, HubAuthError)


def test_offline_cache_miss_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    FakeHub(tmp_path, error=LocalEntryNotFoundError("not cached")).install(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve_checkpoint_path(REPO)


def test_dtype_auto_is_the_checkpoints_dtype() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, "bfloat16") == torch.bfloat16
    assert resolve_dtype("auto", cpu, "float16") == torch.float16
    assert resolve_dtype("auto", cpu, "float32") == torch.float32
    assert resolve_dtype("auto", cpu, None) == torch.float32
    assert resolve_dtype("fp32", cpu, "bfloat16") == torch.float32  # an explicit dtype wins
    assert checkpoint_dtype(XComposer2Config.from_dict({"torch_dtype": "float16"})) == "float16"
    assert checkpoint_dtype(XComposer2Config.from_dict({"dtype": "float32", "torch_dtype": "bfloat16"})) == "float32"


def test_from_pretrained_hub_id_end_to_end(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A hub id through HD4K.from_pretrained: the options reach snapshot_download, the checkpoint's
    bfloat16 is kept on a CPU with dtype="auto"."""
    folder = tmp_path / "snapshot"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config))
    hub = FakeHub(folder).install(monkeypatch)
    options = {"revision": "abc123", "token": "hf_x", "cache_dir": str(tmp_path / "c"), "local_files_only": True}
    check_engine_options("native", LocalRunner.from_pretrained, options)  # the engine takes them
    hd = HD4K.from_pretrained(REPO, device="cpu", **options)
    try:
        assert hub.downloads[-1]["revision"] == "abc123" and hub.downloads[-1]["token"] == "hf_x"
        assert hub.downloads[-1]["local_files_only"] is True
        assert hd.runner.model.dtype == torch.bfloat16  # type: ignore[attr-defined]
    finally:
        hd.close()
    loaded = load_pretrained(folder, device="cpu", dtype="float32")
    assert loaded.dtype == torch.float32


def test_unreachable_hub_falls_back_to_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Online mode, but the Hub cannot be reached: a snapshot cached earlier still loads (transformers does
    the same); nothing cached is a "not in the cache" error, not an auth one."""
    hub = FakeHub(tmp_path).install(monkeypatch)

    class Unreachable:
        def list_repo_files(self, repo_id: str, **kwargs: Any) -> list[str]:
            raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "HfApi", Unreachable)
    assert resolve_checkpoint_path(REPO, HubOptions(revision="v1")) == tmp_path
    assert hub.downloads[-1]["local_files_only"] is True and hub.downloads[-1]["revision"] == "v1"
    hub.error = LocalEntryNotFoundError("not cached")
    with pytest.raises(ModelNotFoundError, match="could not be fetched") as info:
        resolve_checkpoint_path(REPO)
    assert not isinstance(info.value, HubAuthError)
