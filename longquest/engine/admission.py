"""Admission of requests into the page pool, with reuse of cached prompt pages.

A request is admitted when every rank can hold its own pages of the whole sequence
(prompt plus ``max_tokens``): the pages it takes from the prefix cache by reference and
a reservation for the rest, so a running request never runs out of pages. The ranks
agree on the cached prefix (its length in pages, one MIN over the ranks) and on whether
the request fits, so every rank admits the same requests with the same prefix.

The page holding the last prompt token is never taken from the cache (its prefill
computes at least that token's logits), so shared pages are never written: no
copy-on-write. A request's newly computed full prompt pages are published once its
prefill has finished; a prefill that fails publishes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from longquest.engine.cache import CacheCapacityError, pages_for
from longquest.engine.config import SamplingParams
from longquest.engine.page_keys import PromptKeys
from longquest.engine.page_pool import PageEntry, PagePool
from longquest.engine.ranks import RankGroup
from longquest.engine.sequence import Sequence


@dataclass(frozen=True, kw_only=True)
class PrefixStats:
    """What the prefix cache saved on this rank since the engine started.

    requests: prompts prefilled. hit_requests: those that took cached pages.
    cached_prompt_tokens: prompt tokens taken from the cache (not computed).
    computed_prompt_tokens: prompt tokens prefilled.
    evictions: idle cached pages evicted to make room.
    rejected_matches: index hits whose parent key or tokens differed (counted as misses).
    cached_pages: pages in the index now (held or idle).
    """

    requests: int
    hit_requests: int
    cached_prompt_tokens: int
    computed_prompt_tokens: int
    evictions: int
    rejected_matches: int
    cached_pages: int


class Admission:
    """Admits, publishes and releases the sequences of one rank's engine.

    pool: this rank's pages (the same size on every rank). ranks: the rank group (page
    ownership and the admission agreements). salt: page-key salt
    (:func:`~longquest.engine.page_keys.cache_salt`), the same on every rank.
    prefix_caching: reuse cached prompt pages; off, every prompt is computed in full.
    """

    def __init__(
        self,
        *,
        pool: PagePool,
        ranks: RankGroup,
        page_size: int,
        salt: bytes,
        prefix_caching: bool,
    ) -> None:
        self.pool = pool
        self.ranks = ranks
        self.page_size = page_size
        self.salt = salt
        self.prefix_caching = prefix_caching
        self._requests = self._hit_requests = self._cached_tokens = self._computed_tokens = 0

    def check_capacity(self, *, index: int, prompt_len: int, params: SamplingParams) -> None:
        """Raise CacheCapacityError if request ``index`` does not fit the empty pool
        (without reuse): no later admission could take it."""
        total = prompt_len + params.max_tokens
        need = self.ranks.most_pages_needed(num_pages=pages_for(total, self.page_size))
        if need > self.pool.num_pages:
            world_size, num_pages = self.ranks.world_size, self.pool.num_pages
            busiest = f" ({need} pages on the rank holding most of them)" * (world_size > 1)
            raise CacheCapacityError(
                f"prompt {index} has {prompt_len} tokens; with max_tokens={params.max_tokens} "
                f"it needs {total} tokens of KV cache{busiest} but the cache holds "
                f"{num_pages * self.page_size * world_size} tokens ({num_pages} pages of "
                f"{self.page_size} on each of {world_size} rank(s)); shorten the prompt, "
                "lower max_tokens, or give the cache more memory (CacheConfig) or more GPUs"
            )

    def admit(self, seq: Sequence) -> bool:
        """Take ``seq``'s cached prefix and reserve the rest of this rank's pages of the
        whole sequence if every rank can; False (nothing changed) when not now."""
        own = self._own_pages(pages_for(len(seq.prompt) + seq.params.max_tokens, self.page_size))
        hit, shared = 0, []
        if self.prefix_caching:
            local_hit, found = self._local_hit(seq, own)
            hit = self.ranks.agree_min(local_hit)
            shared = [(page, physical) for page, physical in found if page < hit]
        rest = sum(1 for page in own if page >= hit)
        # Idle pages taken by reference leave the pool's free pages, like reserved ones.
        need = rest + sum(self.pool.is_idle(physical) for _, physical in shared)
        if not self.ranks.all_agree(need <= self.pool.num_free):
            return False
        self.pool.take([physical for _, physical in shared])
        self.pool.reserve(rest)
        seq.local_pages, seq.reserved_pages = shared, rest
        seq.cached_pages, seq.cached_prompt_tokens = hit, hit * self.page_size
        return True

    def publish(self, seq: Sequence) -> None:
        """Index the full prompt pages ``seq``'s prefill computed on this rank (call
        once its prefill has finished)."""
        self._requests += 1
        self._hit_requests += seq.cached_pages > 0
        self._cached_tokens += seq.cached_prompt_tokens
        self._computed_tokens += len(seq.prompt) - seq.cached_prompt_tokens
        if not self.prefix_caching:
            return
        keys, full = self._keys(seq), len(seq.prompt) // self.page_size
        for page, physical in seq.local_pages:
            if page >= full:
                break
            # A page cached meanwhile (or on this rank only, past the agreed prefix) keeps
            # its first copy; this one and the pages after it stay private, so a cached
            # page's parent is always released after it and eviction stays leaf first.
            if page >= seq.cached_pages and not self.pool.publish(
                physical, self._entry(seq, page, keys)
            ):
                break

    def release(self, seq: Sequence) -> None:
        """Drop ``seq``'s holds on its pages (last page first, so eviction takes a
        prefix's tail before its head) and what is left of its reservation."""
        self.pool.release([physical for _, physical in seq.local_pages])
        self.pool.release_reservation(seq.reserved_pages)
        seq.local_pages, seq.reserved_pages = [], 0

    def stats(self) -> PrefixStats:
        return PrefixStats(
            requests=self._requests,
            hit_requests=self._hit_requests,
            cached_prompt_tokens=self._cached_tokens,
            computed_prompt_tokens=self._computed_tokens,
            evictions=self.pool.evictions,
            rejected_matches=self.pool.rejected,
            cached_pages=self.pool.num_cached,
        )

    def _local_hit(self, seq: Sequence, own: list[int]) -> tuple[int, list[tuple[int, int]]]:
        """``(pages, found)``: every own page below ``pages`` is cached here, as
        ``found``'s ``(page, physical)`` in order. At most ``(len(prompt) - 1) //
        page_size``: the page of the last prompt token is always computed."""
        cap = (len(seq.prompt) - 1) // self.page_size
        keys, found = self._keys(seq), []
        for page in own:
            if page >= cap:
                break
            physical = self.pool.lookup(
                keys.keys[page], parent=keys.parent(page), tokens=keys.tokens(page)
            )
            if physical is None:
                return page, found
            found.append((page, physical))
        return cap, found

    def _own_pages(self, num_pages: int) -> list[int]:
        """The pages of ``0 .. num_pages - 1`` this rank holds, in O(their number)."""
        own, page = [], self.ranks.next_local_page(page_index=0)
        while page < num_pages:
            own.append(page)
            page = self.ranks.next_local_page(page_index=page + 1)
        return own

    def _keys(self, seq: Sequence) -> PromptKeys:
        if seq.prompt_keys is None:  # once per request, not per admission attempt
            seq.prompt_keys = PromptKeys(seq.prompt, page_size=self.page_size, salt=self.salt)
        return seq.prompt_keys

    def _entry(self, seq: Sequence, page: int, keys: PromptKeys) -> PageEntry:
        return PageEntry(key=keys.keys[page], parent=keys.parent(page), tokens=keys.tokens(page))
