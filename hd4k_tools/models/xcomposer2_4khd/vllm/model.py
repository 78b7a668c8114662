"""IXC2-4KHD on vLLM's layers: the shared CLIP vision path and an InternLM2 decoder with Partial LoRA
(imports vLLM).

Parameter names are the official checkpoint keys (``model.layers.N.attention.wqkv.Plora_A.weight``,
``vit.vision_tower.vision_model.*``, ``plora_glb_GN`` ...), so the weights load without renaming.

**Partial LoRA hand-off.** vLLM's model runner calls :meth:`XComposer2VLLMForCausalLM.embed_input_ids`
every step, before ``forward``, with ``is_multimodal``: exactly this step's image positions (a chunk of
an image under chunked prefill; none in decode; none for prefix-cached positions, which are not
recomputed). That mask is copied into a persistent buffer (``model.lora_mask``) which ``forward`` reads,
so the LoRA applies where the native ``im_mask`` does. ``forward``'s input may be padded past the mask
(CUDA graphs): the buffer is zero there. See :mod:`.lora` for the gather / static-shape forms and the
tensor-parallel sharding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.utils import set_weight_attrs
from vllm.multimodal import MULTIMODAL_REGISTRY

from hd4k_tools.models.xcomposer2_4khd.checkpoint import _IGNORED_KEYS
from hd4k_tools.models.xcomposer2_4khd.configuration import PLoRAShape, XComposer2Config
from hd4k_tools.models.xcomposer2_4khd.special_tokens import IMAGE_PLACEHOLDER
from hd4k_tools.models.xcomposer2_4khd.vision import VisionTower, encode_crops
from hd4k_tools.models.xcomposer2_4khd.vllm.lora import (
    check_tp_size,
    image_rows,
    plora_gather,
    plora_static,
    shard_cols,
    shard_rows,
)
from hd4k_tools.models.xcomposer2_4khd.vllm.processor import (
    XComposer2DummyInputsBuilder,
    XComposer2MultiModalProcessor,
    XComposer2ProcessingInfo,
)

# Where Partial LoRA applies in one forward: ("gather", rows [N] long), ("static", mask [T] float) or None.
LoRAAt = tuple[str, Tensor] | None


def resolve_plora_mode(mode: str, vllm_config: VllmConfig) -> str:
    """``"auto"`` -> ``"gather"`` in eager mode, ``"static"`` when CUDA graphs / torch.compile may run."""
    eager = bool(vllm_config.model_config.enforce_eager)
    if mode == "auto":
        return "gather" if eager else "static"
    if mode == "gather" and not eager:
        raise ValueError(
            "plora_mode='gather' has data-dependent shapes that CUDA graphs / torch.compile cannot capture: "
            "use plora_mode='static' (or 'auto'), or start the engine with enforce_eager=True."
        )
    return mode


class LoRAWeight(nn.Module):
    """One LoRA matrix (``A [r, in]`` or ``B [out, r]``), holding this rank's shard (``split``: ``"rows"``,
    ``"cols"`` or ``None`` for replicated); its weight loader cuts the shard from the full checkpoint tensor."""

    def __init__(self, rows: int, cols: int, split: str | None, rank: int, world: int) -> None:
        super().__init__()
        self.split, self.rank, self.world = split, rank, world
        if split == "rows":
            rows //= world
        elif split == "cols":
            cols //= world
        self.weight = nn.Parameter(torch.empty(rows, cols), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": self.load})

    def load(self, param: Tensor, loaded: Tensor) -> None:
        if self.split == "rows":
            loaded = shard_rows(loaded, self.rank, self.world)
        elif self.split == "cols":
            loaded = shard_cols(loaded, self.rank, self.world)
        if param.shape != loaded.shape:
            raise ValueError(f"LoRA weight shard {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
        param.data.copy_(loaded)


def add_lora(out: Tensor, x: Tensor, a: Tensor, b: Tensor, scaling: float, lora_at: LoRAAt) -> Tensor:
    if lora_at is None:
        return out
    kind, where = lora_at
    if kind == "gather":
        return plora_gather(out, x, a, b, scaling, where)
    return plora_static(out, x, a, b, scaling, where)


def _plora_args(shape: PLoRAShape) -> dict[str, Any]:
    """The arguments of a parallel Partial-LoRA linear from the config's shape (full, unsharded sizes)."""
    return {"in_features": shape.in_features, "out_features": shape.out_features, "r": shape.r, "alpha": shape.alpha}


class PLoRAColumnLinear(ColumnParallelLinear):
    """Column-parallel projection + Partial LoRA (``A`` replicated, ``B`` split by output rows)."""

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, r: int, alpha: float, quant_config, prefix: str
    ):
        super().__init__(
            in_features,
            out_features,
            bias=bias,
            gather_output=False,
            quant_config=quant_config,
            prefix=prefix,
            return_bias=False,
        )
        self.Plora_A = LoRAWeight(r, in_features, None, self.tp_rank, self.tp_size)
        self.Plora_B = LoRAWeight(out_features, r, "rows", self.tp_rank, self.tp_size)
        self.lora_scaling = alpha / r

    def forward(self, x: Tensor, lora_at: LoRAAt = None) -> Tensor:  # type: ignore[override]
        out = super().forward(x)  # [T, out / tp]
        return add_lora(out, x, self.Plora_A.weight, self.Plora_B.weight, self.lora_scaling, lora_at)


class PLoRARowLinear(RowParallelLinear):
    """Row-parallel projection + Partial LoRA (``A`` split by input columns, ``B`` replicated); the LoRA
    delta joins the partial sum before the all-reduce."""

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, r: int, alpha: float, quant_config, prefix: str
    ):
        super().__init__(
            in_features,
            out_features,
            bias=bias,
            input_is_parallel=True,
            reduce_results=False,
            quant_config=quant_config,
            prefix=prefix,
            return_bias=False,
        )
        self.Plora_A = LoRAWeight(r, in_features, "cols", self.tp_rank, self.tp_size)
        self.Plora_B = LoRAWeight(out_features, r, None, self.tp_rank, self.tp_size)
        self.lora_scaling = alpha / r

    def forward(self, x: Tensor, lora_at: LoRAAt = None) -> Tensor:  # type: ignore[override]
        out = super().forward(x)  # [T, out], this rank's partial sum
        out = add_lora(out, x, self.Plora_A.weight, self.Plora_B.weight, self.lora_scaling, lora_at)
        return tensor_model_parallel_all_reduce(out) if self.tp_size > 1 else out


class XComposer2Attention(nn.Module):
    """GQA attention over InternLM2's packed, group-interleaved ``wqkv`` (``[n_kv][q_per_kv + 2][d]``)."""

    def __init__(self, config: XComposer2Config, rope_parameters: dict[str, Any], vllm_config: VllmConfig, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        check_tp_size(config.num_attention_heads, config.num_key_value_heads, tp)
        self.head_dim = config.head_dim
        self.n_heads = config.num_attention_heads // tp
        self.n_kv = config.num_key_value_heads // tp
        self.q_per_kv = config.num_kv_groups
        quant = vllm_config.quant_config
        shapes = config.plora_shapes()  # full sizes; the parallel linears shard them
        self.wqkv = PLoRAColumnLinear(
            **_plora_args(shapes["wqkv"]), bias=config.bias, quant_config=quant, prefix=f"{prefix}.wqkv"
        )
        self.wo = PLoRARowLinear(
            **_plora_args(shapes["wo"]), bias=config.bias, quant_config=quant, prefix=f"{prefix}.wo"
        )
        self.rotary_emb = get_rope(
            self.head_dim, max_position=config.max_position_embeddings, rope_parameters=rope_parameters
        )
        self.attn = Attention(
            self.n_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.n_kv,
            cache_config=vllm_config.cache_config,
            quant_config=quant,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: Tensor, x: Tensor, lora_at: LoRAAt) -> Tensor:
        qkv = self.wqkv(x, lora_at)  # [T, n_kv*(g+2)*d] (this rank's whole KV groups)
        t = qkv.shape[0]
        grouped = qkv.view(t, self.n_kv, self.q_per_kv + 2, self.head_dim)  # [T, n_kv, g+2, d]
        q = grouped[:, :, : self.q_per_kv].reshape(t, self.n_heads * self.head_dim)  # head g*q_per_kv+j
        k = grouped[:, :, self.q_per_kv].reshape(t, self.n_kv * self.head_dim)
        v = grouped[:, :, self.q_per_kv + 1].reshape(t, self.n_kv * self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        return self.wo(self.attn(q, k, v), lora_at)  # [T, D]


class XComposer2FeedForward(nn.Module):
    """SwiGLU ``w2(silu(w1 x) * w3 x)``, every projection with Partial LoRA."""

    def __init__(self, config: XComposer2Config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        shapes = config.plora_shapes()
        common = {"bias": config.bias, "quant_config": vllm_config.quant_config}
        self.w1 = PLoRAColumnLinear(**_plora_args(shapes["w1"]), prefix=f"{prefix}.w1", **common)
        self.w3 = PLoRAColumnLinear(**_plora_args(shapes["w3"]), prefix=f"{prefix}.w3", **common)
        self.w2 = PLoRARowLinear(**_plora_args(shapes["w2"]), prefix=f"{prefix}.w2", **common)

    def forward(self, x: Tensor, lora_at: LoRAAt) -> Tensor:
        return self.w2(F.silu(self.w1(x, lora_at)) * self.w3(x, lora_at), lora_at)


class XComposer2DecoderLayer(nn.Module):
    def __init__(self, config: XComposer2Config, rope_parameters: dict[str, Any], vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention = XComposer2Attention(config, rope_parameters, vllm_config, f"{prefix}.attention")
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.feed_forward = XComposer2FeedForward(config, vllm_config, f"{prefix}.feed_forward")

    def forward(self, positions: Tensor, x: Tensor, lora_at: LoRAAt) -> Tensor:
        h = x + self.attention(positions, self.attention_norm(x), lora_at)
        return h + self.feed_forward(self.ffn_norm(h), lora_at)


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "inputs_embeds": 0})
class XComposer2Decoder(nn.Module):
    """InternLM2 with Partial LoRA (keys ``model.*``); reads the image-position mask from ``lora_mask``.
    vLLM compiles it (torch.compile, CUDA graphs) unless ``enforce_eager``; compiled, it runs the
    static-shape Partial LoRA only (``resolve_plora_mode``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", plora_mode: str = "static"):
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        config = hf_config.native()
        rope_parameters = dict(hf_config.rope_parameters)
        self._eager = bool(vllm_config.model_config.enforce_eager)
        self.plora_mode = plora_mode
        self.tok_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            XComposer2DecoderLayer(config, rope_parameters, vllm_config, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        sched = vllm_config.scheduler_config
        capacity = max(int(sched.max_num_batched_tokens), int(getattr(sched, "max_num_seqs", 0) or 0), 1)
        # 1.0 at this step's image positions, 0.0 elsewhere (including padding). Persistent across steps so
        # that captured CUDA graphs read the current step's mask.
        self.register_buffer("lora_mask", torch.zeros(capacity), persistent=False)
        self._image_rows_this_step = False

    def set_lora_mask(self, is_multimodal: Tensor | None, num_tokens: int) -> None:
        """Called by ``embed_input_ids`` before every ``forward``: this step's image positions."""
        if num_tokens > self.lora_mask.numel():
            if not self._eager:  # a compiled graph holds the buffer: a new one would never be read
                raise RuntimeError(f"{num_tokens} tokens in one step, above max_num_batched_tokens")
            self.lora_mask = torch.zeros(num_tokens, dtype=self.lora_mask.dtype, device=self.lora_mask.device)
        self.lora_mask.zero_()
        self._image_rows_this_step = False
        if is_multimodal is not None and is_multimodal.numel():
            n = int(is_multimodal.shape[0])
            self.lora_mask[:n].copy_(is_multimodal.to(self.lora_mask.device, non_blocking=True))
            self._image_rows_this_step = bool(is_multimodal.any()) if self.plora_mode == "gather" else True

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.tok_embeddings(input_ids)

    def lora_positions(self, num_tokens: int, dtype: torch.dtype) -> LoRAAt:
        if self.plora_mode == "off":
            return None
        if self.plora_mode == "gather":
            if not self._image_rows_this_step:
                return None
            return ("gather", image_rows(self.lora_mask[:num_tokens]))
        return ("static", self.lora_mask[:num_tokens].to(dtype))

    def forward(
        self,
        input_ids: Tensor | None,
        positions: Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)  # [T, D]
        lora_at = self.lora_positions(h.shape[0], h.dtype)
        for layer in self.layers:
            h = layer(positions, h, lora_at)
        return self.norm(h)


@MULTIMODAL_REGISTRY.register_processor(
    XComposer2MultiModalProcessor, info=XComposer2ProcessingInfo, dummy_inputs=XComposer2DummyInputsBuilder
)
class XComposer2VLLMForCausalLM(nn.Module, SupportsMultiModal):
    """InternLM-XComposer2-4KHD for vLLM: ``model`` (InternLM2 + Partial LoRA), ``output``, ``vit`` (CLIP),
    ``vision_proj`` and the separators ``plora_glb_GN`` / ``plora_sub_GN`` (official key names)."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER
        raise ValueError(f"IXC2-4KHD reads images only, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        config = hf_config.native()
        self.config = config
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError(
                "IXC2-4KHD's Partial LoRA mask is handed over with the input embeddings on the first pipeline "
                "stage only: pipeline_parallel_size > 1 is not supported; use tensor_parallel_size instead."
            )
        max_len = vllm_config.model_config.max_model_len
        if config.rope_scaling_type == "dynamic" and max_len > config.max_position_embeddings:
            raise ValueError(
                f"max_model_len={max_len} is past max_position_embeddings={config.max_position_embeddings}, where "
                "InternLM2's dynamic NTK RoPE would rescale positions; this plugin implements plain RoPE, exact "
                f"only up to {config.max_position_embeddings}. Use max_model_len <= {config.max_position_embeddings}."
            )
        self.plora_mode = resolve_plora_mode(getattr(hf_config, "plora_mode", "auto"), vllm_config)
        d, d4 = config.hidden_size, config.vision.merged_size
        self.model = XComposer2Decoder(vllm_config=vllm_config, prefix="model", plora_mode=self.plora_mode)
        self.output = ParallelLMHead(config.vocab_size, d, quant_config=vllm_config.quant_config, prefix="output")
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.vit = VisionTower(config.vision)
        # mlp2x_gelu projector with exact-erf GELU (docs/model.md §3.1), as in the native model.
        self.vision_proj = nn.Sequential(nn.Linear(d4, d), nn.GELU(), nn.Linear(d, d))
        self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, d4), requires_grad=False)
        self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, d4), requires_grad=False)
        self.tp_rank = get_tensor_model_parallel_rank()
        self._eager = bool(vllm_config.model_config.enforce_eager)

    def set_plora_mode(self, mode: str) -> str:
        """Switch the Partial LoRA form of a running engine (``"gather"``, ``"static"``, ``"off"``) and
        return the previous one; for tests and benchmarks, e.g.
        ``llm.apply_model(functools.partial(XComposer2VLLMForCausalLM.set_plora_mode, mode="static"))``
        (then ``llm.reset_prefix_cache()``: cached K/V were computed in the previous form)."""
        if mode not in ("gather", "static", "off"):
            raise ValueError(f"plora mode must be 'gather', 'static' or 'off', not {mode!r}")
        if mode == "gather" and not self._eager:
            raise ValueError("plora mode 'gather' needs enforce_eager=True (data-dependent shapes)")
        previous, self.plora_mode, self.model.plora_mode = self.plora_mode, mode, mode
        return previous

    # -- images ----------------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object) -> list[Tensor]:
        """One ``[L_i, D]`` embedding per image, in prompt order (shared ``encode_crops``)."""
        pixel_values = kwargs.get("pixel_values")
        grid = kwargs.get("image_grid")
        if pixel_values is None or grid is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat([p.reshape(-1, *p.shape[-3:]) for p in pixel_values], dim=0)
        grids = grid.tolist() if isinstance(grid, Tensor) else [list(map(int, g)) for g in grid]
        counts = [int(r) * int(c) + 1 for r, c in grids]
        crops = pixel_values.split(counts, dim=0)  # per image [1 + rows*cols, 3, 336, 336]
        dtype = self.output.weight.dtype
        return [
            encode_crops(
                self.vit, self.vision_proj, self.plora_glb_GN, self.plora_sub_GN, c, int(r), int(k), dtype=dtype
            )
            for c, (r, k) in zip(crops, grids, strict=True)
        ]

    def embed_input_ids(
        self,
        input_ids: Tensor,
        multimodal_embeddings: Any = None,
        *,
        is_multimodal: Tensor | None = None,
    ) -> Tensor:
        """Token embeddings with the image embeddings scattered in; hands this step's image positions to
        Partial LoRA (module docstring)."""
        self.model.set_lora_mask(is_multimodal, int(input_ids.shape[0]))
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    # -- decoder ---------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None,
        positions: Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: object,
    ) -> Tensor:
        if not get_pp_group().is_first_rank:  # guarded in __init__; kept explicit
            raise RuntimeError("pipeline parallelism is not supported")
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: Tensor) -> Tensor | None:
        return self.logits_processor(self.output, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Load official keys; the buffers some checkpoints carry and CLIP's unused ``post_layernorm`` are
        skipped (the native loader's list)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if _IGNORED_KEYS.search(name):
                continue
            param = params.get(name)
            if param is None:
                raise ValueError(
                    f"checkpoint key {name!r} is not a parameter of IXC2-4KHD; is this the right checkpoint?"
                )
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor)
            loaded.add(name)
        return loaded
