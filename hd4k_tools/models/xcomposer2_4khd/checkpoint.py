"""Load the official InternLM-XComposer2-4KHD-7B checkpoint (or a tiny one in the same layout).

The model is built on the meta device (no memory), then filled shard by shard with
``load_state_dict(..., strict=False, assign=True)``. Every parameter ends up in one dtype, as the
official ``from_pretrained(torch_dtype=torch.bfloat16)`` does (norms included).

Peak memory ≈ the model + at most one shard (issue 3 target: <= 1.3x the checkpoint's bytes):

* ``.bin`` shards are read with ``torch.load(mmap=False)``: the tensors land in anonymous memory once.
  A tensor already in the target dtype on a CPU target is assigned as it is (no second copy); others are
  cast / moved and the shard's own tensor is dropped right away. (With ``mmap=True`` the file's pages
  stay resident next to every copy until the shard is unmapped — 1.46x measured — and assigning the
  mmap views themselves would leave the parameters backed by a file the user may delete or replace.)
* ``.safetensors`` shards are read tensor by tensor with plain file reads straight into the tensor's
  final buffer (:func:`_iter_safetensors`), so no mapping of the shard is resident at all.
* Each shard is released (its dict emptied as it is consumed) before the next is read.

Keys and shapes are checked strictly against the model before any tensor data is read when the
checkpoint has an index (docs/model.md §3.4); buffers some transformers versions saved (``rotary_emb.inv_freq``,
CLIP ``position_ids``) and the unused CLIP ``post_layernorm`` are accepted and ignored.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from hd4k_tools.errors import CheckpointError, DeviceError, MissingDependencyError
from hd4k_tools.models.xcomposer2_4khd.configuration import XComposer2Config
from hd4k_tools.models.xcomposer2_4khd.hub import DEFAULT_MODEL_ID, HubOptions, resolve_checkpoint_path
from hd4k_tools.models.xcomposer2_4khd.modeling import PLoRALinear, XComposer2ForCausalLM
from hd4k_tools.models.xcomposer2_4khd.tokenizer import InternLM2Tokenizer
from hd4k_tools.progress import track

__all__ = ["DEFAULT_MODEL_ID", "LoadedModel", "checkpoint_dtype", "load_pretrained", "resolve_checkpoint_path"]

# Weight layouts, in order of preference (safetensors first when both are present).
SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"

# Keys that may be in a checkpoint but are not parameters of the model here (see module docstring).
_IGNORED_KEYS = re.compile(
    r"(^|\.)rotary_emb\.inv_freq$"
    r"|^vit\.vision_tower\.vision_model\.embeddings\.position_ids$"
    r"|^vit\.vision_tower\.vision_model\.post_layernorm\.(weight|bias)$"
)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_MAX_LISTED = 20


@dataclass
class LoadedModel:
    """A loaded model (in eval mode) with its tokenizer and configuration."""

    model: XComposer2ForCausalLM
    tokenizer: InternLM2Tokenizer
    config: XComposer2Config
    path: Path
    dtype: torch.dtype
    device: torch.device
    load_seconds: float


# ----------------------------------------------------------------------------------------------------
# Device / dtype
# ----------------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` if available, else ``mps``, else ``cpu``; unavailable devices raise
    :class:`DeviceError`."""
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} requested but CUDA is not available (torch {torch.__version__}); "
                "use device='cpu' or install a CUDA build of torch on a machine with an NVIDIA GPU."
            )
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist; "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}."
            )
        return torch.device("cuda", index)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps' requested but MPS is not available; use device='cpu'.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device type {dev.type!r} is not supported; use 'cpu', 'cuda' or 'mps'.")
    return dev


def resolve_dtype(
    dtype: str | torch.dtype, device: torch.device, checkpoint: str | torch.dtype | None = None
) -> torch.dtype:
    """The dtype to load in. ``"auto"`` means the checkpoint's own dtype (``checkpoint``: the config's
    ``torch_dtype`` / ``dtype``), as in ``transformers``: the official checkpoint is bfloat16, so on a CPU
    ``"auto"`` holds about 2 bytes per parameter (half of float32). On CUDA without bfloat16 support a
    bfloat16 checkpoint loads as float16. Without a checkpoint dtype, ``"auto"`` is bfloat16 on CUDA (float16
    where bfloat16 is not supported) and float32 on CPU/MPS. Also accepts ``"bf16"``, ``"fp16"``, ``"fp32"``,
    the full names and ``torch.dtype`` objects."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16.")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        stored = _checkpoint_torch_dtype(checkpoint)
        if stored is not None:
            if stored == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                return torch.float16
            return stored
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if key not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use 'auto', 'bf16', 'fp16' or 'fp32'.")
    return _DTYPES[key]


def _checkpoint_torch_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        return value if value in (torch.float32, torch.bfloat16, torch.float16) else None
    found = _DTYPES.get(str(value).lower().removeprefix("torch."))
    return found


def checkpoint_dtype(config: XComposer2Config) -> str | None:
    """The dtype the checkpoint declares: ``dtype`` (transformers >= 4.56 writes this name) or
    ``torch_dtype``."""
    value = config.extra.get("dtype") or config.torch_dtype
    return value if isinstance(value, str) else None


# ----------------------------------------------------------------------------------------------------
# Locating the checkpoint
# ----------------------------------------------------------------------------------------------------
def find_weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files to read (safetensors preferred) and the index's ``weight_map`` if any."""
    for index_name, single_name in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index_file = folder / index_name
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_file} is not a valid index ({exc}); re-download it.") from exc
            names = list(dict.fromkeys(weight_map.values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(
                    f"{folder}: shard(s) {_listing(missing)} named in {index_name} are missing; "
                    "the download is incomplete — download the repository again."
                )
            return [folder / n for n in names], dict(weight_map)
        if (folder / single_name).is_file():
            return [folder / single_name], None
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(
        f"{folder} holds no weights (expected {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX} or {BIN_SINGLE}; "
        f"found: {_listing(present) or 'nothing'})."
    )


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------
# safetensors dtype names (https://github.com/huggingface/safetensors, format description).
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_MAX_SAFETENSORS_HEADER = 100 << 20  # the reference implementation's limit


def _safetensors_header(f: BinaryIO, file: Path) -> tuple[dict[str, dict], int]:
    """``(entries, data_start)`` of an open ``.safetensors`` file: 8-byte little-endian header size,
    a JSON header ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": …}``, then the
    data, offsets relative to its start."""
    size = file.stat().st_size
    raw = f.read(8)
    if len(raw) != 8:
        raise CheckpointError(f"{file} is too short to be a safetensors file")
    n = int.from_bytes(raw, "little")
    if n > _MAX_SAFETENSORS_HEADER or 8 + n > size:
        raise CheckpointError(f"{file} has an invalid safetensors header size ({n} bytes)")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} has an invalid safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has an invalid safetensors header")
    header.pop("__metadata__", None)
    return header, 8 + n


def _safetensors_keys(file: Path) -> list[str]:
    with open(file, "rb") as f:
        return list(_safetensors_header(f, file)[0])


def _iter_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of a ``.safetensors`` file, one at a time, each read from the file straight into
    a fresh CPU tensor (no memory map, no intermediate buffer): only the tensor being read is extra."""
    if sys.byteorder != "little":  # the format is little-endian; the reference reader converts
        from safetensors.torch import load_file

        yield from load_file(str(file), device="cpu").items()
        return
    with open(file, "rb", buffering=0) as f:
        header, data_start = _safetensors_header(f, file)
        size = file.stat().st_size
        for key, info in header.items():
            try:
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{file}: unsupported or malformed entry for {key!r} ({exc})") from exc
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or begin < 0 or data_start + end > size:
                raise CheckpointError(f"{file}: {key!r} has data offsets {begin}..{end} that do not fit its shape")
            flat = torch.empty(nbytes, dtype=torch.uint8)  # [nbytes], becomes the tensor's storage
            if nbytes:
                f.seek(data_start + begin)
                view = memoryview(flat.numpy())
                done = 0
                while done < nbytes:
                    got = f.readinto(view[done:])
                    if not got:
                        raise CheckpointError(f"{file} ends inside {key!r}; re-download it")
                    done += got
            yield key, flat.view(dtype).reshape(shape)  # [nbytes] -> [numel] -> shape, same storage


def _iter_bin(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of a ``.bin`` file read into memory (``mmap=False``); each tensor is removed
    from the loaded dict as it is handed out, so nothing keeps the shard alive behind the caller."""
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=False)
    while state:
        key = next(iter(state))
        yield key, state.pop(key)


def _read_shard(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one weight file, lazily; read errors become :class:`CheckpointError`."""
    tensors = _iter_safetensors(file) if file.suffix == ".safetensors" else _iter_bin(file)
    try:
        yield from tensors
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read {file} ({type(exc).__name__}: {exc}); re-download it.") from exc


def _shard_keys(file: Path) -> list[str]:
    try:
        if file.suffix == ".safetensors":
            return _safetensors_keys(file)
        # mmap: reads the pickled key table, not the tensor data (nothing of it becomes resident).
        return list(torch.load(file, map_location="cpu", weights_only=True, mmap=True).keys())
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read {file} ({type(exc).__name__}: {exc}); re-download it.") from exc


def _check_keys(checkpoint_keys: list[str], expected: dict[str, torch.Size], source: Path) -> None:
    present = set(checkpoint_keys)
    unexpected = sorted(k for k in present if k not in expected and not _IGNORED_KEYS.search(k))
    missing = sorted(k for k in expected if k not in present)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        raise CheckpointError(
            f"{source} does not match InternLM-XComposer2-4KHD ({'; '.join(parts)}). Use the complete, "
            f"unmodified {DEFAULT_MODEL_ID} checkpoint (config.json must describe the same sizes)."
        )


def _iter_shards(
    files: list[Path], *, progress: bool | None, cancel: threading.Event | None
) -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
    for file in track(files, total=len(files), desc="Loading shards", unit="shard", progress=progress, cancel=cancel):
        yield _read_shard(file)


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if it is contiguous and alone in its storage, else a compact copy: a parameter must not
    keep a larger storage alive (a checkpoint may hold views of a bigger tensor)."""
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole and tensor.is_contiguous() else tensor.contiguous().clone()


def _load_shard(
    model: nn.Module,
    tensors: Iterator[tuple[str, torch.Tensor]],
    expected: dict[str, torch.Size],
    *,
    dtype: torch.dtype,
    device: torch.device,
    folder: Path,
    tolerated: frozenset[str] = frozenset(),
) -> None:
    """Cast/move one shard's tensors and assign them to ``model``; the shard's own tensors are dropped
    as they are consumed, so at most one shard (in its stored dtype) is held next to the model.

    A key that is neither expected, a known buffer nor in ``tolerated`` raises :class:`CheckpointError`
    (strict loading also when an index does not list everything its shards hold)."""
    ready: dict[str, torch.Tensor] = {}
    for key, tensor in tensors:
        if key not in expected:
            if _IGNORED_KEYS.search(key) or key in tolerated:
                continue  # a known buffer, or the tied output head
            # Only reachable with an index: the index is checked up front, the shards' own keys here.
            raise CheckpointError(
                f"{folder}: a weight file holds {key!r}, which the index does not list and the model does "
                f"not have. Use the complete, unmodified {DEFAULT_MODEL_ID} checkpoint."
            )
        if tensor.shape != expected[key]:
            raise CheckpointError(
                f"{folder}: {key} has shape {list(tensor.shape)} in the checkpoint but the model "
                f"(from config.json) expects {list(expected[key])}; config.json and the weights "
                "do not belong together — re-download the checkpoint."
            )
        cast = dtype if tensor.is_floating_point() else tensor.dtype
        if tensor.dtype == cast and tensor.device == device:
            ready[key] = _owned(tensor)  # already what the model needs: no second copy
        else:
            ready[key] = tensor.to(device=device, dtype=cast)  # a new tensor; the read one is freed now
    model.load_state_dict(ready, strict=False, assign=True)


# ----------------------------------------------------------------------------------------------------
# Quantisation (bitsandbytes, CUDA only)
# ----------------------------------------------------------------------------------------------------
def _check_quantization(quantization: str | None, device: torch.device) -> None:
    if quantization is None:
        return
    if quantization not in ("8bit", "4bit"):
        raise ValueError(f"quantization must be None, '8bit' or '4bit', not {quantization!r}.")
    if device.type != "cuda":
        raise DeviceError(
            f"{quantization} quantisation needs a CUDA GPU (bitsandbytes), but the device is {device}; "
            "drop quantization= or run on an NVIDIA GPU."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"{quantization} quantisation needs bitsandbytes: pip install 'hd4k-tools[quantization]'."
        ) from exc


def quantize_decoder(model: XComposer2ForCausalLM, quantization: str, device: torch.device) -> None:
    """Replace the base weights of every decoder projection (wqkv, wo, w1, w2, w3) by bitsandbytes
    layers on ``device``; the LoRA branches, embeddings, head and vision tower stay in full precision.

    Expects the model on the CPU (bitsandbytes quantises while moving a weight to the GPU).
    """
    import bitsandbytes as bnb

    compute_dtype = model.dtype
    for module in model.model.layers.modules():
        if not isinstance(module, PLoRALinear):
            continue
        weight = module.weight.data
        if quantization == "8bit":
            q: nn.Module = bnb.nn.Linear8bitLt(
                module.in_features, module.out_features, bias=module.bias is not None, has_fp16_weights=False
            )
            q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        module.quantized_base = q.to(device)
        # The full-precision copy is no longer used; keep an empty placeholder parameter.
        module.weight = nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------
def _meta_model(
    config: XComposer2Config, files: list[Path], weight_map: dict[str, str] | None, folder: Path
) -> tuple[XComposer2ForCausalLM, dict[str, torch.Size]]:
    """The model on the meta device and its expected ``{key: shape}``, once the weight files' keys match."""
    with torch.device("meta"):
        model = XComposer2ForCausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("output.weight", None)
    # With an index the key check happens before any tensor data is read.
    keys = list(weight_map) if weight_map is not None else [k for f in files for k in _shard_keys(f)]
    if config.tie_word_embeddings:
        keys = [k for k in keys if k != "output.weight"]  # tied to the embeddings below
    _check_keys(keys, expected, folder)
    return model, expected


def _finish_model(
    model: XComposer2ForCausalLM,
    folder: Path,
    *,
    load_device: torch.device,
    quantization: str | None,
    target_device: torch.device,
) -> None:
    """Tie the embeddings, refuse parameters the files left out, quantise, and set eval mode."""
    if model.config.tie_word_embeddings:
        model.output.weight = model.model.tok_embeddings.weight
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(
            f"{folder}: {len(still_meta)} parameter(s) were not in the weight files: {_listing(still_meta)}."
        )
    model.reset_buffers(load_device)
    model.requires_grad_(False)
    if quantization:
        quantize_decoder(model, quantization, target_device)
        model.to(target_device)
        model.reset_buffers(target_device)
    model.eval()


def load_pretrained(
    path_or_hub_id: str | Path = DEFAULT_MODEL_ID,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    quantization: str | None = None,
    progress: bool | None = None,
    cancel: threading.Event | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> LoadedModel:
    """Load model, tokenizer and config from a checkpoint folder or a hub id.

    ``dtype="auto"`` is the checkpoint's dtype (see :func:`resolve_dtype`). ``revision``, ``token``,
    ``cache_dir`` and ``local_files_only`` (or ``$HF_HUB_OFFLINE=1``) go to the Hub client for a hub id
    (:mod:`hd4k_tools.models.xcomposer2_4khd.hub`: one weight format is downloaded, safetensors preferred);
    an authentication failure is :class:`~hd4k_tools.errors.HubAuthError`.

    Formats: ``model.safetensors.index.json`` + shards, ``model.safetensors``,
    ``pytorch_model.bin.index.json`` + shards, ``pytorch_model.bin`` (safetensors preferred).
    Raises :class:`ModelNotFoundError` (no such folder / hub id unreachable, with how to download),
    :class:`CheckpointError` (missing/unexpected keys, wrong shapes, broken files),
    :class:`DeviceError` (device or quantisation not available), :class:`MissingDependencyError`
    (bitsandbytes for quantisation), :class:`~hd4k_tools.errors.CancelledError` (``cancel`` set
    between shards). ``progress`` shows a bar over shards (``None``: when a person watches).
    """
    start = time.perf_counter()
    target_device = resolve_device(device)
    _check_quantization(quantization, target_device)
    hub = HubOptions(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    folder = resolve_checkpoint_path(path_or_hub_id, hub)

    config = XComposer2Config.from_pretrained(folder)
    target_dtype = resolve_dtype(dtype, target_device, checkpoint_dtype(config))
    tokenizer = InternLM2Tokenizer.from_pretrained(folder)
    files, weight_map = find_weight_files(folder)

    model, expected = _meta_model(config, files, weight_map, folder)

    tolerated = frozenset({"output.weight"}) if config.tie_word_embeddings else frozenset()
    # Quantised loads stage the weights on the CPU: bitsandbytes quantises on the way to the GPU.
    load_device = torch.device("cpu") if quantization else target_device
    for shard in _iter_shards(files, progress=progress, cancel=cancel):
        # One shard at a time; _load_shard's locals (and the shard) are gone before the next is read.
        _load_shard(model, shard, expected, dtype=target_dtype, device=load_device, folder=folder, tolerated=tolerated)

    _finish_model(model, folder, load_device=load_device, quantization=quantization, target_device=target_device)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        path=folder,
        dtype=target_dtype,
        device=target_device,
        load_seconds=time.perf_counter() - start,
    )
