"""InternLM2 decoder with Partial LoRA + CLIP vision tower: InternLM-XComposer2-4KHD-7B in plain PyTorch.

Module and parameter names equal the official checkpoint keys (docs/model.md §3.4), so the published state
dict loads with ``load_state_dict`` and no renaming. Sections cited in comments (§N) are those of
``docs/model.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hd4k_tools.models.xcomposer2_4khd.configuration import PLoRAShape, XComposer2Config
from hd4k_tools.models.xcomposer2_4khd.kv_cache import KVCache
from hd4k_tools.models.xcomposer2_4khd.vision import VisionTower, encode_crops, image_token_count

if TYPE_CHECKING:
    from hd4k_tools.models.xcomposer2_4khd.tiling import ModelInputs

ImageSpan = tuple[int | None, int, int]
"""``(row, start, end)``: positions ``start..end-1`` of batch row ``row`` (``None``: every row) are image
positions."""
ImageSpans = tuple[ImageSpan, ...]
LoRAPositions = Tensor | ImageSpans
"""Where Partial LoRA applies: an ``im_mask [B, T]`` bool tensor or the :data:`ImageSpans` derived from it."""

# Beyond this many spans the per-span LoRA calls cost more than one boolean gather/scatter; real prompts
# have one span per image (the image's tokens are contiguous, docs/model.md §4), so this only guards odd masks.
MAX_LORA_SPANS = 64


def image_spans(im_mask: Tensor, max_spans: int | None = None) -> ImageSpans | None:
    """The runs of ``True`` in ``im_mask [B, T]`` as :data:`ImageSpans`, or ``None`` if there are more
    than ``max_spans`` (default :data:`MAX_LORA_SPANS`) of them (callers then keep the mask).

    Rows with identical runs (batch 1, or beams of one prompt) give ``row=None`` spans that slice every
    row at once; otherwise each span names its row. No ``True`` at all gives ``()``. One host transfer of
    the mask per call (the model's forward calls this once, not once per layer).
    """
    max_spans = MAX_LORA_SPANS if max_spans is None else max_spans
    mask = im_mask.to(device="cpu", dtype=torch.int8)  # [B, T]
    if not mask.any():
        return ()  # every decode step (generated tokens get no LoRA): skip the run search
    # +1 where a run starts, -1 one past where it ends: [B, T+1].
    edges = torch.diff(F.pad(mask, (1, 1)), dim=1)
    per_row: list[list[tuple[int, int]]] = []
    for row in edges:
        starts = (row == 1).nonzero().flatten().tolist()
        ends = (row == -1).nonzero().flatten().tolist()
        if len(starts) > max_spans:
            return None
        per_row.append(list(zip(starts, ends, strict=True)))
    if all(r == per_row[0] for r in per_row):
        return tuple((None, s, e) for s, e in per_row[0])
    spans = tuple((b, s, e) for b, runs in enumerate(per_row) for s, e in runs)
    return spans if len(spans) <= max_spans else None


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """InternLM2 RMSNorm: variance in fp32, result cast back before the weight (docs/model.md §3.3)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class PLoRALinear(nn.Linear):
    """Partial LoRA (docs/model.md §3.2): the base ``nn.Linear`` plus a LoRA delta applied only at image positions.

    ``Plora_A [r, in]`` and ``Plora_B [out, r]`` are children so that the keys read
    ``...wqkv.weight``, ``...wqkv.Plora_A.weight``, ``...wqkv.Plora_B.weight`` as in the checkpoint.
    Dropout (0.05 in training) is the identity at inference and is left out.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, lora_r: int, lora_alpha: float):
        super().__init__(in_features, out_features, bias=bias)
        self.Plora_A = nn.Linear(in_features, lora_r, bias=False)
        self.Plora_B = nn.Linear(lora_r, out_features, bias=False)
        self.lora_scaling = lora_alpha / lora_r
        # Set by quantisation (checkpoint.quantize_decoder): a module computing the base projection.
        self.quantized_base: nn.Module | None = None

    @classmethod
    def of(cls, shape: PLoRAShape, *, bias: bool) -> PLoRALinear:
        """The linear of ``shape`` (sizes, rank and alpha from :meth:`XComposer2Config.plora_shapes`)."""
        return cls(shape.in_features, shape.out_features, bias=bias, lora_r=shape.r, lora_alpha=shape.alpha)

    def base_forward(self, x: Tensor) -> Tensor:
        if self.quantized_base is not None:
            return self.quantized_base(x)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: Tensor, im_mask: LoRAPositions | None = None) -> Tensor:
        """``x [B, T, in]`` → ``[B, T, out]``; the LoRA delta is added where ``im_mask`` says.

        ``im_mask`` is ``None`` (no image position), an ``[B, T]`` bool mask, or :data:`ImageSpans`
        (what the model passes: computed once per forward by :func:`image_spans`). Spans slice the
        contiguous image runs — ``out[:, s:e] += B(A(x[:, s:e])) * scale`` — which is the same
        arithmetic as the mask's ``out[m] += B(A(x[m])) * scale`` (docs/model.md §3.2) per position, without the
        boolean gather/scatter copies of ``x[m]`` and ``out[m]`` in every projection.
        """
        out = self.base_forward(x)
        if im_mask is None:
            return out
        if isinstance(im_mask, Tensor):
            picked = x[im_mask]  # [N_img, in]
            delta = self.Plora_B(self.Plora_A(picked)) * self.lora_scaling  # [N_img, out]
            out[im_mask] += delta.to(out.dtype)
            return out
        lora_b = self.Plora_B.weight.t()  # [r, out]
        for row, start, end in im_mask:
            rows = slice(None) if row is None else slice(row, row + 1)
            low = self.Plora_A(x[rows, start:end])  # [B', n, r]
            target = out[rows, start:end]  # [B', n, out], a view of `out`
            if low.dtype != out.dtype:  # e.g. a quantised base computing in another dtype
                target += (self.Plora_B(low) * self.lora_scaling).to(out.dtype)
                continue
            for b in range(target.shape[0]):
                # One GEMM accumulating into the view, scale as its alpha: no [n, out] delta tensor and
                # no separate scale and add passes over it (those cost more than the LoRA matmuls).
                target[b].addmm_(low[b], lora_b, alpha=self.lora_scaling)  # [n, out] += s * [n, r] @ [r, out]
        return out


def dynamic_ntk_base(theta: float, head_dim: int, seq_len: int, max_position: int, factor: float) -> float:
    """RoPE base of InternLM2's ``InternLM2DynamicNTKScalingRotaryEmbedding`` for ``seq_len`` positions.

    Unchanged up to ``max_position_embeddings``; beyond it
    ``base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))`` (InternLM2
    ``modeling_internlm2.py``, docs/model.md §3.3). 4KHD prompts (≤ 16384) never reach the 32768 threshold.
    """
    if seq_len <= max_position:
        return theta
    return theta * ((factor * seq_len / max_position) - (factor - 1)) ** (head_dim / (head_dim - 2))


def rope_inv_freq(head_dim: int, base: float, device: torch.device | str | None = None) -> Tensor:
    """``1 / base^(2i/d)`` in fp32, ``[head_dim/2]`` (docs/model.md §3.3)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


class RotaryEmbedding(nn.Module):
    """GPT-NeoX RoPE over the full head dim, cos/sin computed in fp32 then cast (docs/model.md §3.3)."""

    def __init__(self, config: XComposer2Config) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.max_position = config.max_position_embeddings
        self.scaling_type = config.rope_scaling_type
        self.scaling_factor = config.rope_scaling_factor
        self.register_buffer("inv_freq", rope_inv_freq(self.head_dim, self.theta), persistent=False)

    def reset_buffers(self, device: torch.device | str) -> None:
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, device)

    def forward(self, positions: Tensor, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``positions [T]`` of a sequence whose keys span ``seq_len`` positions → cos, sin ``[T, head_dim]``."""
        inv_freq = self.inv_freq
        t = positions.float()
        if self.scaling_type == "dynamic" and seq_len > self.max_position:
            base = dynamic_ntk_base(self.theta, self.head_dim, seq_len, self.max_position, self.scaling_factor)
            inv_freq = rope_inv_freq(self.head_dim, base, positions.device)
        elif self.scaling_type == "linear":
            t = t / self.scaling_factor
        freqs = t[:, None] * inv_freq[None, :]  # [T, head_dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [T, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE of ``x [..., d]`` with ``cos/sin`` broadcastable to it (e.g. ``x [B, T, H, d]``, ``cos [T, 1, d]``)."""
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """GQA self-attention with the packed, group-interleaved ``wqkv`` of InternLM2 (docs/model.md §3.3).

    ``wqkv`` output rows are ``[n_kv_heads][q_per_kv + 2][head_dim]``: for KV group ``g`` the slots
    ``0..q_per_kv-1`` hold query heads ``g*q_per_kv + j``, slot ``q_per_kv`` key head ``g`` and the last
    slot value head ``g``. ``wqkv.Plora_B`` rows follow the same layout.
    """

    def __init__(self, config: XComposer2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.q_per_kv = config.num_kv_groups
        self.head_dim = config.head_dim
        shapes = config.plora_shapes()
        self.wqkv = PLoRALinear.of(shapes["wqkv"], bias=config.bias)
        self.wo = PLoRALinear.of(shapes["wo"], bias=config.bias)

    def split_qkv(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``qkv [B, T, n_kv*(q_per_kv+2)*d]`` → views q ``[B, T, n_kv, q_per_kv, d]`` (query head
        ``g*q_per_kv + j`` at ``[:, :, g, j]``), k, v ``[B, T, n_kv, d]``; nothing is copied."""
        b, t, _ = qkv.shape
        grouped = qkv.view(b, t, self.n_kv_heads, self.q_per_kv + 2, self.head_dim)  # [B, T, n_kv, g+2, d]
        q = grouped[:, :, :, : self.q_per_kv]  # [B, T, n_kv, g, d]
        k = grouped[:, :, :, self.q_per_kv]  # [B, T, n_kv, d]
        v = grouped[:, :, :, self.q_per_kv + 1]  # [B, T, n_kv, d]
        return q, k, v

    def forward(
        self,
        x: Tensor,
        im_mask: LoRAPositions | None,
        cos: Tensor,
        sin: Tensor,
        input_pos: Tensor,
        cache: KVCache | None,
        kv_len: int,
        attn_mask: Tensor | None,
    ) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.split_qkv(self.wqkv(x, im_mask))
        # RoPE on the packed views, in token-major layout: its output is a fresh tensor, so gathering the
        # query heads out of the packed rows costs no separate copy.
        q = apply_rotary(q, cos[:, None, None], sin[:, None, None])  # [B, T, n_kv, g, d]
        q = q.reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, d] (a view)
        k = apply_rotary(k, cos[:, None], sin[:, None]).transpose(1, 2)  # [B, n_kv, T, d]
        v = v.transpose(1, 2)  # [B, n_kv, T, d]
        if cache is not None:
            k, v = cache.update(self.layer_idx, input_pos, k, v, kv_len)  # [B, n_kv, S, d]
            k, v = k.to(q.dtype), v.to(q.dtype)
        if t == 1 and attn_mask is None:
            # One new token attends to every cached key: fold each KV group's query heads into the
            # query axis, so no kernel has to repeat K/V (exact GQA, no copy of the cache per step).
            grouped = q.reshape(b, self.n_kv_heads, self.q_per_kv, self.head_dim)  # [B, n_kv, g, d]
            out = F.scaled_dot_product_attention(grouped, k, v)  # [B, n_kv, g, d]
            out = out.reshape(b, self.n_heads, 1, self.head_dim)  # [B, H, 1, d]
        else:
            # Query head h reads KV head h // q_per_kv. Without a mask SDPA does that itself
            # (enable_gqa: CPU and CUDA flash kernels, no K/V copies, same results); a masked call
            # expands K/V first, because masked GQA falls back to the slow math kernel on CUDA, and so
            # does MPS, whose SDPA supports GQA only in recent torch releases.
            gqa = self.q_per_kv > 1 and attn_mask is None and q.device.type != "mps"
            if self.q_per_kv > 1 and not gqa:
                k = k.repeat_interleave(self.q_per_kv, dim=1)  # [B, H, S, d]
                v = v.repeat_interleave(self.q_per_kv, dim=1)  # [B, H, S, d]
            causal = attn_mask is None and t == k.shape[2]
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=gqa
            )  # [B, H, T, d]
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # [B, T, H*d]
        return self.wo(out, im_mask)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``, every projection a :class:`PLoRALinear` (docs/model.md §3.3)."""

    def __init__(self, config: XComposer2Config) -> None:
        super().__init__()
        shapes = config.plora_shapes()
        self.w1 = PLoRALinear.of(shapes["w1"], bias=config.bias)
        self.w3 = PLoRALinear.of(shapes["w3"], bias=config.bias)
        self.w2 = PLoRALinear.of(shapes["w2"], bias=config.bias)

    def forward(self, x: Tensor, im_mask: LoRAPositions | None) -> Tensor:
        return self.w2(F.silu(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


class DecoderLayer(nn.Module):
    def __init__(self, config: XComposer2Config, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(
        self,
        x: Tensor,
        im_mask: LoRAPositions | None,
        cos: Tensor,
        sin: Tensor,
        input_pos: Tensor,
        cache: KVCache | None,
        kv_len: int,
        attn_mask: Tensor | None,
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), im_mask, cos, sin, input_pos, cache, kv_len, attn_mask)
        return h + self.feed_forward(self.ffn_norm(h), im_mask)


class InternLM2Model(nn.Module):
    """Token embeddings, decoder layers and the final norm (keys ``model.*``)."""

    def __init__(self, config: XComposer2Config) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self,
        inputs_embeds: Tensor,
        im_mask: LoRAPositions | None,
        input_pos: Tensor,
        cache: KVCache | None,
    ) -> Tensor:
        """``inputs_embeds [B, T, D]`` → final hidden states ``[B, T, D]`` (after ``norm``); ``im_mask``
        as in :meth:`PLoRALinear.forward` (spans computed once by the caller serve every layer)."""
        t = inputs_embeds.shape[1]
        kv_len = int(input_pos[-1]) + 1 if cache is not None else t
        cos, sin = self.rotary_emb(input_pos, kv_len, inputs_embeds.dtype)  # [T, d]
        attn_mask = None
        if cache is not None and t > 1 and not (t == kv_len and int(input_pos[0]) == 0):
            # Chunked prefill after earlier positions: query i sees keys 0..input_pos[i].
            key_pos = torch.arange(kv_len, device=input_pos.device)
            attn_mask = key_pos[None, :] <= input_pos[:, None]  # [T, S]
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, im_mask, cos, sin, input_pos, cache, kv_len, attn_mask)
        return self.norm(h)


# ----------------------------------------------------------------------------------------------------
# The full model
# ----------------------------------------------------------------------------------------------------
class XComposer2ForCausalLM(nn.Module):
    """InternLM-XComposer2-4KHD: ``model`` (InternLM2 + PLoRA), ``output`` head, ``vit`` (CLIP),
    ``vision_proj`` and the two learned separator embeddings ``plora_glb_GN`` / ``plora_sub_GN``."""

    def __init__(self, config: XComposer2Config) -> None:
        super().__init__()
        self.config = config
        d, d4 = config.hidden_size, config.vision.merged_size
        self.model = InternLM2Model(config)
        self.output = nn.Linear(d, config.vocab_size, bias=False)
        self.vit = VisionTower(config.vision)
        # mlp2x_gelu projector with exact-erf GELU (docs/model.md §3.1).
        self.vision_proj = nn.Sequential(nn.Linear(d4, d), nn.GELU(), nn.Linear(d, d))
        self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, d4))
        self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, d4))

    # -- properties / housekeeping -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.output.weight.dtype

    def num_parameters(self, *, part: str = "all") -> int:
        """Parameter count of ``"all"``, ``"decoder"`` (model + output, LoRA included), ``"lora"``,
        ``"vision"`` (vit + vision_proj + GN)."""
        total = 0
        for name, p in self.named_parameters():
            is_vision = name.startswith(("vit.", "vision_proj.", "plora_"))
            is_lora = ".Plora_" in name
            if (
                part == "all"
                or (part == "vision" and is_vision)
                or (part == "decoder" and not is_vision)
                or (part == "lora" and is_lora)
            ):
                total += p.numel()
        if part not in ("all", "vision", "decoder", "lora"):
            raise ValueError(f"part must be 'all', 'decoder', 'lora' or 'vision', not {part!r}")
        return total

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create the non-persistent buffers (RoPE ``inv_freq``, CLIP ``position_ids``) on ``device``
        — needed after building on the meta device and loading with ``assign=True``."""
        device = device if device is not None else self.device
        self.model.rotary_emb.reset_buffers(device)
        self.vit.vision_tower.reset_buffers(device)

    def make_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        """A :class:`KVCache` for this model (its dtype and device)."""
        return KVCache(self.config, batch_size, max_seq_len, self.dtype, self.device)

    # -- inputs --------------------------------------------------------------------------------------
    def embed_tokens(self, ids: Tensor | Sequence[int]) -> Tensor:
        """Token embeddings: ``ids [T]`` → ``[T, D]`` (or ``[B, T]`` → ``[B, T, D]``)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.model.tok_embeddings(ids)

    def encode_image(self, inputs: ModelInputs, *, crop_batch_size: int | None = None) -> Tensor:
        """Image embeddings ``[L, D]`` of one tiled image (``L == inputs.plan.num_tokens``, docs/model.md §2).

        The crops ``[global, tile_0, ..., tile_{n-1}]`` run through CLIP in the tower's dtype (in chunks
        of ``crop_batch_size`` to bound activation memory; results are identical), then the 2×2 merge,
        the token layout with the separators and ``vision_proj``.
        """
        rows, cols = int(inputs.plan.rows), int(inputs.plan.cols)
        tiles = inputs.tiles  # [rows*cols, 3, 336, 336]
        if tiles.shape[0] != rows * cols:
            raise ValueError(f"{tiles.shape[0]} tiles for a {rows}x{cols} plan; rebuild the inputs")
        crops = torch.cat([inputs.global_view.to(tiles.dtype), tiles], dim=0)  # [1+n, 3, 336, 336]
        embeds = encode_crops(
            self.vit,
            self.vision_proj,
            self.plora_glb_GN,
            self.plora_sub_GN,
            crops,
            rows,
            cols,
            dtype=self.dtype,
            crop_batch_size=crop_batch_size,
        )  # [L, D]
        expected = getattr(inputs.plan, "num_tokens", image_token_count(rows, cols))
        if embeds.shape[0] != expected:
            raise ValueError(f"image gave {embeds.shape[0]} tokens, plan says {expected}")
        return embeds

    def encode_images(self, inputs: Sequence[ModelInputs], *, crop_batch_size: int | None = None) -> list[Tensor]:
        """:meth:`encode_image` for several images (one ``[L_i, D]`` each)."""
        return [self.encode_image(x, crop_batch_size=crop_batch_size) for x in inputs]

    # -- decoder -------------------------------------------------------------------------------------
    def forward(
        self,
        inputs_embeds: Tensor,
        im_mask: Tensor | None = None,
        input_pos: Tensor | None = None,
        cache: KVCache | None = None,
        *,
        logits_to_keep: int | None = None,
    ) -> Tensor:
        """Logits ``[B, T', vocab]`` float32 for ``inputs_embeds [B, T, D]``.

        ``im_mask [B, T]`` bool marks image positions (Partial LoRA, docs/model.md §3.2); ``None`` = text only.
        ``input_pos [T]`` are the absolute positions (default: right after ``cache.length``, else
        ``0..T-1``). With ``cache`` the keys/values are written to it and attention spans every cached
        position up to ``input_pos[-1]``; without it the attention is plain causal over the ``T``
        positions. ``logits_to_keep=k`` returns only the last ``k`` positions (``T' = k``; use 1 for a
        prefill — full logits of a long prompt are large).
        """
        b, t, _ = inputs_embeds.shape
        if input_pos is None:
            start = cache.length if cache is not None else 0
            input_pos = torch.arange(start, start + t, device=self.device)
        input_pos = input_pos.to(self.device)
        if input_pos.shape != (t,):
            raise ValueError(f"input_pos must be [{t}], got {tuple(input_pos.shape)}")
        if im_mask is not None:
            if im_mask.shape != (b, t):
                raise ValueError(f"im_mask must be [{b}, {t}], got {tuple(im_mask.shape)}")
            im_mask = im_mask.to(device=self.device, dtype=torch.bool)
        lora_at: LoRAPositions | None = None
        if im_mask is not None:
            # Once per forward: the image runs as slices for every PLoRA projection of every layer.
            spans = image_spans(im_mask)
            lora_at = im_mask if spans is None else (spans or None)  # () = no image position: no LoRA
        hidden = self.model(inputs_embeds.to(self.dtype), lora_at, input_pos, cache)  # [B, T, D]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]  # [B, k, D]
        return self.output(hidden).float()  # [B, T', V]
