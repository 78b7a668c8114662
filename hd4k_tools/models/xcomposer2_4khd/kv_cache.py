"""Preallocated key/value cache for the InternLM2 decoder (gpt-fast style, static shapes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hd4k_tools.errors import ContextOverflowError

if TYPE_CHECKING:
    from hd4k_tools.models.xcomposer2_4khd.configuration import XComposer2Config


class KVCache:
    """Keys and values of every layer: ``k, v [n_layers, batch, n_kv_heads, max_seq_len, head_dim]``.

    Positions are absolute: :meth:`update` writes the new keys/values at ``input_pos`` and returns the
    valid prefix ``[:, :, :end]`` where ``end = input_pos[-1] + 1``. :attr:`length` is the number of
    positions written so far (prefix length after the latest update).

    Create the cache under the same autograd mode as the forward passes that fill it (e.g. inside the
    ``torch.inference_mode()`` block of the generation loop): tensors made in inference mode cannot be
    updated in place outside it.
    """

    def __init__(
        self,
        config: XComposer2Config,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.length = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def update(
        self, layer: int, input_pos: Tensor, k: Tensor, v: Tensor, end: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Store ``k, v [B, n_kv_heads, T, head_dim]`` at positions ``input_pos [T]`` (ascending) and
        return the cached prefix ``[B, n_kv_heads, end, head_dim]`` for this layer.

        ``end`` (``input_pos[-1] + 1``) may be passed by the caller to avoid a device sync per layer."""
        if end is None:
            end = int(input_pos[-1]) + 1
        if end > self.max_seq_len:
            raise ContextOverflowError(
                f"position {end - 1} is beyond the KV cache ({self.max_seq_len} positions); allocate a "
                "larger cache or shorten the prompt / max_new_tokens."
            )
        self.k[layer].index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, input_pos, v.to(self.v.dtype))
        if layer == self.k.shape[0] - 1:
            self.length = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Reorder (and/or duplicate) batch rows, e.g. to follow the surviving beams: ``index [batch]``."""
        index = index.to(self.device)
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.batch_size = self.k.shape[1]

    def reset(self) -> None:
        """Forget every position (the memory stays allocated)."""
        self.length = 0

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
