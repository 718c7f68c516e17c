"""The attention layer the model calls: writes the paged cache, then attends.

Per-step state lives in explicit metadata objects (``PrefillMetadata``,
``DecodeMetadata``) built once per step by the engine and shared by every layer.
The cross-rank steps of sparse decode (global top-k, log-sum-exp reduction) go
through an injected ``comm`` object; ``LocalComm`` is the single-device one and
``longquest.parallel.comm.SequenceParallelComm`` the sequence-parallel one.

With fp8 key bounds (``CacheConfig(bounds_dtype="float8_e4m3fn")``) a key element beyond
+-448 cannot be bounded. Prefill checks for that: every layer's peak ``|k|`` stays on the
device and, after the chunk's last layer, one host sync raises ValueError if any exceeds
448. Decode does not check (its step is captured in a CUDA graph; a sync would break it),
so a first out-of-range key during decode is clamped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from longquest.engine.cache import KVCache, gather_pages, key_peak
from longquest.engine.coarse import CoarseMetadata
from longquest.engine.config import QuestConfig
from longquest.kernels import (
    DEFAULT_TUNING,
    FLOAT8_DTYPE,
    FLOAT8_MAX,
    AppendPlan,
    KernelTuning,
    append_kv,
    check_keys_fit_float8,
    page_scores,
    paged_decode_attention,
    prefill_attention,
    select_pages,
    select_pages_two_level,
)


class AttentionComm(Protocol):
    """The cross-rank steps of decode attention."""

    def select_global(
        self,
        *,
        top_scores: torch.Tensor,
        local_indices: torch.Tensor,
        global_pages: torch.Tensor,
        top_k: int,
    ) -> torch.Tensor: ...

    def partial_buffers(
        self, *, num_seqs: int, num_qo_heads: int, head_dim: int, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...

    def merge(
        self, *, out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor: ...


class LocalComm:
    """Single device: the local top-k is the global one and there is nothing to merge."""

    def select_global(
        self,
        *,
        top_scores: torch.Tensor,
        local_indices: torch.Tensor,
        global_pages: torch.Tensor,
        top_k: int,
    ) -> torch.Tensor:
        return local_indices

    def partial_buffers(
        self, *, num_seqs: int, num_qo_heads: int, head_dim: int, device: torch.device
    ) -> tuple[None, None]:
        return None, None  # the attention's own output is the answer

    def merge(
        self, *, out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        return out if dtype is None else out.to(dtype)


@dataclass(frozen=True, kw_only=True)
class PrefillMetadata:
    """One chunk of one sequence's prompt, on a single device.

    page_table: ``[num_pages]`` int32 physical pages holding positions ``0 .. seq_end - 1``.
    query_start: position of the chunk's first token; the chunk ends at ``seq_end``.
    """

    append_plan: AppendPlan
    slot_mapping: torch.Tensor
    page_table: torch.Tensor
    query_start: int
    seq_end: int


@dataclass(frozen=True, kw_only=True)
class DecodeMetadata:
    """One decode token per sequence, for a batch.

    append_rows: ``[num_appended]`` int64 rows of the batch whose new token this rank
        stores (all rows on a single device), or None for all rows.
    page_table: ``[num_seqs, max_pages]`` int32 local physical pages, position order.
    seq_lens: ``[num_seqs]`` int32 local valid tokens after the append.
    num_pages: ``[num_seqs]`` int32 local pages.
    global_pages: ``[num_seqs, max_pages]`` int32 global page index of each local page.
    pin_last: ``[num_seqs]`` bool — this rank holds the sequence's newest page.
    sparse: False when no sequence has more pages than the budget (skip scoring).
    split_counters: ``[>= num_seqs * num_kv_heads]`` int32 zeros that let the attention's
        last split reduce the others (see ``paged_decode_attention``), or None.
    select_workspace: ``[>= num_seqs * num_kv_heads, WORKSPACE_STRIDE]`` int32 zeros for a
        selection spread over several programs a row (see ``select_pages``), or None.
    coarse: the page groups' coarse bounds where the selection has two levels
        (``QuestConfig.group_pages``), else None.
    """

    append_plan: AppendPlan | None
    slot_mapping: torch.Tensor | None
    append_rows: torch.Tensor | None
    page_table: torch.Tensor
    seq_lens: torch.Tensor
    num_pages: torch.Tensor
    global_pages: torch.Tensor
    pin_last: torch.Tensor
    sparse: bool
    split_counters: torch.Tensor | None = None
    select_workspace: torch.Tensor | None = None
    coarse: CoarseMetadata | None = None


class PagedAttention:
    """``LayerAttention`` over the paged cache for one step (prefill chunk or decode batch)."""

    def __init__(
        self,
        *,
        cache: KVCache,
        quest: QuestConfig,
        metadata: PrefillMetadata | DecodeMetadata,
        comm: AttentionComm | None = None,
        impl: str | None = None,
        tuning: KernelTuning = DEFAULT_TUNING,
    ) -> None:
        self.cache = cache
        self.quest = quest
        self.metadata = metadata
        self.comm = comm or LocalComm()
        self.impl = impl
        self.tuning = tuning
        self._key_peaks: list[torch.Tensor] = []  # fp8 bounds: per-layer max |k| of a chunk

    def __call__(
        self, *, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        if isinstance(self.metadata, PrefillMetadata):
            return self._prefill(layer, query, key, value, self.metadata)
        return self._decode(layer, query, key, value, self.metadata)

    def _append(self, layer: int, key, value, slot_mapping, plan) -> None:
        k_cache, v_cache, key_min, key_max = self.cache.layer(layer)
        append_kv(
            key=key,
            value=value,
            k_cache=k_cache,
            v_cache=v_cache,
            key_min=key_min,
            key_max=key_max,
            slot_mapping=slot_mapping,
            plan=plan,
            impl=self.impl,
        )

    def _check_key_range(self, layer: int, key: torch.Tensor, meta: PrefillMetadata) -> None:
        """fp8 bounds only: collect the layer's peak ``|k|`` without a sync; after the last
        layer, one sync raises ValueError if a key lies beyond e4m3fn's range."""
        if self.cache.key_min.dtype != FLOAT8_DTYPE:
            return
        if layer == 0:
            self._key_peaks = []
        self._key_peaks.append(key_peak(key))
        if layer != self.cache.shape.num_layers - 1:
            return
        peaks = torch.stack(self._key_peaks).cpu()
        self._key_peaks = []
        over = [i for i, peak in enumerate(peaks.tolist()) if not peak <= FLOAT8_MAX]
        if over:
            where = f"positions {meta.query_start}..{meta.seq_end - 1}, layers {over}"
            check_keys_fit_float8(keys=peaks, what=f"the prompt's keys ({where})")

    def _prefill(self, layer, query, key, value, meta: PrefillMetadata) -> torch.Tensor:
        self._check_key_range(layer, key, meta)
        self._append(layer, key, value, meta.slot_mapping, meta.append_plan)
        k_cache, v_cache, _, _ = self.cache.layer(layer)
        # Earlier chunks' keys come back from the pages: [tokens, num_kv_heads, head_dim].
        keys, values = gather_pages(
            k_cache=k_cache, v_cache=v_cache, pages=meta.page_table, num_tokens=meta.seq_end
        )
        out, _ = prefill_attention(
            query=query,
            key=keys,
            value=values,
            query_start=meta.query_start,
            causal=True,
            impl=self.impl,
            tuning=self.tuning,
        )
        return out

    def _select(self, layer, query, key_min, key_max, meta: DecodeMetadata, top_k: int):
        """This rank's top ``top_k`` pages of every (sequence, KV head): ``(top_scores,
        local indices)`` (see ``select_pages``), in one level or in two."""
        common = dict(workspace=meta.select_workspace, spread=self.quest.spread_selection,
                      impl=self.impl, tuning=self.tuning)  # fmt: skip
        fine = dict(query=query, key_min=key_min, key_max=key_max, page_table=meta.page_table,
                    num_pages=meta.num_pages)  # fmt: skip
        group_pages = self.quest.group_pages
        if group_pages is None:
            # The engine built the tables; checking them costs a sync.
            scores = page_scores(**fine, check_pages=False, impl=self.impl, tuning=self.tuning)
            return select_pages(scores=scores, num_pages=meta.num_pages, top_k=top_k,
                                pin_last=meta.pin_last, **common)  # fmt: skip
        coarse = meta.coarse
        if coarse is None or coarse.group_pages != group_pages:
            raise RuntimeError(
                f"QuestConfig.group_pages={group_pages} but the decode batch holds "
                f"{'no' if coarse is None else coarse.group_pages} coarse groups; rebuild it "
                "(DecodeBatch(group_pages=..., cache=...)) after changing the selection"
            )
        return select_pages_two_level(
            **fine, pin_last=meta.pin_last, coarse_min=coarse.key_min[layer],
            coarse_max=coarse.key_max[layer], coarse_table=coarse.table,
            num_groups=coarse.num_groups, pin_from=coarse.pin_from, group_pages=group_pages,
            kept_groups=min(self.quest.kept_groups, coarse.table.shape[1]), top_k=top_k,
            **common,
        )  # fmt: skip

    def _decode(self, layer, query, key, value, meta: DecodeMetadata) -> torch.Tensor:
        if meta.slot_mapping is not None:
            if meta.append_rows is not None:
                key, value = key[meta.append_rows], value[meta.append_rows]
            self._append(layer, key, value, meta.slot_mapping, meta.append_plan)
        k_cache, v_cache, key_min, key_max = self.cache.layer(layer)
        selected = None
        top_k = self.quest.page_budget
        if top_k is not None and meta.sparse and layer >= self.quest.dense_layers:
            top_scores, local = self._select(layer, query, key_min, key_max, meta, top_k)
            selected = self.comm.select_global(
                top_scores=top_scores,
                local_indices=local,
                global_pages=meta.global_pages,
                top_k=top_k,
            )
        num_seqs, num_qo_heads, head_dim = query.shape
        out, lse = self.comm.partial_buffers(
            num_seqs=num_seqs, num_qo_heads=num_qo_heads, head_dim=head_dim, device=query.device
        )
        out, lse = paged_decode_attention(
            query=query,
            k_cache=k_cache,
            v_cache=v_cache,
            page_table=meta.page_table,
            seq_lens=meta.seq_lens,
            selected=selected,
            check_pages=False,
            impl=self.impl,
            split_counters=meta.split_counters,
            out=out,
            lse=lse,
            tuning=self.tuning,
        )
        return self.comm.merge(out=out, lse=lse, dtype=query.dtype)
