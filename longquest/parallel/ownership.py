"""Which rank owns each KV page of a sequence: plain Python, no torch, no GPU.

A sequence's pages are numbered globally by position: page ``p`` holds tokens
``p * page_size .. (p + 1) * page_size - 1``. Every page lives on exactly one
rank, decided by the prompt length alone, so every rank can compute the whole
map without talking to the others.

Prompt pages (the ``ceil(prompt_len / page_size)`` pages that hold prompt
tokens) follow the prefill: the prompt is processed in rounds of
``round_tokens = world_size * prefill_chunk_tokens`` tokens. A round's pages are
cut into ``2 * world_size`` contiguous chunks whose sizes differ by at most one
page, the larger ones last, and rank ``r`` owns chunks ``r`` and
``2 * world_size - 1 - r``. Causal attention work grows with position, so
pairing an early chunk with the mirrored late one gives every rank the same
work in a full round (zigzag). The final partial round is cut the same way over
its own pages; with fewer pages than chunks the early chunks are empty. Putting
the larger chunks last hands the spare pages out one per rank first, so ranks'
page counts in a round differ by at most one.

Decode pages (every page after the prompt's last one) rotate: page ``p`` goes to
rank ``p % world_size``, so decode growth stays balanced.

The boundary page: when ``prompt_len`` is not a multiple of ``page_size`` the
prompt's last page is partial and decode tokens fill its remaining slots. It is
a prompt page, so it stays with its prefill owner for its whole life; the
rotation starts at the next page. Only the sequence's newest page can be
partial, and since a rank lists its pages in ascending global order, that page
is always the last of its owner's local list.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class PageOwnership:
    """Page-to-rank map of sequence parallelism.

    world_size: ranks sharing every sequence's pages.
    page_size: tokens a KV page holds.
    prefill_chunk_tokens: prompt tokens each rank computes per prefill round; a
        round covers ``world_size * prefill_chunk_tokens`` tokens. Must be a
        positive multiple of ``2 * page_size`` so a full round splits into
        ``2 * world_size`` equal whole-page chunks.
    """

    world_size: int
    page_size: int
    prefill_chunk_tokens: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"PageOwnership.world_size must be >= 1, got {self.world_size}")
        if self.page_size < 1:
            raise ValueError(f"PageOwnership.page_size must be >= 1, got {self.page_size}")
        step = 2 * self.page_size
        if self.prefill_chunk_tokens < step or self.prefill_chunk_tokens % step:
            raise ValueError(
                f"PageOwnership.prefill_chunk_tokens={self.prefill_chunk_tokens} must be a "
                f"positive multiple of 2 * page_size = {step}; round it to "
                f"{max(step, self.prefill_chunk_tokens // step * step)}."
            )

    @property
    def round_tokens(self) -> int:
        """Prompt tokens one prefill round covers (all ranks together)."""
        return self.world_size * self.prefill_chunk_tokens

    @property
    def round_pages(self) -> int:
        """Pages of one full prefill round."""
        return self.round_tokens // self.page_size

    def num_pages(self, *, num_tokens: int) -> int:
        """Pages that ``num_tokens`` tokens of one sequence occupy."""
        _check_count("num_tokens", num_tokens, minimum=0)
        return -(-num_tokens // self.page_size)

    def num_rounds(self, *, prompt_len: int) -> int:
        """Prefill rounds of a prompt of ``prompt_len`` tokens."""
        _check_count("prompt_len", prompt_len, minimum=1)
        return -(-prompt_len // self.round_tokens)

    def round_chunks(self, *, prompt_len: int, round_index: int) -> list[tuple[int, int]]:
        """The ``2 * world_size`` page chunks of one round, as global ``[first, end)`` pages.

        Chunk ``c`` belongs to rank ``min(c, 2 * world_size - 1 - c)``. Empty chunks
        (``first == end``) occur only at the start of a final round with fewer pages
        than chunks.
        """
        first, end = self._round_page_span(prompt_len=prompt_len, round_index=round_index)
        num_chunks = 2 * self.world_size
        size, spare = divmod(end - first, num_chunks)
        small = num_chunks - spare  # chunks of `size` pages; the last `spare` have one more
        bounds = [first + c * size + max(0, c - small) for c in range(num_chunks + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def owner(self, *, prompt_len: int, page_index: int) -> int:
        """Rank that owns global page ``page_index`` of a sequence with this prompt length."""
        _check_count("page_index", page_index, minimum=0)
        _check_count("prompt_len", prompt_len, minimum=1)
        prompt_pages = self.num_pages(num_tokens=prompt_len)
        if page_index >= prompt_pages:
            return page_index % self.world_size
        round_index = page_index // self.round_pages
        first, end = self._round_page_span(prompt_len=prompt_len, round_index=round_index)
        num_chunks = 2 * self.world_size
        size, spare = divmod(end - first, num_chunks)
        small = num_chunks - spare
        offset = page_index - first
        if offset < small * size:
            chunk = offset // size
        else:
            chunk = small + (offset - small * size) // (size + 1)
        return min(chunk, num_chunks - 1 - chunk)

    def local_pages(self, *, rank: int, prompt_len: int, num_pages: int) -> list[int]:
        """Global indices of the pages among ``0 .. num_pages - 1`` that ``rank`` owns, ascending.

        The position of a page in this list is its local logical index on ``rank``.
        """
        self._check_rank(rank)
        _check_count("num_pages", num_pages, minimum=0)
        pages: list[int] = []
        num_chunks = 2 * self.world_size
        for round_index in range(self.num_rounds(prompt_len=prompt_len)):
            chunks = self.round_chunks(prompt_len=prompt_len, round_index=round_index)
            for first, end in (chunks[rank], chunks[num_chunks - 1 - rank]):
                pages.extend(range(first, min(end, num_pages)))
        prompt_pages = self.num_pages(num_tokens=prompt_len)
        start = prompt_pages + (rank - prompt_pages) % self.world_size
        pages.extend(range(start, num_pages, self.world_size))
        return pages

    def local_seq_len(self, *, rank: int, prompt_len: int, seq_len: int) -> int:
        """Valid tokens of ``rank``'s pages when the sequence holds ``seq_len`` tokens.

        This is the ``seq_lens`` entry of the rank's local page table: its full
        pages, plus the filled slots of the newest page if the rank owns it.
        """
        _check_count("seq_len", seq_len, minimum=0)
        num_pages = self.num_pages(num_tokens=seq_len)
        pages = self.local_pages(rank=rank, prompt_len=prompt_len, num_pages=num_pages)
        tokens = len(pages) * self.page_size
        if pages and pages[-1] == num_pages - 1:
            tokens -= num_pages * self.page_size - seq_len
        return tokens

    def tail_owner(self, *, prompt_len: int, seq_len: int) -> int:
        """Rank that owns the newest page of a sequence holding ``seq_len >= 1`` tokens.

        That rank stores the next token when ``seq_len`` is not a multiple of
        ``page_size``, and is the only rank that pins its last page in top-k.
        """
        _check_count("seq_len", seq_len, minimum=1)
        return self.owner(prompt_len=prompt_len, page_index=(seq_len - 1) // self.page_size)

    def prefill_positions(
        self, *, rank: int, prompt_len: int, round_index: int
    ) -> list[tuple[int, int]]:
        """Prompt token ranges ``[start, end)`` whose K/V ``rank`` computes in one round.

        These are the tokens of the rank's two chunks (clipped to the prompt),
        ascending, with empty ranges dropped and adjacent ones joined.
        """
        self._check_rank(rank)
        chunks = self.round_chunks(prompt_len=prompt_len, round_index=round_index)
        ranges: list[tuple[int, int]] = []
        for first, end in (chunks[rank], chunks[2 * self.world_size - 1 - rank]):
            start = first * self.page_size
            stop = min(end * self.page_size, prompt_len)
            if start >= stop:
                continue
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], stop)
            else:
                ranges.append((start, stop))
        return ranges

    def _round_page_span(self, *, prompt_len: int, round_index: int) -> tuple[int, int]:
        rounds = self.num_rounds(prompt_len=prompt_len)
        if not 0 <= round_index < rounds:
            raise ValueError(
                f"round_index={round_index} is out of range: a prompt of {prompt_len} tokens "
                f"has {rounds} prefill rounds (0 .. {rounds - 1})"
            )
        first = round_index * self.round_pages
        end = min(first + self.round_pages, self.num_pages(num_tokens=prompt_len))
        return first, end

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={self.world_size})")


def _check_count(name: str, value: int, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
