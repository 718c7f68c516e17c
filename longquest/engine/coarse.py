"""Coarse bounds of a decode batch's page groups, for the two-level page selection.

Group ``g`` of a row holds the row's local pages ``g * group_pages .. (g + 1) * group_pages
- 1`` (in a sequence-parallel rank, its own pages: a group never straddles ranks). Its
coarse bounds are the min / max over its pages' bounds
(:func:`longquest.kernels.coarse_bounds`), final once its last page is full: pages before
the newest never change, so neither do the bounds of a full group. Groups not full yet
(the newest page's among them) have no final bounds and are always kept (``pin_from``).
Every step recomputes each row's last full group inside the captured step (one launch,
every layer), so a group is final from the first step after it fills, however many steps
a launch chains: the selection does not depend on ``steps_per_launch``.

All full groups are derived from the pages' own bounds when the batch is built, so pages
taken from the prefix cache (or kept from an earlier batch) bring nothing else: the
coarse level is exact for whatever pages a row holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longquest.engine.cache import KVCache
from longquest.kernels import coarse_bounds, refresh_last_full_group

# Bytes of fp32 temporaries one coarse-bounds chunk may take (all layers at once).
_CHUNK_BYTES = 1 << 28


@dataclass(frozen=True, kw_only=True)
class CoarseMetadata:
    """One decode step's coarse level, for every layer.

    key_min, key_max: ``[num_layers, num_seqs * max_groups, num_kv_heads, head_dim]``, the
        bounds' dtype: row ``s``'s group ``g`` at ``s * max_groups + g``.
    table: ``[num_seqs, max_groups]`` int32, those slots (the coarse pool's page table).
    num_groups: ``[num_seqs]`` int32 ``ceil(num_pages / group_pages)``.
    pin_from: ``[num_seqs]`` int32 — groups at ``g >= pin_from`` have no final bounds and are
        always kept.
    """

    key_min: torch.Tensor
    key_max: torch.Tensor
    table: torch.Tensor
    num_groups: torch.Tensor
    pin_from: torch.Tensor
    group_pages: int


class CoarseBounds:
    """The coarse bounds of one decode batch's rows, kept on the device.

    cache: the pages' bounds they are computed from (every layer).
    rows, width: the batch's rows and page-table columns.
    impl: the per-step refresh's kernels (see ``longquest.kernels``).
    """

    def __init__(
        self, *, cache: KVCache, rows: int, width: int, group_pages: int, device: torch.device,
        impl: str | None = None,
    ) -> None:  # fmt: skip
        self.cache = cache
        self.group_pages = group_pages
        self.impl = impl
        self.max_groups = max(1, -(-width // group_pages))
        layers, _, kv_heads, head_dim = cache.key_min.shape
        shape = (layers, rows * self.max_groups, kv_heads, head_dim)
        self.key_min = torch.zeros(shape, dtype=cache.key_min.dtype, device=device)
        self.key_max = torch.zeros_like(self.key_min)
        slots = torch.arange(rows * self.max_groups, dtype=torch.int32, device=device)
        self.table = slots.view(rows, self.max_groups)
        self._final = [0] * rows  # groups computed so far, per row

    def refresh(self, *, page_table: torch.Tensor, full_pages: list[int]) -> None:
        """Compute the bounds of the groups whose pages all became full since the last call
        (all of them on the first call); eager, outside the captured step.

        page_table: ``[num_seqs, width]`` int32 local physical pages (device).
        full_pages: per row, how many of its first pages are full and written (before the
            step's append).
        """
        group = self.group_pages
        targets = [max(done, full // group) for done, full in zip(self._final, full_pages)]
        pairs = [(row, g) for row, (done, target) in enumerate(zip(self._final, targets))
                 for g in range(done, target)]  # fmt: skip
        if not pairs:
            return
        layers, _, kv_heads, head_dim = self.key_min.shape
        per_group = layers * group * kv_heads * head_dim * 4
        chunk = max(1, _CHUNK_BYTES // per_group)
        device = self.key_min.device
        offsets = torch.arange(group, device=device)
        for start in range(0, len(pairs), chunk):
            rows, groups = torch.tensor(pairs[start : start + chunk], device=device).unbind(1)
            pages = page_table[rows[:, None], groups[:, None] * group + offsets]  # [P, group]
            lo, hi = coarse_bounds(
                key_min=self.cache.key_min, key_max=self.cache.key_max, pages=pages
            )  # [num_layers, P, num_kv_heads, head_dim]
            slots = rows * self.max_groups + groups
            self.key_min[:, slots] = lo
            self.key_max[:, slots] = hi
        self._final = targets

    def step(
        self, *, page_table: torch.Tensor, num_pages: torch.Tensor, full_pages: torch.Tensor
    ) -> CoarseMetadata:
        """One step's :class:`CoarseMetadata`, on the device (capturable): recomputes each
        row's last full group first (the one that may have filled since the last step).

        num_pages: ``[num_seqs]`` int32 local pages; full_pages: ``[num_seqs]`` int64 of them
        full and written before the step's append.
        """
        refresh_last_full_group(
            key_min=self.cache.key_min, key_max=self.cache.key_max, coarse_min=self.key_min,
            coarse_max=self.key_max, page_table=page_table, full_pages=full_pages,
            group_pages=self.group_pages, impl=self.impl,
        )  # fmt: skip
        group = self.group_pages
        num_groups = torch.div(num_pages + (group - 1), group, rounding_mode="floor")
        pin_from = torch.div(full_pages, group, rounding_mode="floor")
        return CoarseMetadata(
            key_min=self.key_min,
            key_max=self.key_max,
            table=self.table,
            num_groups=num_groups.to(torch.int32),
            pin_from=pin_from.to(torch.int32),
            group_pages=group,
        )
