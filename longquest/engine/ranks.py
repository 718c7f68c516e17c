"""The seams through which ranks running one generation loop work together.

``LLMEngine`` runs the same loop on every rank (SPMD). What differs between one
device and a sequence-parallel group is declared here, as one object the engine
takes (:class:`RankGroup`): which rank holds a page, how admission is agreed, how
rank 0's tokens reach every rank, how a prompt is prefilled, and whether decode
splits the MLPs. :class:`SingleDevice` is the one-device group;
``longquest.parallel.worker.SequenceParallelRanks`` the sequence-parallel one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from longquest.engine.attention import AttentionComm, LocalComm, PagedAttention, PrefillMetadata
from longquest.engine.config import ModelConfig
from longquest.engine.model import MlpSplit, Model
from longquest.engine.sequence import Sequence
from longquest.kernels import plan_append

if TYPE_CHECKING:
    from longquest.engine.engine import LLMEngine

ProgressCallback = Callable[[str, int, int], None]


class RankGroup(Protocol):
    """How the ranks of one engine split its pages and agree on its steps.

    rank, world_size: this rank and the group's size: the ranks that split the pages of
        the same KV heads (under tensor parallelism, one tensor rank's sequence ranks;
        the model then holds that tensor rank's heads and makes its own collectives).
    comm: decode attention's cross-rank steps (global top-k, LSE merge).
    """

    rank: int
    world_size: int
    comm: AttentionComm

    def owner(self, *, page_index: int) -> int:
        """The rank that holds page ``page_index`` of any sequence (position alone decides,
        so a shared prefix lies on the same ranks for every prompt)."""
        ...

    def next_local_page(self, *, page_index: int) -> int:
        """The first page at or after ``page_index`` that this rank holds (O(1))."""
        ...

    def agreed_pages(self, num_pages: int) -> int:
        """The page pool every rank plans with, given this rank's ``num_pages``."""
        ...

    def most_pages_needed(self, *, num_pages: int) -> int:
        """The largest share of a sequence's ``num_pages`` pages that any rank holds."""
        ...

    def all_agree(self, fits: bool) -> bool:
        """Whether ``fits`` holds on every rank (every rank admits the same requests)."""
        ...

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over the ranks (e.g. the cached pages every rank has)."""
        ...

    def share_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``[num_seqs]`` int64 tokens on every rank; capturable (no host sync)."""
        ...

    def mlp_split(self, *, model: Model, model_config: ModelConfig) -> MlpSplit | None:
        """Prepare ``model`` to split its decode MLPs over the ranks; None runs them whole."""
        ...

    def prefill(
        self, *, engine: LLMEngine, seq: Sequence, on_progress: ProgressCallback | None
    ) -> torch.Tensor:
        """Prefill ``seq``'s prompt exactly from the end of its ``cached_pages`` (taken
        from the prefix cache, never written); return its last token's logits
        ``[1, vocab_size]`` fp32, the same on every rank."""
        ...


class SingleDevice:
    """One device: rank 0 holds every page and decides alone."""

    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.comm: AttentionComm = LocalComm()

    def owner(self, *, page_index: int) -> int:
        return 0

    def next_local_page(self, *, page_index: int) -> int:
        return page_index

    def agreed_pages(self, num_pages: int) -> int:
        return num_pages

    def most_pages_needed(self, *, num_pages: int) -> int:
        return num_pages

    def all_agree(self, fits: bool) -> bool:
        return fits

    def agree_min(self, value: int) -> int:
        return value

    def share_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def mlp_split(self, *, model: Model, model_config: ModelConfig) -> MlpSplit | None:
        return None

    def prefill(
        self, *, engine: LLMEngine, seq: Sequence, on_progress: ProgressCallback | None
    ) -> torch.Tensor:
        """Exact causal prefill from the end of ``seq``'s cached pages, in chunks of
        ``engine.prefill_chunk_tokens`` on the prompt's absolute grid: the first chunk
        ends at the next multiple of the chunk size, so a cached prefix of whole chunks
        leaves every later chunk as it is without the cache."""
        prompt, size, device = seq.prompt, engine.page_size, engine.device
        chunk, hidden = engine.prefill_chunk_tokens, None
        start = seq.cached_pages * size
        while start < len(prompt):
            end = min((start // chunk + 1) * chunk, len(prompt))
            engine.grow(seq, num_tokens=end)
            local = dict(seq.local_pages)  # once per chunk, not once per token
            slots = torch.tensor(
                [local[p // size] * size + p % size for p in range(start, end)], dtype=torch.int64
            ).to(device)
            page_table = torch.tensor([p for _, p in seq.local_pages], dtype=torch.int32)
            meta = PrefillMetadata(
                append_plan=plan_append(slot_mapping=slots, page_size=size),
                slot_mapping=slots,
                page_table=page_table.to(device),
                query_start=start,
                seq_end=end,
            )
            attention = PagedAttention(
                cache=engine.cache,
                quest=engine.quest,
                metadata=meta,
                impl=engine.impl,
                tuning=engine.tuning,
            )
            ids = torch.tensor(prompt[start:end], dtype=torch.int64, device=device)
            positions = torch.arange(start, end, dtype=torch.int64, device=device)
            with torch.inference_mode():
                hidden = engine.model(input_ids=ids, positions=positions, attention=attention)
            if on_progress:
                on_progress("prefill", end, len(prompt))
            start = end
        with torch.inference_mode():
            return engine.model.compute_logits(hidden[-1:])
