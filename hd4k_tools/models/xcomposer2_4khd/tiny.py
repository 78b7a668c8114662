"""Tiny random checkpoints in the exact on-disk layout of ``internlm/internlm-xcomposer2-4khd-7b``.

:func:`make_tiny_checkpoint` writes, in well under a second of compute, a folder that the real loader
(:func:`hd4k_tools.models.xcomposer2_4khd.load_pretrained`) reads exactly like the published one:
``config.json`` with the official field names (plus ``vision_config`` and LoRA fields for the tiny
sizes), ``generation_config.json``, ``tokenizer_config.json``, ``special_tokens_map.json``, a
sentencepiece ``tokenizer.model`` trained in-process (byte fallback; ``<unk>``=0, ``<s>``=1,
``</s>``=2, ``[UNUSED_TOKEN_145]``/``[UNUSED_TOKEN_146]`` user-defined like InternLM2), and the
weights as ``.bin`` or ``.safetensors`` (sharded with an index, or a single file) under the official
key names (docs/model.md §3.4). The weights are random but scaled so that greedy decoding produces varied
tokens, and the LoRA ``B`` matrices are non-zero so that Partial LoRA has a visible effect.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path
from typing import Any, Literal

import sentencepiece as spm
import torch

from hd4k_tools.models.xcomposer2_4khd.configuration import XComposer2Config
from hd4k_tools.models.xcomposer2_4khd.modeling import XComposer2ForCausalLM
from hd4k_tools.models.xcomposer2_4khd.special_tokens import IM_END, IM_START

TINY_VOCAB_SIZE = 800
# Remote-code module names of the official repository (auto_map of its config/tokenizer files).
_AUTO_MAP = {
    "AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
    "AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
}
_TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_internlm_xcomposer2.InternLMXComposer2Tokenizer", None]}

_WORDS_TEXT = (
    "the a an of to in on at by for with from and or but not is are was were be been has have had "
    "this that these those it its they their there here what which who how why when where can could "
    "will would should may might must do does did image picture photo chart graph table document page "
    "figure title caption legend axis value values total sum average percent number numbers year years "
    "month revenue sales growth price cost profit rate row rows column columns cell cells header text "
    "line lines word words letter invoice receipt date name address city country street person people "
    "cat dog car tree house sky water mountain road building red green blue black white yellow large "
    "small high low left right top bottom middle first second third last next previous shows contains "
    "describes compares increases decreases answer question describe explain read list count find user "
    "assistant system you your I we our helpful honest harmless model language assistant detail details"
)
_PUNCT = (".", ".", ".", "?", "!", ",", ";", ":")


def tiny_corpus(num_sentences: int = 400) -> list[str]:
    """A deterministic English-like corpus with digits, punctuation, newlines and markdown bits."""
    rng = random.Random(1234)
    vocabulary = _WORDS_TEXT.split()
    lines: list[str] = []
    for i in range(num_sentences):
        words = [rng.choice(vocabulary) for _ in range(rng.randint(4, 16))]
        sentence = " ".join(words).capitalize() + rng.choice(_PUNCT)
        kind = i % 5
        if kind == 1:
            sentence += f" {rng.randint(0, 99999)} ({rng.randint(0, 100)}%)"
        elif kind == 2:
            sentence = f"| {words[0]} | {rng.randint(0, 999)} | {rng.uniform(0, 100):.2f} |"
        elif kind == 3:
            sentence = f"{i}. {sentence} ${rng.randint(1, 500)}.{rng.randint(0, 99):02d}"
        lines.append(sentence)
    return lines


def train_tiny_sentencepiece(vocab_size: int = TINY_VOCAB_SIZE) -> bytes:
    """Serialized sentencepiece BPE model shaped like InternLM2's (ids and special pieces).

    ``add_dummy_prefix`` off and whitespace preserved [inferred to mirror InternLM2: its chat template
    puts text right after ``[UNUSED_TOKEN_146]`` and keeps code/markdown whitespace]. Deterministic
    (one thread, fixed corpus).
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=[IM_END, IM_START],
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def tiny_config_dict(vocab_size: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config.json`` of the tiny checkpoint: official field names and values except the sizes."""
    config: dict[str, Any] = {
        "architectures": ["InternLMXComposer2ForCausalLM"],
        "auto_map": dict(_AUTO_MAP),
        "attn_implementation": "flash_attention_2",
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_length": 16384,
        "max_position_embeddings": 32768,
        "model_type": "internlmxcomposer2",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"type": "dynamic", "factor": 1.0},
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.33.2",
        "use_cache": True,
        "vocab_size": vocab_size,
        # Absent from the official config (defaults: ViT-L/14-336, wqkv r=8/α=16, others r=256/α=256).
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 336,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-05,
            "projection_dim": 32,
        },
        "wqkv_lora_r": 4,
        "wqkv_lora_alpha": 8,
        "lora_r": 8,
        "lora_alpha": 8,
    }
    for key, value in (overrides or {}).items():
        if key == "vision_config" and isinstance(value, dict):
            config["vision_config"] = {**config["vision_config"], **value}
        else:
            config[key] = value
    return config


def random_model(config: XComposer2Config, seed: int = 0) -> XComposer2ForCausalLM:
    """A float32 CPU model with deterministic random weights of a useful scale.

    Matrices ~ N(0, 1/fan_in) (activations keep their scale, logits vary between tokens; the packed
    ``wqkv`` 2x wider so answers depend on the image), norm weights
    ~ 1 + N(0, 0.1²), biases and other vectors ~ N(0, 0.1²), separators ~ N(0, 1). LoRA ``B`` is
    random (not the zero of training) so that Partial LoRA changes the image positions.
    """
    with torch.device("meta"):
        model = XComposer2ForCausalLM(config)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "GN" not in name:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
                if name.endswith("attention.wqkv.weight"):
                    # Sharper attention: with unit-scale q/k, attention over thousands of image tokens is
                    # near-uniform, averages them away, and every prompt gets the same answer.
                    p.mul_(2.0)
            elif "GN" in name:
                p.normal_(0.0, 1.0, generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.1, generator=gen)
    model.reset_buffers("cpu")
    return model.eval()


def _split_shards(state: dict[str, torch.Tensor], shards: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of keys with roughly equal bytes (like transformers' ``shard_checkpoint``)."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    target = total / shards
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > target and len(groups) < shards:
            groups.append({})
            size = 0
        groups[-1][key] = tensor
        size += nbytes
    if len(groups) != shards:
        raise ValueError(f"cannot split {len(state)} tensors into {shards} shards")
    return groups


def write_weights(
    state: dict[str, torch.Tensor], folder: Path, *, format: Literal["bin", "safetensors"], shards: int
) -> list[str]:
    """Write ``state`` in the official file naming; returns the file names written."""
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if format == "bin":
        stem, ext, index_name = "pytorch_model", "bin", "pytorch_model.bin.index.json"
    elif format == "safetensors":
        stem, ext, index_name = "model", "safetensors", "model.safetensors.index.json"
    else:
        raise ValueError(f"format must be 'bin' or 'safetensors', not {format!r}")

    def save(tensors: dict[str, torch.Tensor], file: Path) -> None:
        if format == "bin":
            torch.save(tensors, file)
        else:
            from safetensors.torch import save_file

            save_file(tensors, str(file), metadata={"format": "pt"})

    if shards == 1:
        name = f"{stem}.{ext}"
        save(state, folder / name)
        return [name]
    names: list[str] = []
    weight_map: dict[str, str] = {}
    for i, group in enumerate(_split_shards(state, shards), start=1):
        name = f"{stem}-{i:05d}-of-{shards:05d}.{ext}"
        save(group, folder / name)
        names.append(name)
        weight_map.update(dict.fromkeys(group, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*names, index_name]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


#: The smallest head size vLLM's CPU attention accepts (32..512): ``make-tiny-checkpoint --for-vllm``.
VLLM_HEAD_DIM = 32


def _with_head_dim(head_dim: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` completed so that the decoder's head size is ``head_dim`` (see make_tiny_checkpoint)."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number (RoPE rotates pairs), got {head_dim}")
    base = tiny_config_dict(0)
    if "hidden_size" in overrides:
        hidden = int(overrides["hidden_size"])
        if hidden % head_dim:
            raise ValueError(f"hidden_size {hidden} is not a multiple of head_dim {head_dim}")
        heads = hidden // head_dim
        kv = int(overrides.get("num_key_value_heads", min(base["num_key_value_heads"], heads)))
        if heads % kv:
            raise ValueError(f"{heads} attention heads (hidden_size / head_dim) are not a multiple of {kv} KV heads")
        return {"num_attention_heads": heads, "num_key_value_heads": kv, **overrides}
    heads = int(overrides.get("num_attention_heads", base["num_attention_heads"]))
    width = {"hidden_size": heads * head_dim, "intermediate_size": 2 * heads * head_dim}
    return {**width, **overrides}


def _write_side_files(folder: Path, config_dict: dict[str, Any]) -> None:
    """Write ``generation_config.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    _write_json(
        folder / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": config_dict["bos_token_id"],
            "eos_token_id": config_dict["eos_token_id"],
            "pad_token_id": config_dict["pad_token_id"],
            "max_length": 4480,
            "transformers_version": "4.33.2",
        },
    )
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    _write_json(
        folder / "tokenizer_config.json",
        {
            "auto_map": _TOKENIZER_AUTO_MAP,
            **specials,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "decode_with_prefix_space": False,
            "model_max_length": 1000000000000000019884624838656,
            "tokenizer_class": "InternLMXComposer2Tokenizer",
        },
    )
    _write_json(folder / "special_tokens_map.json", specials)


def make_tiny_checkpoint(
    path: str | Path,
    *,
    seed: int = 0,
    format: Literal["bin", "safetensors"] = "bin",
    shards: int = 2,
    config_overrides: dict[str, Any] | None = None,
    head_dim: int | None = None,
) -> Path:
    """Write a tiny random InternLM-XComposer2-4KHD checkpoint into ``path`` (created if needed).

    Sizes: decoder hidden 64, 2 layers, 4 heads / 2 KV heads, FFN 128, ~800-piece vocab; CLIP hidden 32,
    2 layers, 336-px crops with 14-px patches (144 merged tokens per crop as in the real model);
    wqkv LoRA r=4/α=8, other LoRA r=8/α=8. ``config_overrides`` replaces ``config.json`` fields
    (``vision_config`` is merged). The same ``seed`` gives identical files' tensors.

    ``head_dim`` (e.g. 32) sets the decoder's head size: with a ``hidden_size`` override the head count
    becomes ``hidden_size / head_dim``; without one the decoder widens to ``num_attention_heads * head_dim``
    with an FFN twice as wide (other overrides still win). vLLM's CPU attention only accepts head sizes
    32..512; the default is 16 (:data:`VLLM_HEAD_DIM` is the smallest vLLM takes).
    """
    if shards < 1:
        raise ValueError("shards must be >= 1")
    if head_dim is not None:
        config_overrides = _with_head_dim(head_dim, config_overrides or {})
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)

    sp_model = train_tiny_sentencepiece()
    (folder / "tokenizer.model").write_bytes(sp_model)
    sp = spm.SentencePieceProcessor(model_proto=sp_model)

    config_dict = tiny_config_dict(sp.get_piece_size(), config_overrides)
    _write_json(folder / "config.json", config_dict)
    _write_side_files(folder, config_dict)

    model = random_model(XComposer2Config.from_dict(config_dict), seed)
    # Random weights tend to lock onto one token; were it a control or byte piece the decoded answer would
    # be empty or invisible. Zeroing the output rows of unk/bos/eos, the turn markers and the byte-fallback
    # pieces keeps their logit at 0 while hundreds of word pieces compete, so the tiny model answers in
    # visible text and stops at max_new_tokens (tests that need a stop token force one).
    control_ids = [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)]
    control_ids += [sp.piece_to_id(t) for t in (IM_END, IM_START)]
    # A config_overrides vocab larger than the tokenizer (benchmarks) gets rows no piece decodes.
    control_ids += list(range(sp.get_piece_size(), model.config.vocab_size))
    with torch.no_grad():
        model.output.weight[control_ids] = 0.0
    write_weights(model.state_dict(), folder, format=format, shards=shards)
    return folder
