"""Preallocated key/value cache for the InternLM2 decoder (gpt-fast style, static shapes), and
:class:`KVPrefix`, a detached copy of the first positions of a cache (the prefix KV cache's value)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hd4k_tools.errors import ContextOverflowError

if TYPE_CHECKING:
    from hd4k_tools.models.xcomposer2_4khd.configuration import XComposer2Config


class _KVTensors:
    """``dtype`` and ``device`` of a holder of ``k, v`` tensors (of one dtype, on one device)."""

    k: Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device


@dataclass(frozen=True)
class KVPrefix(_KVTensors):
    """Keys and values of the first ``P`` positions of one sequence: ``k, v [n_layers, 1, n_kv_heads, P,
    head_dim]`` (contiguous, owned: not views of a live cache). Read-only by convention — it is copied
    into a fresh :class:`KVCache` with :meth:`KVCache.load_prefix`, never written to."""

    k: Tensor
    v: Tensor

    def __post_init__(self) -> None:
        if self.k.dim() != 5 or self.k.shape != self.v.shape or self.k.shape[1] != 1:
            raise ValueError(
                f"KVPrefix needs k, v of one shape [n_layers, 1, n_kv_heads, P, head_dim], got "
                f"{tuple(self.k.shape)} and {tuple(self.v.shape)}"
            )

    @property
    def length(self) -> int:
        """``P``, the number of positions held."""
        return int(self.k.shape[3])

    def nbytes(self) -> int:
        """Bytes of both tensors."""
        return 2 * self.k.numel() * self.k.element_size()


class KVCache(_KVTensors):
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
        # One layer's worth of rows, reused by every in-place reorder (allocated on first use).
        self._scratch: Tensor | None = None

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
        """Reorder (and/or duplicate) batch rows, e.g. to follow the surviving beams: ``index [batch]``;
        afterwards row ``i`` holds what row ``index[i]`` held.

        With ``len(index) == batch_size`` (beam search) this works in place and touches only what must
        move: the rows with ``index[i] != i``, over the valid positions ``[:length]`` (positions beyond
        it are rewritten before they are read). Per layer the source rows are gathered into a scratch
        buffer of at most one layer, then written back, so the extra memory is ``1 / n_layers`` of the
        cache instead of a full copy per step (3.9 GB at 7B / 10k positions / 3 beams in bf16). Another
        length of ``index`` changes the batch size and allocates a new cache.
        """
        index = index.to(device=self.device, dtype=torch.long)
        if index.dim() != 1:
            raise ValueError(f"index must be [batch], got {tuple(index.shape)}")
        if index.shape[0] != self.batch_size:
            self.k = self.k.index_select(1, index)
            self.v = self.v.index_select(1, index)
            self.batch_size = self.k.shape[1]
            self._scratch = None
            return
        # One host sync for the whole reorder (the beam loop has the sources on the host anyway).
        sources = index.tolist()
        if any(not 0 <= s < self.batch_size for s in sources):
            raise IndexError(f"reorder index {sources} out of range for batch size {self.batch_size}")
        moved = [i for i, s in enumerate(sources) if s != i]
        end = self.length
        if not moved or end == 0:
            return
        dst = torch.tensor(moved, dtype=torch.long, device=self.device)  # [m]
        src = index.index_select(0, dst)  # [m]
        _, _, n_kv, _, head_dim = self.k.shape
        m = len(moved)
        numel = m * n_kv * end * head_dim
        if self._scratch is None or self._scratch.numel() < numel:
            # Sized for the worst case (every row moves, the whole cache valid) so it is allocated once.
            self._scratch = torch.empty(
                self.batch_size * n_kv * self.max_seq_len * head_dim, dtype=self.dtype, device=self.device
            )
        scratch = self._scratch[:numel].view(m, n_kv, end, head_dim)  # [m, n_kv, end, d]
        for buf in (self.k, self.v):
            for layer in range(buf.shape[0]):
                valid = buf[layer, :, :, :end]  # [B, n_kv, end, d] (a view)
                # Gather every moved row before writing any: a row may be read and overwritten.
                torch.index_select(valid, 0, src, out=scratch)
                valid.index_copy_(0, dst, scratch)

    def row_view(self, rows: int = 1) -> KVCache:
        """A cache over the first ``rows`` batch rows that shares this cache's memory (no copy).

        The generation loop prefills a single sequence through ``row_view(1)`` of a cache allocated
        for all beams, then :meth:`broadcast_row` copies it to the other rows — instead of growing a
        batch-1 cache, which would hold both at once. The view has its own :attr:`length`; set the
        parent's from it after writing through the view.
        """
        if not 1 <= rows <= self.batch_size:
            raise ValueError(f"rows must be in 1..{self.batch_size}, got {rows}")
        view = object.__new__(KVCache)
        view.k = self.k[:, :rows]  # [L, rows, n_kv, S, d]
        view.v = self.v[:, :rows]
        view.max_seq_len = self.max_seq_len
        view.batch_size = rows
        view.length = self.length
        view._scratch = None
        return view

    def broadcast_row(self, row: int = 0) -> None:
        """Copy batch row ``row`` over every other row, positions ``[:length]`` (in place)."""
        end = self.length
        if self.batch_size == 1 or end == 0:
            return
        for buf in (self.k, self.v):
            src = buf[:, row : row + 1, :, :end]  # [L, 1, n_kv, end, d]
            for other in range(self.batch_size):
                if other != row:
                    buf[:, other : other + 1, :, :end].copy_(src)

    def snapshot(self, length: int, row: int = 0) -> KVPrefix:
        """A detached copy of positions ``[:length]`` of batch row ``row`` (for the prefix KV cache)."""
        if not 0 < length <= self.length:
            raise ValueError(f"snapshot length must be in 1..{self.length} (the positions written), got {length}")
        k = self.k[:, row : row + 1, :, :length].clone(memory_format=torch.contiguous_format)  # [L, 1, n_kv, P, d]
        v = self.v[:, row : row + 1, :, :length].clone(memory_format=torch.contiguous_format)
        return KVPrefix(k, v)

    def load_prefix(self, prefix: KVPrefix) -> None:
        """Write ``prefix`` at positions ``[:P]`` of every batch row and set :attr:`length` to ``P``.

        Valid because attention is causal: the keys/values of positions ``< P`` depend only on the
        inputs at positions ``< P``, never on what follows (docs/model.md §3.3)."""
        n_layers, _, n_kv, _, head_dim = self.k.shape
        p = prefix.length
        if prefix.k.shape != (n_layers, 1, n_kv, p, head_dim):
            raise ValueError(
                f"prefix K/V {tuple(prefix.k.shape)} do not fit this cache ({n_layers} layers, {n_kv} KV heads, "
                f"head_dim {head_dim})"
            )
        if p > self.max_seq_len:
            raise ContextOverflowError(f"a {p}-position prefix does not fit a {self.max_seq_len}-position KV cache")
        self.k[:, :, :, :p].copy_(prefix.k.expand(-1, self.batch_size, -1, -1, -1))
        self.v[:, :, :, :p].copy_(prefix.v.expand(-1, self.batch_size, -1, -1, -1))
        self.length = p

    def reset(self) -> None:
        """Forget every position (the memory stays allocated)."""
        self.length = 0

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
