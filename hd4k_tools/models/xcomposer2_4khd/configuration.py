"""Configuration of InternLM-XComposer2-4KHD-7B, read from the official ``config.json``.

The official config (remote code ``configuration_internlm_xcomposer2.py``) only describes the
InternLM2 decoder. The vision tower (CLIP ViT-L/14-336) and the Partial-LoRA ranks are hard-coded in
the official modelling code, so here they have defaults that reproduce the released checkpoint and
can be overridden through optional ``vision_config`` / ``lora`` fields (used by tiny test checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hd4k_tools.errors import CheckpointError

CONFIG_FILE = "config.json"

# Partial-LoRA ranks/alphas of the 4KHD checkpoint [inferred] (docs/model.md §3.2): wqkv r=8, alpha=16 (scale
# 2.0); wo/w1/w2/w3 r=256, alpha=256 (scale 1.0). Sources: lmdeploy `_lora_cfg_4khd_7b`, MindIE README
# adapter_config. The official config.json carries no LoRA fields; these are the single place for them.
DEFAULT_WQKV_LORA_R = 8
DEFAULT_WQKV_LORA_ALPHA = 16
DEFAULT_LORA_R = 256
DEFAULT_LORA_ALPHA = 256

# The field names this package reads or writes for LoRA (absent from the official config.json).
LORA_FIELDS = ("wqkv_lora_r", "wqkv_lora_alpha", "lora_r", "lora_alpha")


@dataclass
class VisionConfig:
    """CLIP vision tower. Defaults are ViT-L/14-336 (``openai/clip-vit-large-patch14-336``, docs/model.md §2).

    The fields are ``transformers.CLIPVisionConfig``'s own names: the vision tower passes them on as they are."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768

    @property
    def grid_size(self) -> int:
        """Patches per side of one crop (24 for 336/14)."""
        return self.image_size // self.patch_size

    @property
    def merged_size(self) -> int:
        """Output channels after the 2×2 merge (4·C, docs/model.md §2)."""
        return 4 * self.hidden_size

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> VisionConfig:
        """Build from a dict, ignoring unknown keys; ``None`` gives the ViT-L/14-336 defaults."""
        if not d:
            return cls()
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PLoRAShape:
    """One Partial-LoRA linear: ``in_features -> out_features`` with a rank-``r`` adapter scaled ``alpha / r``."""

    in_features: int
    out_features: int
    r: int
    alpha: float


@dataclass
class XComposer2Config:
    """The InternLM2 decoder + vision tower + Partial-LoRA configuration (docs/model.md §3.3)."""

    vocab_size: int = 92544
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 32768
    max_length: int = 16384
    bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2
    torch_dtype: str | None = "bfloat16"
    wqkv_lora_r: int = DEFAULT_WQKV_LORA_R
    wqkv_lora_alpha: int = DEFAULT_WQKV_LORA_ALPHA
    lora_r: int = DEFAULT_LORA_R
    lora_alpha: int = DEFAULT_LORA_ALPHA
    vision: VisionConfig = field(default_factory=VisionConfig)
    # Every other field of config.json (architectures, auto_map, attn_implementation, ...), kept as is.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"config.json: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; the checkpoint's config is damaged."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}; the checkpoint's config is damaged."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        """Query heads per key/value head (4 for the 7B model)."""
        return self.num_attention_heads // self.num_key_value_heads

    def plora_shapes(self) -> dict[str, PLoRAShape]:
        """The Partial-LoRA linears of one decoder layer with their full (unsharded) sizes and LoRA rank
        and alpha (docs/model.md §3): the fused ``wqkv`` (``[q×q_per_kv, k, v]`` per KV group), ``wo`` and the
        feed-forward ``w1``, ``w3``, ``w2``. Written once for the native decoder and the vLLM model."""
        d, f = self.hidden_size, self.intermediate_size
        q = self.num_attention_heads * self.head_dim
        qkv = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        wide = (self.lora_r, self.lora_alpha)
        return {
            "wqkv": PLoRAShape(d, qkv, self.wqkv_lora_r, self.wqkv_lora_alpha),
            "wo": PLoRAShape(q, d, *wide),
            "w1": PLoRAShape(d, f, *wide),
            "w3": PLoRAShape(d, f, *wide),
            "w2": PLoRAShape(f, d, *wide),
        }

    @property
    def wqkv_lora_scaling(self) -> float:
        return self.wqkv_lora_alpha / self.wqkv_lora_r

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_r

    @property
    def rope_scaling_type(self) -> str | None:
        """``"dynamic"`` (InternLM2 dynamic NTK), ``"linear"`` or ``None``."""
        if not self.rope_scaling:
            return None
        return self.rope_scaling.get("type") or self.rope_scaling.get("rope_type")

    @property
    def rope_scaling_factor(self) -> float:
        if not self.rope_scaling:
            return 1.0
        return float(self.rope_scaling.get("factor", 1.0))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> XComposer2Config:
        """Read an official ``config.json`` dict; unknown fields go to :attr:`extra`."""
        names = {f.name for f in dataclasses.fields(cls)} - {"vision", "extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k != "vision_config"}
        if isinstance(known.get("eos_token_id"), list):
            # Some configs list several eos ids; the first is the sentencepiece eos.
            known["eos_token_id"] = known["eos_token_id"][0]
        if known.get("rope_theta") is not None:
            known["rope_theta"] = float(known["rope_theta"])
        return cls(**known, vision=VisionConfig.from_dict(d.get("vision_config")), extra=extra)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> XComposer2Config:
        """Read ``config.json`` from a checkpoint folder (or the file itself)."""
        p = Path(path)
        file = p / CONFIG_FILE if p.is_dir() else p
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise CheckpointError(
                f"{file} not found: a checkpoint folder needs config.json next to the weights "
                "(download the whole repository, not only the weight files)."
            ) from exc
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{file} is not valid JSON ({exc}); re-download the checkpoint.") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{file} does not hold a JSON object; re-download the checkpoint.")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The official field names plus ``vision_config`` and the LoRA fields (as written by the
        tiny checkpoint writer)."""
        d: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("vision", "extra"):
                continue
            d[f.name] = getattr(self, f.name)
        d["vision_config"] = self.vision.to_dict()
        return d


def context_length(config: dict[str, Any]) -> int:
    """``max_length`` of a checkpoint's ``config.json`` (the model's context; 16384 when unset)."""
    return XComposer2Config.from_dict(config).max_length
