"""Argument checks shared by the kernel launchers.

Every launcher validates before it launches, so bad input raises a
``ValueError`` naming the argument instead of a Triton compile error, an
illegal memory access or silent garbage.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Quest key bounds: the cache's dtype, or fp8 (see longquest.kernels.float8).
BOUNDS_DTYPES = (*FLOAT_DTYPES, torch.float8_e4m3fn)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    tensor: object,
    *,
    ndim: int,
    dtypes: tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise ValueError unless ``tensor`` is a tensor of rank ``ndim`` (and dtype, device)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device} like the other inputs")
    return tensor


def check_dim(name: str, tensor: torch.Tensor, dim: int, expected: int, meaning: str) -> None:
    """Raise ValueError unless ``tensor.shape[dim] == expected``."""
    if tensor.shape[dim] != expected:
        raise ValueError(
            f"{name}.shape[{dim}] ({meaning}) must be {expected}, got {tensor.shape[dim]} "
            f"(shape {tuple(tensor.shape)})"
        )


def check_group(num_qo_heads: int, num_kv_heads: int) -> int:
    """Return the GQA group size, or raise if query heads don't divide into KV heads."""
    if num_kv_heads < 1 or num_qo_heads % num_kv_heads:
        raise ValueError(
            f"query heads ({num_qo_heads}) must be a multiple of KV heads ({num_kv_heads})"
        )
    return num_qo_heads // num_kv_heads


def check_page_ids(name: str, page_ids: torch.Tensor, num_pages_total: int) -> None:
    """Raise ValueError if any page id lies outside ``[0, num_pages_total)``.

    Costs one device sync; launchers call it only on the entries that are used.
    """
    if page_ids.numel() == 0:
        return
    low, high = int(page_ids.min()), int(page_ids.max())
    if low < 0 or high >= num_pages_total:
        raise ValueError(
            f"{name} points outside the page pool: ids range over [{low}, {high}] "
            f"but the pool has {num_pages_total} pages"
        )


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """``None`` picks Triton on CUDA and PyTorch elsewhere."""
    if impl is None:
        return "triton" if device.type == "cuda" else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"impl must be 'triton', 'torch' or None, got {impl!r}")
    return impl


def check_page_table(page_table, num_pages, num_pages_total: int) -> None:
    """Range-check num_pages and the used page ids with a single device-to-host copy."""
    max_pages = page_table.shape[1]
    valid = torch.arange(max_pages, device=page_table.device)[None, :] < num_pages[:, None]
    used = page_table.long()
    facts = torch.stack(
        [
            num_pages.min().long(),
            num_pages.max().long(),
            torch.where(valid, used, used.new_tensor(torch.iinfo(torch.int64).max)).min(),
            torch.where(valid, used, used.new_tensor(torch.iinfo(torch.int64).min)).max(),
        ]
    ).cpu()
    low, high = int(facts[0]), int(facts[1])
    if low < 0 or high > max_pages:
        raise ValueError(
            f"num_pages must lie in [0, {max_pages}] (page_table's width), got values in "
            f"[{low}, {high}]"
        )
    if high > 0:  # some entry is used
        check_page_ids("page_table", facts[2:], num_pages_total)
