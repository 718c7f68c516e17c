"""PageOwnership: an owner depends on the page's position alone, every page has one owner,
prefill from any cached page covers the rest of the prompt once, work stays balanced."""

from __future__ import annotations

import random

import pytest

from longquest.parallel.ownership import PageOwnership

# (world_size, page_size, prefill_chunk_tokens): blocks of one page and of several.
CONFIGS = [
    (1, 4, 8),
    (1, 2, 12),
    (2, 4, 8),
    (2, 2, 12),
    (2, 4, 16),
    (3, 2, 4),
    (3, 4, 8),
    (3, 2, 12),
    (4, 16, 64),
    (8, 2, 4),
]
IDS = [f"w{w}-page{p}-chunk{c}" for w, p, c in CONFIGS]


def _ownership(world_size: int, page_size: int, chunk: int) -> PageOwnership:
    return PageOwnership(world_size=world_size, page_size=page_size, prefill_chunk_tokens=chunk)


def _old_owner(ownership: PageOwnership, prompt_len: int, page: int) -> int:
    """The length-dependent rule this one replaces: each round's pages (the last round's
    own, fewer) cut into 2 * world_size chunks differing by at most one page, larger last."""
    num_chunks = 2 * ownership.world_size
    prompt_pages = ownership.num_pages(num_tokens=prompt_len)
    first = page // ownership.round_pages * ownership.round_pages
    end = min(first + ownership.round_pages, prompt_pages)
    size, spare = divmod(end - first, num_chunks)
    small = num_chunks - spare
    bounds = [first + c * size + max(0, c - small) for c in range(num_chunks + 1)]
    chunk = next(c for c in range(num_chunks) if bounds[c] <= page < bounds[c + 1])
    return min(chunk, num_chunks - 1 - chunk)


@pytest.mark.parametrize("world_size, page_size, chunk", CONFIGS, ids=IDS)
def test_every_page_has_exactly_one_owner(world_size, page_size, chunk):
    ownership = _ownership(world_size, page_size, chunk)
    num_pages = 3 * ownership.round_pages + ownership.block_pages + 1
    seen: dict[int, int] = {}
    for rank in range(world_size):
        pages = ownership.local_pages(rank=rank, num_pages=num_pages)
        assert pages == sorted(pages)
        for page in pages:
            assert page not in seen, f"page {page} owned by ranks {seen[page]} and {rank}"
            seen[page] = rank
        for count in range(num_pages + 1):
            held = sum(p < count for p in pages)
            assert ownership.num_local_pages(rank=rank, num_pages=count) == held
    assert sorted(seen) == list(range(num_pages))
    for page, rank in seen.items():
        assert ownership.owner(page_index=page) == rank
        for other in range(world_size):
            following = [p for p in range(page, num_pages) if seen[p] == other]
            if following:
                assert ownership.next_local_page(rank=other, page_index=page) == following[0]


@pytest.mark.parametrize("world_size, page_size, chunk", CONFIGS, ids=IDS)
def test_full_rounds_keep_the_length_dependent_layout(world_size, page_size, chunk):
    """Pages of whole rounds lie where they did when the owner depended on the prompt."""
    ownership = _ownership(world_size, page_size, chunk)
    rng = random.Random(world_size * 100 + chunk)
    for _ in range(30):
        prompt_len = rng.randint(1, 4 * ownership.round_tokens)
        whole = prompt_len // ownership.round_tokens * ownership.round_pages
        for page in range(whole):
            assert ownership.owner(page_index=page) == _old_owner(ownership, prompt_len, page)


@pytest.mark.parametrize("world_size, page_size, chunk", CONFIGS, ids=IDS)
def test_prefill_from_any_start_covers_the_rest_once(world_size, page_size, chunk):
    """Rounds from ``first_round(start)`` partition ``[start, prompt_len)``; every token is
    computed by its page's owner, inside its round's span; a full round is zigzag."""
    ownership = _ownership(world_size, page_size, chunk)
    rng = random.Random(world_size * 1000 + page_size * 10 + chunk)
    for trial in range(40):
        prompt_len = rng.randint(1, 4 * ownership.round_tokens + 3)
        start = 0 if trial < 5 else rng.randrange(prompt_len)
        covered = [0] * prompt_len
        first = ownership.first_round(start=start)
        for round_index in range(first, ownership.num_rounds(prompt_len=prompt_len)):
            lo, hi = ownership.round_span(
                start=start, prompt_len=prompt_len, round_index=round_index
            )
            assert lo < hi
            work = []
            for rank in range(world_size):
                ranges = ownership.prefill_positions(
                    rank=rank, start=start, prompt_len=prompt_len, round_index=round_index
                )
                assert len(ranges) <= 2
                for a, b in ranges:
                    assert lo <= a < b <= hi
                    for token in range(a, b):
                        covered[token] += 1
                        assert ownership.owner(page_index=token // page_size) == rank
                work.append(sum(t + 1 for a, b in ranges for t in range(a, b)))
            if hi - lo == ownership.round_tokens:  # causal work is equal on every rank
                assert len(set(work)) == 1, work
        assert covered == [0] * start + [1] * (prompt_len - start)


@pytest.mark.parametrize("world_size, page_size, chunk", CONFIGS, ids=IDS)
def test_owner_ignores_the_prompt_so_a_prefix_keeps_its_ranks(world_size, page_size, chunk):
    """Two prompts sharing h pages: the prefix's pages have the same owners, and the
    pages of a rank within [0, h) are the same list, for any lengths."""
    ownership = _ownership(world_size, page_size, chunk)
    rng = random.Random(world_size + 7 * chunk)
    for _ in range(20):
        shared = rng.randint(0, 3 * ownership.round_pages)
        one = shared * page_size + rng.randint(1, 2 * ownership.round_tokens)
        two = shared * page_size + rng.randint(1, 2 * ownership.round_tokens)
        for rank in range(world_size):
            mine_one = ownership.local_pages(
                rank=rank, num_pages=ownership.num_pages(num_tokens=one)
            )
            mine_two = ownership.local_pages(
                rank=rank, num_pages=ownership.num_pages(num_tokens=two)
            )
            assert [p for p in mine_one if p < shared] == [p for p in mine_two if p < shared]


@pytest.mark.parametrize("world_size, page_size, chunk", CONFIGS, ids=IDS)
def test_rank_totals_are_within_one_block(world_size, page_size, chunk):
    """For any sequence length (prompt and decode pages alike), ranks hold within one block
    of each other, and the local token counts add up with only the tail page partial."""
    ownership = _ownership(world_size, page_size, chunk)
    for seq_len in range(1, 3 * ownership.round_tokens + 2 * page_size):
        num_pages = ownership.num_pages(num_tokens=seq_len)
        held = [ownership.num_local_pages(rank=r, num_pages=num_pages) for r in range(world_size)]
        assert sum(held) == num_pages
        assert max(held) - min(held) <= ownership.block_pages
        tail = ownership.tail_owner(seq_len=seq_len)
        assert tail == ownership.owner(page_index=num_pages - 1)
        lens = [ownership.local_seq_len(rank=r, seq_len=seq_len) for r in range(world_size)]
        assert sum(lens) == seq_len
        for rank, length in enumerate(lens):
            partial = num_pages * page_size - seq_len if rank == tail else 0
            assert length == held[rank] * page_size - partial


def test_full_round_of_two_ranks_is_zigzag():
    ownership = PageOwnership(world_size=2, page_size=4, prefill_chunk_tokens=8)
    # A round is 16 tokens = 4 blocks of one page: rank 0 has pages 0 and 3.
    assert ownership.local_pages(rank=0, num_pages=6) == [0, 3, 4]
    assert ownership.local_pages(rank=1, num_pages=6) == [1, 2, 5]
    whole = dict(start=0, prompt_len=16, round_index=0)
    assert ownership.prefill_positions(rank=0, **whole) == [(0, 4), (12, 16)]
    assert ownership.prefill_positions(rank=1, **whole) == [(4, 12)]
    # From a cached page 3 (token 12) only rank 0 computes in round 0.
    late = dict(start=12, prompt_len=30, round_index=0)
    assert ownership.round_span(**late) == (12, 16)
    assert ownership.prefill_positions(rank=0, **late) == [(12, 16)]
    assert ownership.prefill_positions(rank=1, **late) == []
    assert ownership.prefill_positions(rank=1, **dict(late, round_index=1)) == [(20, 28)]


def test_blocks_of_several_pages():
    ownership = PageOwnership(world_size=2, page_size=4, prefill_chunk_tokens=24)
    assert ownership.block_pages == 3
    assert ownership.local_pages(rank=0, num_pages=14) == [0, 1, 2, 9, 10, 11, 12, 13]
    assert ownership.next_local_page(rank=1, page_index=0) == 3
    assert ownership.next_local_page(rank=1, page_index=9) == 15
    assert ownership.next_local_page(rank=0, page_index=4) == 9


def test_world_size_one_owns_everything_in_order():
    ownership = PageOwnership(world_size=1, page_size=16, prefill_chunk_tokens=64)
    rng = random.Random()
    prompt_len = rng.randint(1, 500)
    start = rng.randrange(prompt_len)
    assert ownership.local_pages(rank=0, num_pages=40) == list(range(40))
    rounds = range(ownership.first_round(start=start), ownership.num_rounds(prompt_len=prompt_len))
    ranges = [
        r
        for i in rounds
        for r in ownership.prefill_positions(
            rank=0, start=start, prompt_len=prompt_len, round_index=i
        )
    ]
    expected = [(max(i * 64, start), min((i + 1) * 64, prompt_len)) for i in rounds]
    assert ranges == expected


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        PageOwnership(world_size=2, page_size=16, prefill_chunk_tokens=48)
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        PageOwnership(world_size=2, page_size=16, prefill_chunk_tokens=0)
    with pytest.raises(ValueError, match="world_size"):
        PageOwnership(world_size=0, page_size=16, prefill_chunk_tokens=64)
    with pytest.raises(ValueError, match="page_size"):
        PageOwnership(world_size=1, page_size=0, prefill_chunk_tokens=64)
    ownership = PageOwnership(world_size=2, page_size=4, prefill_chunk_tokens=8)
    with pytest.raises(ValueError, match="rank"):
        ownership.local_pages(rank=2, num_pages=3)
    with pytest.raises(ValueError, match="round_index"):
        ownership.prefill_positions(rank=0, start=0, prompt_len=10, round_index=1)
    with pytest.raises(ValueError, match="round_index"):
        ownership.round_span(start=40, prompt_len=50, round_index=1)
    with pytest.raises(ValueError, match="last prompt token"):
        ownership.round_span(start=10, prompt_len=10, round_index=0)
    with pytest.raises(ValueError, match="prompt_len"):
        ownership.num_rounds(prompt_len=0)
    with pytest.raises(ValueError, match="page_index"):
        ownership.owner(page_index=-1)
    with pytest.raises(ValueError, match="seq_len"):
        ownership.tail_owner(seq_len=0)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("tokens", [200, 1873, 5000, 40_000])
@pytest.mark.parametrize("chunk", [512, 8192])
def test_a_cache_sized_in_tokens_fits_one_sequence_that_long(world_size, tokens, chunk):
    """cache_tokens=N holds one N-token sequence on every rank, even where the sequence
    is too short to spread over all ranks (its blocks sit on the first ones)."""
    from longquest.engine.builder import cache_pages
    from longquest.engine.config import CacheConfig

    own = PageOwnership(world_size=world_size, page_size=16, prefill_chunk_tokens=chunk)
    needed = max(own.num_local_pages(rank=r, num_pages=-(-tokens // 16))
                 for r in range(world_size))  # fmt: skip
    pages = cache_pages(config=None, cache=CacheConfig(max_tokens=tokens), page_size=16,
                        dtype=None, device=None, world_size=world_size,
                        most_pages_needed=lambda n: max(
                            own.num_local_pages(rank=r, num_pages=n) for r in range(world_size)
                        ))  # fmt: skip
    assert pages >= needed
    assert pages <= needed + 4
