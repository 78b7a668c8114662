"""Partial LoRA arithmetic for the vLLM model (plain torch, no vLLM import; tested on CPU).

Partial LoRA (docs/model.md §3.2): ``y = W x + s * B (A x)`` at image positions, ``y = W x`` elsewhere. Two forms
with identical results:

* :func:`plora_gather` - gathers the image rows (``index_select``), runs the LoRA on them and adds the
  delta back (``index_add_``). Cheapest in eager mode, but the number of rows is data-dependent, which
  CUDA graphs and ``torch.compile`` cannot capture.
* :func:`plora_static` - runs the LoRA over every row and multiplies the delta by the 0/1 mask. Every
  shape is static (the mask lives in a persistent buffer), at the price of the LoRA matmuls over all rows
  (in decode: extra reads of the ``A``/``B`` weights every step).

Tensor parallelism (Megatron style, as vLLM shards the base weights): a column-parallel projection
(``wqkv``, ``w1``, ``w3``) splits its output rows, so ``B`` is split by rows and ``A`` is replicated; a
row-parallel projection (``wo``, ``w2``) splits its input columns, so ``A`` is split by columns and ``B`` is
replicated, and each rank adds ``B (A_r x_r)`` to its partial sum before the all-reduce (``B`` is linear,
so the partial deltas sum to ``B (A x)``). ``wqkv``'s rows are interleaved per KV group
(``[n_kv][q_per_kv + 2][head_dim]``, docs/model.md §3.5), so a contiguous row split gives each rank whole
groups - query heads with their own key and value head - as long as ``n_kv_heads`` is a multiple of the
TP size (:func:`check_tp_size`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def plora_gather(out: Tensor, x: Tensor, a: Tensor, b: Tensor, scaling: float, index: Tensor) -> Tensor:
    """Add ``scaling * B(A x)`` to the rows ``index`` of ``out`` in place and return ``out``.

    ``out [T, out_local]``, ``x [T, in_local]``, ``a [r, in_local]``, ``b [out_local, r]``, ``index [N]``
    (long, the image rows of this step).
    """
    if index.numel() == 0:
        return out
    picked = x.index_select(0, index)  # [N, in]
    delta = (picked @ a.t()) @ b.t()  # [N, out]
    out.index_add_(0, index, delta.to(out.dtype), alpha=scaling)
    return out


def plora_static(out: Tensor, x: Tensor, a: Tensor, b: Tensor, scaling: float, mask: Tensor) -> Tensor:
    """Add ``scaling * mask * B(A x)`` to ``out`` in place (every shape static) and return ``out``.

    ``mask [T]`` float (1.0 at image rows, 0.0 elsewhere) in ``out``'s dtype.
    """
    low = (x @ a.t()) * (mask[:, None] * scaling)  # [T, r]; masking the rank-r product is the cheap place
    out.addmm_(low.to(out.dtype), b.t().to(out.dtype))  # [T, out] += [T, r] @ [r, out]
    return out


def check_tp_size(num_attention_heads: int, num_key_value_heads: int, tp_size: int) -> None:
    """Raise ``ValueError`` unless every rank gets whole KV groups of the interleaved ``wqkv``."""
    if num_key_value_heads % tp_size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} does not divide the model's {num_key_value_heads} key/value heads: "
            "InternLM2's packed wqkv interleaves each key/value head with its "
            f"{num_attention_heads // num_key_value_heads} query heads, so each GPU must hold whole groups. "
            "Use a tensor_parallel_size that divides "
            f"{num_key_value_heads}."
        )


def shard_rows(weight: Tensor, rank: int, world: int) -> Tensor:
    """Rows ``rank``-th of ``world`` equal contiguous blocks (column-parallel output split)."""
    if weight.shape[0] % world:
        raise ValueError(f"{weight.shape[0]} rows do not split into {world} equal shards")
    size = weight.shape[0] // world
    return weight.narrow(0, rank * size, size)


def shard_cols(weight: Tensor, rank: int, world: int) -> Tensor:
    """Columns ``rank``-th of ``world`` equal contiguous blocks (row-parallel input split)."""
    if weight.shape[1] % world:
        raise ValueError(f"{weight.shape[1]} columns do not split into {world} equal shards")
    size = weight.shape[1] // world
    return weight.narrow(1, rank * size, size)


def lora_shards(kind: str, a: Tensor, b: Tensor, rank: int, world: int) -> tuple[Tensor, Tensor]:
    """``(A, B)`` held by ``rank`` for a ``"column"`` or ``"row"`` parallel projection (module docstring)."""
    if kind == "column":
        return a, shard_rows(b, rank, world)
    if kind == "row":
        return shard_cols(a, rank, world), b
    raise ValueError(f"kind must be 'column' or 'row', not {kind!r}")


def image_rows(mask: Tensor) -> Tensor:
    """Indices ``[N]`` of the image rows of a bool/float mask ``[T]``."""
    return torch.nonzero(mask, as_tuple=False).flatten()
