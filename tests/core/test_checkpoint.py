"""load_pretrained: formats, strict keys/shapes, hub ids offline, devices, dtypes, cancellation."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from hd4k_tools.errors import CancelledError, CheckpointError, DeviceError, ModelNotFoundError
from hd4k_tools.models.xcomposer2_4khd import LoadedModel, load_pretrained
from hd4k_tools.models.xcomposer2_4khd.checkpoint import resolve_dtype
from hd4k_tools.models.xcomposer2_4khd.tiny import make_tiny_checkpoint


def _load(path, **kwargs) -> LoadedModel:
    return load_pretrained(path, dtype="float32", device="cpu", progress=False, **kwargs)


def _logits(loaded: LoadedModel) -> torch.Tensor:
    model, tok = loaded.model, loaded.tokenizer
    ids = tok.encode("[UNUSED_TOKEN_146]user\nWhat is the total?[UNUSED_TOKEN_145]\n")
    embeds = model.embed_tokens(ids)[None]
    im_mask = torch.zeros(1, len(ids), dtype=torch.bool)
    im_mask[0, 3:6] = True
    with torch.inference_mode():
        return model(embeds, im_mask)


@pytest.fixture(scope="module")
def reference_logits(tiny_model) -> torch.Tensor:
    return _logits(tiny_model)


def test_loaded_model_state(tiny_model, tiny_checkpoint):
    assert tiny_model.path == tiny_checkpoint
    assert tiny_model.dtype == torch.float32 and tiny_model.device == torch.device("cpu")
    model = tiny_model.model
    assert not model.training
    assert all(not p.is_meta and not p.requires_grad for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"
    position_ids = model.vit.vision_tower.vision_model.embeddings.position_ids
    assert position_ids.tolist()[0] == list(range(577))
    assert tiny_model.load_seconds >= 0


@pytest.mark.parametrize(("fmt", "shards"), [("safetensors", 2), ("bin", 1), ("safetensors", 1), ("bin", 3)])
def test_all_formats_give_identical_logits(tmp_path, reference_logits, fmt, shards):
    folder = make_tiny_checkpoint(tmp_path / "c", seed=0, format=fmt, shards=shards)
    assert torch.equal(_logits(_load(folder)), reference_logits)


def test_safetensors_preferred_over_bin(tmp_path, reference_logits):
    folder = make_tiny_checkpoint(tmp_path / "c", seed=5, format="bin", shards=2)
    make_tiny_checkpoint(tmp_path / "s", seed=0, format="safetensors", shards=2)
    for f in (tmp_path / "s").glob("model*"):
        shutil.copy(f, folder / f.name)
    assert torch.equal(_logits(_load(folder)), reference_logits)  # the seed-0 safetensors were read


def _single_safetensors(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "c", format="safetensors", shards=1)
    return folder, load_file(str(folder / "model.safetensors"))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    folder, state = _single_safetensors(tmp_path)
    del state["model.layers.1.feed_forward.w2.Plora_A.weight"]
    state["model.layers.0.attention.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        _load(folder)
    message = str(err.value)
    assert "1 missing key(s): model.layers.1.feed_forward.w2.Plora_A.weight" in message
    assert "1 unexpected key(s): model.layers.0.attention.extra_proj.weight" in message


def test_missing_and_unexpected_keys_are_listed_for_bin(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "c", format="bin", shards=1)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del state["vision_proj.0.weight"]
    state["plora_extra_GN"] = torch.zeros(1, 1, 4)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        _load(folder)
    message = str(err.value)
    assert "1 missing key(s): vision_proj.0.weight" in message
    assert "1 unexpected key(s): plora_extra_GN" in message


def test_unexpected_key_in_the_index_is_listed(tmp_path, tiny_checkpoint):
    folder = tmp_path / "c"
    shutil.copytree(tiny_checkpoint, folder)
    index_file = folder / "pytorch_model.bin.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.0.attention.extra_proj.weight"] = next(iter(index["weight_map"].values()))
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): model\.layers\.0\.attention\.extra_proj"):
        _load(folder)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_key_in_a_shard_but_not_in_the_index_is_refused(tmp_path, fmt):
    folder = make_tiny_checkpoint(tmp_path / "c", format=fmt, shards=2)
    index = json.loads(next(folder.glob("*.index.json")).read_text())
    shard = folder / sorted(set(index["weight_map"].values()))[-1]
    if fmt == "bin":
        state = torch.load(shard, weights_only=True)
        state["bogus.weight"] = torch.zeros(3)
        torch.save(state, shard)
    else:
        state = load_file(str(shard))
        state["bogus.weight"] = torch.zeros(3)
        save_file(state, str(shard))
    with pytest.raises(CheckpointError, match=r"'bogus\.weight', which the index does not list"):
        _load(folder)


def test_key_check_uses_the_index_before_reading_shards(tmp_path, tiny_checkpoint):
    folder = tmp_path / "c"
    shutil.copytree(tiny_checkpoint, folder)
    index_file = folder / "pytorch_model.bin.index.json"
    index = json.loads(index_file.read_text())
    removed = [k for k in index["weight_map"] if k.startswith("vit.")]
    for k in removed:
        del index["weight_map"][k]
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing key\(s\).*\.\.\. and \d+ more"):
        _load(folder)


def test_wrong_shape_names_key_and_shapes(tmp_path):
    folder, state = _single_safetensors(tmp_path)
    state["model.layers.0.attention.wqkv.weight"] = torch.zeros(100, 64)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"attention\.wqkv\.weight has shape \[100, 64\].*\[128, 64\]"):
        _load(folder)


def test_known_buffers_and_post_layernorm_are_ignored(tmp_path, reference_logits):
    folder, state = _single_safetensors(tmp_path)
    state["model.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(8)
    state["vit.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(577)[None]
    state["vit.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(32)
    state["vit.vision_tower.vision_model.post_layernorm.bias"] = torch.zeros(32)
    save_file(state, str(folder / "model.safetensors"))
    assert torch.equal(_logits(_load(folder)), reference_logits)


def test_missing_shard_and_no_weights(tmp_path, tiny_checkpoint):
    folder = tmp_path / "c"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        _load(folder)
    for f in folder.glob("pytorch_model*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="holds no weights"):
        _load(folder)


def test_corrupt_shard(tmp_path, tiny_checkpoint):
    folder = tmp_path / "c"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "pytorch_model-00001-of-00002.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        _load(folder)


def test_hub_id_offline_says_how_to_download(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as err:
        _load("internlm/internlm-xcomposer2-4khd-7b-not-cached")
    message = str(err.value)
    assert "download internlm/internlm-xcomposer2-4khd-7b-not-cached --local-dir DIR" in message
    # Python reads the Python remedies; the command line renders its own (issue 23.5).
    assert "HD4K.from_pretrained(DIR)" in message and "make_tiny_checkpoint" in message
    cli = err.value.render("cli")
    assert "--model DIR" in cli and "hd4k make-tiny-checkpoint" in cli and "from_pretrained" not in cli
    assert isinstance(err.value, FileNotFoundError)


def test_missing_local_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        _load(tmp_path / "nope")


def test_cancel_between_shards(tiny_checkpoint):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        _load(tiny_checkpoint, cancel=cancel)


def test_bf16_load_casts_everything(tiny_checkpoint):
    loaded = load_pretrained(tiny_checkpoint, dtype="bf16", device="cpu", progress=False)
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.model.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE tables stay fp32


def test_dtype_names():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("fp16", cpu) == torch.float16
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype(torch.float32, cpu) == torch.float32
    with pytest.raises(ValueError):
        resolve_dtype("int8", cpu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_and_quantization(tiny_checkpoint):
    with pytest.raises(DeviceError, match="CUDA is not available"):
        load_pretrained(tiny_checkpoint, device="cuda", progress=False)
    with pytest.raises(DeviceError, match="needs a CUDA GPU"):
        load_pretrained(tiny_checkpoint, device="cpu", quantization="8bit", progress=False)
    with pytest.raises(ValueError, match="quantization"):
        load_pretrained(tiny_checkpoint, device="cpu", quantization="3bit", progress=False)
    with pytest.raises(DeviceError):
        load_pretrained(tiny_checkpoint, device="tpu", progress=False)


# ----------------------------------------------------------------------------------------------------
# Memory: shards read once, parameters own their memory (issue 3: peak RSS <= 1.3x the checkpoint)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_parameters_do_not_depend_on_the_files_after_loading(tmp_path, reference_logits, fmt):
    """Parameters are not memory-mapped views: overwriting the weight files in place changes nothing."""
    folder = make_tiny_checkpoint(tmp_path / "c", seed=0, format=fmt, shards=2)
    loaded = _load(folder)
    for f in folder.glob("model*.safetensors" if fmt == "safetensors" else "pytorch_model*.bin"):
        size = f.stat().st_size
        with open(f, "r+b") as handle:
            handle.write(b"\0" * size)
    assert torch.equal(_logits(loaded), reference_logits)


def test_safetensors_reader_matches_the_reference(tmp_path):
    from hd4k_tools.models.xcomposer2_4khd.checkpoint import _iter_safetensors, _shard_keys

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(3, 5, generator=gen).bfloat16(),
        "f16": torch.randn(7, generator=gen).half(),
        "f32": torch.randn(2, 3, 4, generator=gen),
        "i64": torch.arange(-5, 5),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    ours = dict(_iter_safetensors(path))
    reference = load_file(str(path))
    assert set(ours) == set(reference) == set(_shard_keys(path))
    for key, tensor in reference.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
        assert ours[key].untyped_storage().nbytes() == tensor.numel() * tensor.element_size()  # compact


def test_truncated_safetensors_is_a_checkpoint_error(tmp_path):
    folder, _ = _single_safetensors(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"re-download|do not fit"):
        _load(folder)
    weights.write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="header"):
        _load(folder)


def test_views_in_a_checkpoint_are_stored_compactly():
    from hd4k_tools.models.xcomposer2_4khd.checkpoint import _owned

    whole = torch.arange(12.0)
    assert _owned(whole) is whole  # assigned as read: no second copy
    part = whole[2:6]
    compact = _owned(part)
    assert torch.equal(compact, part) and compact.untyped_storage().nbytes() == 16
    transposed = whole.view(3, 4).t()
    assert _owned(transposed).is_contiguous()
