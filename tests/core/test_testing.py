"""make_tiny_checkpoint writes the official layout, deterministically."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hd4k_tools.models.xcomposer2_4khd import XComposer2Config
from hd4k_tools.models.xcomposer2_4khd.tiny import make_tiny_checkpoint

_COMMON = {
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
}


@pytest.mark.parametrize(
    ("fmt", "shards", "weights"),
    [
        (
            "bin",
            2,
            {
                "pytorch_model-00001-of-00002.bin",
                "pytorch_model-00002-of-00002.bin",
                "pytorch_model.bin.index.json",
            },
        ),
        (
            "safetensors",
            3,
            {
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors",
                "model.safetensors.index.json",
            },
        ),
        ("bin", 1, {"pytorch_model.bin"}),
        ("safetensors", 1, {"model.safetensors"}),
    ],
)
def test_file_set(tmp_path, fmt, shards, weights):
    folder = make_tiny_checkpoint(tmp_path / "ckpt", format=fmt, shards=shards)
    assert {p.name for p in folder.iterdir()} == _COMMON | weights
    index_name = next((w for w in weights if w.endswith(".index.json")), None)
    if index_name:
        index = json.loads((folder / index_name).read_text())
        assert set(index["weight_map"].values()) == weights - {index_name}
        assert index["metadata"]["total_size"] > 0


def _tensors(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    for f in sorted(folder.glob("*.bin")):
        out.update(torch.load(f, weights_only=True))
    return out


def test_same_seed_gives_identical_files(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", seed=3, format="safetensors", shards=2)
    b = make_tiny_checkpoint(tmp_path / "b", seed=3, format="safetensors", shards=2)
    c = make_tiny_checkpoint(tmp_path / "c", seed=4, format="safetensors", shards=2)
    ta, tb, tc = _tensors(a), _tensors(b), _tensors(c)
    assert ta.keys() == tb.keys() == tc.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)
    for name in ("tokenizer.model", "config.json", "model-00001-of-00002.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_keys_follow_the_official_names(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "pytorch_model.bin.index.json").read_text())
    keys = set(index["weight_map"])
    for key in (
        "model.tok_embeddings.weight",
        "model.layers.1.attention.wqkv.weight",
        "model.layers.1.attention.wqkv.Plora_A.weight",
        "model.layers.1.attention.wqkv.Plora_B.weight",
        "model.layers.0.attention.wo.Plora_B.weight",
        "model.layers.0.feed_forward.w2.Plora_A.weight",
        "model.layers.0.attention_norm.weight",
        "model.layers.0.ffn_norm.weight",
        "model.norm.weight",
        "output.weight",
        "vit.vision_tower.vision_model.embeddings.class_embedding",
        "vit.vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias",
        "vit.vision_tower.vision_model.pre_layrnorm.weight",
        "vision_proj.0.weight",
        "vision_proj.2.bias",
        "plora_glb_GN",
        "plora_sub_GN",
    ):
        assert key in keys, key
    assert not any("post_layernorm" in k or "inv_freq" in k or "position_ids" in k for k in keys)
    weights = _tensors(tiny_checkpoint)
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert weights["model.layers.0.attention.wqkv.Plora_B.weight"].abs().sum() > 0  # LoRA has an effect


def test_config_is_official_style(tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["architectures"] == ["InternLMXComposer2ForCausalLM"]
    assert cfg["model_type"] == "internlmxcomposer2"
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_internlm_xcomposer2.")
    for field in ("rope_scaling", "rope_theta", "max_length", "bias", "attn_implementation", "torch_dtype"):
        assert field in cfg
    tok_cfg = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    assert tok_cfg["auto_map"]["AutoTokenizer"][0] == ("tokenization_internlm_xcomposer2.InternLMXComposer2Tokenizer")
    assert tok_cfg["add_bos_token"] is True
    config = XComposer2Config.from_pretrained(tiny_checkpoint)
    assert (config.hidden_size, config.num_key_value_heads, config.num_kv_groups) == (64, 2, 2)
    assert config.wqkv_lora_scaling == 2.0 and config.lora_scaling == 1.0
    assert config.vision.hidden_size == 32 and config.vision.merged_size == 128
    assert config.extra["model_type"] == "internlmxcomposer2"


def test_config_overrides(tmp_path):
    folder = make_tiny_checkpoint(
        tmp_path / "o",
        shards=1,
        config_overrides={"num_hidden_layers": 1, "max_length": 512, "vision_config": {"num_hidden_layers": 1}},
    )
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["max_length"] == 512
    assert cfg["vision_config"]["num_hidden_layers"] == 1 and cfg["vision_config"]["hidden_size"] == 32
    keys = torch.load(folder / "pytorch_model.bin", weights_only=True).keys()
    assert not any(k.startswith("model.layers.1.") for k in keys)


def test_head_dim_option_widens_the_decoder(tmp_path):
    # vLLM's CPU attention accepts head sizes 32..512; the default tiny decoder has 16.
    folder = make_tiny_checkpoint(tmp_path / "h", shards=1, head_dim=32)
    cfg = XComposer2Config.from_pretrained(folder)
    assert (cfg.head_dim, cfg.hidden_size, cfg.intermediate_size) == (32, 128, 256)
    default = XComposer2Config.from_pretrained(make_tiny_checkpoint(tmp_path / "d", shards=1))
    assert default.head_dim == 16
    with pytest.raises(ValueError, match="even"):
        make_tiny_checkpoint(tmp_path / "x", head_dim=31)
