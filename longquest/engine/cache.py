"""The paged KV cache's device tensors, indexed by the page ids that
:class:`~longquest.engine.page_pool.PagePool` hands out.

Layout per layer (see longquest.kernels.ref): ``k``/``v`` pages
``[num_pages, num_kv_heads, page_size, head_dim]`` and Quest's per-page key bounds
``key_min``/``key_max`` ``[num_pages, num_kv_heads, head_dim]``. The pages are in the
model dtype; the bounds too by default (a min or max of bf16 keys is itself a bf16 value,
so nothing is lost), or in ``float8_e4m3fn`` (``CacheShape.bounds_dtype``), rounded
outward so they still bound every key (see :mod:`longquest.kernels.float8`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class CacheCapacityError(ValueError):
    """Raised when a request cannot fit in the KV cache; the message gives the capacity."""


@dataclass(frozen=True, kw_only=True)
class CacheShape:
    """Everything that fixes the cache's size.

    dtype: of the K/V pages (the model dtype).
    bounds_dtype: of ``key_min``/``key_max``: None (same as ``dtype``) or
        ``torch.float8_e4m3fn``.
    """

    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    bounds_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.bounds_dtype not in (None, self.dtype, torch.float8_e4m3fn):
            raise ValueError(
                f"CacheShape.bounds_dtype must be None, the cache dtype ({self.dtype}) or "
                f"torch.float8_e4m3fn, got {self.bounds_dtype}"
            )

    @property
    def key_bounds_dtype(self) -> torch.dtype:
        """The dtype ``key_min``/``key_max`` are stored in."""
        return self.dtype if self.bounds_dtype is None else self.bounds_dtype

    @property
    def bytes_per_page(self) -> int:
        """Bytes one page costs across all layers: K, V and the two key bounds."""
        element = self.dtype.itemsize
        bound_element = self.key_bounds_dtype.itemsize
        vectors = self.num_kv_heads * self.head_dim
        per_layer = (2 * self.page_size * element + 2 * bound_element) * vectors
        return per_layer * self.num_layers


class KVCache:
    """Device tensors of the paged cache for every layer."""

    def __init__(self, shape: CacheShape, *, device: torch.device | str) -> None:
        self.shape = shape
        s = shape
        pages = (s.num_layers, s.num_pages, s.num_kv_heads, s.page_size, s.head_dim)
        bounds = (s.num_layers, s.num_pages, s.num_kv_heads, s.head_dim)
        self.k = torch.zeros(pages, dtype=s.dtype, device=device)
        self.v = torch.zeros(pages, dtype=s.dtype, device=device)
        self.key_min = torch.zeros(bounds, dtype=s.key_bounds_dtype, device=device)
        self.key_max = torch.zeros(bounds, dtype=s.key_bounds_dtype, device=device)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k_cache, v_cache, key_min, key_max)`` views of one layer."""
        return self.k[index], self.v[index], self.key_min[index], self.key_max[index]


def gather_pages(
    *, k_cache: torch.Tensor, v_cache: torch.Tensor, pages: torch.Tensor, num_tokens: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous K and V ``[tokens, num_kv_heads, head_dim]`` of the given pages.

    k_cache, v_cache: one layer's ``[num_pages, num_kv_heads, page_size, head_dim]``.
    pages: ``[n]`` int physical pages in position order.
    num_tokens: keep the first ``num_tokens`` tokens (a partial last page); None keeps all.
    """
    index = pages.long()
    keys = k_cache[index].transpose(1, 2).flatten(0, 1)
    values = v_cache[index].transpose(1, 2).flatten(0, 1)
    if num_tokens is not None:
        keys, values = keys[:num_tokens], values[:num_tokens]
    return keys, values


def key_peak(key: torch.Tensor) -> torch.Tensor:
    """The largest ``|k|`` of ``key`` as a 0-dim fp32 tensor on its device (0 when empty),
    with no host sync: what the fp8-bounds check of a prompt's keys compares to 448."""
    if not key.numel():
        return key.new_zeros((), dtype=torch.float32)
    return key.detach().abs().amax().float()


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // page_size)


def pages_that_fit(
    *,
    free_bytes: int,
    page_size: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    bounds_dtype: torch.dtype | None = None,
) -> int:
    """How many pages fit in ``free_bytes`` of device memory."""
    probe = CacheShape(
        num_layers=num_layers,
        num_pages=1,
        page_size=page_size,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        bounds_dtype=bounds_dtype,
    )
    return max(0, free_bytes // probe.bytes_per_page)
