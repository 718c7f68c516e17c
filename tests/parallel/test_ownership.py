"""PageOwnership: every page has one owner, prefill work is balanced, decode pages rotate."""

from __future__ import annotations

import random

import pytest

from longquest.parallel.ownership import PageOwnership

# (world_size, page_size, prefill_chunk_tokens, prompt_len): odd lengths, prompts shorter
# than one page, exactly one round, and several rounds with a partial last one.
CASES = [
    (1, 4, 8, 1),
    (1, 4, 8, 37),
    (2, 4, 8, 3),
    (2, 4, 8, 16),
    (2, 4, 16, 101),
    (3, 2, 4, 1),
    (3, 2, 4, 7),
    (3, 4, 8, 24),
    (3, 4, 8, 97),
    (4, 2, 8, 5),
    (4, 4, 8, 200),
    (4, 16, 64, 1000),
    (8, 2, 4, 77),
]


def _brute_owner(ownership: PageOwnership, prompt_len: int, page: int) -> int:
    """Owner straight from the rule, by walking the chunks."""
    if page >= ownership.num_pages(num_tokens=prompt_len):
        return page % ownership.world_size
    num_chunks = 2 * ownership.world_size
    for round_index in range(ownership.num_rounds(prompt_len=prompt_len)):
        chunks = ownership.round_chunks(prompt_len=prompt_len, round_index=round_index)
        for chunk, (first, end) in enumerate(chunks):
            if first <= page < end:
                return min(chunk, num_chunks - 1 - chunk)
    raise AssertionError(f"page {page} is in no chunk")


@pytest.mark.parametrize("world_size, page_size, chunk, prompt_len", CASES)
def test_every_page_has_exactly_one_owner(world_size, page_size, chunk, prompt_len):
    ownership = PageOwnership(
        world_size=world_size, page_size=page_size, prefill_chunk_tokens=chunk
    )
    num_pages = ownership.num_pages(num_tokens=prompt_len) + 2 * world_size + 3
    seen: dict[int, int] = {}
    for rank in range(world_size):
        pages = ownership.local_pages(rank=rank, prompt_len=prompt_len, num_pages=num_pages)
        assert pages == sorted(pages)
        for page in pages:
            assert page not in seen, f"page {page} owned by ranks {seen[page]} and {rank}"
            seen[page] = rank
    assert sorted(seen) == list(range(num_pages))
    for page, rank in seen.items():
        assert ownership.owner(prompt_len=prompt_len, page_index=page) == rank
        assert _brute_owner(ownership, prompt_len, page) == rank


@pytest.mark.parametrize("world_size, page_size, chunk, prompt_len", CASES)
def test_chunks_are_contiguous_and_nearly_equal(world_size, page_size, chunk, prompt_len):
    ownership = PageOwnership(
        world_size=world_size, page_size=page_size, prefill_chunk_tokens=chunk
    )
    end_of_previous = 0
    for round_index in range(ownership.num_rounds(prompt_len=prompt_len)):
        chunks = ownership.round_chunks(prompt_len=prompt_len, round_index=round_index)
        assert len(chunks) == 2 * world_size
        assert chunks[0][0] == end_of_previous
        for (_, end), (first, _) in zip(chunks[:-1], chunks[1:]):
            assert end == first
        sizes = [end - first for first, end in chunks]
        assert max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes)
        per_rank = [sizes[r] + sizes[2 * world_size - 1 - r] for r in range(world_size)]
        assert max(per_rank) - min(per_rank) <= 1
        end_of_previous = chunks[-1][1]
    assert end_of_previous == ownership.num_pages(num_tokens=prompt_len)


@pytest.mark.parametrize("world_size, page_size, chunk, prompt_len", CASES)
def test_prefill_positions_cover_the_prompt_once(world_size, page_size, chunk, prompt_len):
    ownership = PageOwnership(
        world_size=world_size, page_size=page_size, prefill_chunk_tokens=chunk
    )
    covered = [0] * prompt_len
    for round_index in range(ownership.num_rounds(prompt_len=prompt_len)):
        round_start = round_index * ownership.round_tokens
        round_end = min(round_start + ownership.round_tokens, prompt_len)
        for rank in range(world_size):
            ranges = ownership.prefill_positions(
                rank=rank, prompt_len=prompt_len, round_index=round_index
            )
            assert len(ranges) <= 2
            for start, end in ranges:
                assert round_start <= start < end <= round_end
                for token in range(start, end):
                    covered[token] += 1
                    page = token // page_size
                    assert ownership.owner(prompt_len=prompt_len, page_index=page) == rank
    assert covered == [1] * prompt_len


@pytest.mark.parametrize("world_size, page_size, chunk, prompt_len", CASES)
def test_causal_work_is_balanced_per_round(world_size, page_size, chunk, prompt_len):
    """A query token at position t attends to t + 1 keys; ranks' sums differ by < one chunk."""
    ownership = PageOwnership(
        world_size=world_size, page_size=page_size, prefill_chunk_tokens=chunk
    )
    for round_index in range(ownership.num_rounds(prompt_len=prompt_len)):
        work = []
        for rank in range(world_size):
            ranges = ownership.prefill_positions(
                rank=rank, prompt_len=prompt_len, round_index=round_index
            )
            work.append(sum(t + 1 for start, end in ranges for t in range(start, end)))
        chunks = ownership.round_chunks(prompt_len=prompt_len, round_index=round_index)
        round_end = min((round_index + 1) * ownership.round_tokens, prompt_len)
        full_round = round_end - round_index * ownership.round_tokens == ownership.round_tokens
        if full_round:
            assert len(set(work)) == 1, work
        else:
            chunk_tokens = max(end - first for first, end in chunks) * page_size
            assert max(work) - min(work) <= chunk_tokens * round_end, work


def test_full_round_of_two_ranks_is_zigzag():
    ownership = PageOwnership(world_size=2, page_size=4, prefill_chunk_tokens=8)
    # A round is 16 tokens = 4 pages = 4 chunks of one page: rank 0 has pages 0 and 3.
    assert ownership.local_pages(rank=0, prompt_len=16, num_pages=4) == [0, 3]
    assert ownership.local_pages(rank=1, prompt_len=16, num_pages=4) == [1, 2]
    assert ownership.prefill_positions(rank=0, prompt_len=16, round_index=0) == [(0, 4), (12, 16)]
    assert ownership.prefill_positions(rank=1, prompt_len=16, round_index=0) == [(4, 12)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_decode_pages_rotate(world_size):
    ownership = PageOwnership(world_size=world_size, page_size=4, prefill_chunk_tokens=8)
    rng = random.Random()
    prompt_len = rng.randint(1, 100)
    prompt_pages = ownership.num_pages(num_tokens=prompt_len)
    for extra in range(1, 3 * world_size + 2):
        num_pages = prompt_pages + extra
        for page in range(prompt_pages, num_pages):
            assert ownership.owner(prompt_len=prompt_len, page_index=page) == page % world_size
        counts = [
            sum(
                p >= prompt_pages
                for p in ownership.local_pages(rank=r, prompt_len=prompt_len, num_pages=num_pages)
            )
            for r in range(world_size)
        ]
        assert max(counts) - min(counts) <= 1


def test_world_size_one_owns_everything_in_order():
    ownership = PageOwnership(world_size=1, page_size=16, prefill_chunk_tokens=64)
    prompt_len = random.Random().randint(1, 500)
    assert ownership.local_pages(rank=0, prompt_len=prompt_len, num_pages=40) == list(range(40))
    rounds = ownership.num_rounds(prompt_len=prompt_len)
    ranges = [
        r
        for i in range(rounds)
        for r in ownership.prefill_positions(rank=0, prompt_len=prompt_len, round_index=i)
    ]
    expected = [(i * 64, min((i + 1) * 64, prompt_len)) for i in range(rounds)]
    assert ranges == expected


@pytest.mark.parametrize("world_size, page_size, chunk, prompt_len", CASES)
def test_boundary_page_stays_with_its_prefill_owner(world_size, page_size, chunk, prompt_len):
    ownership = PageOwnership(
        world_size=world_size, page_size=page_size, prefill_chunk_tokens=chunk
    )
    boundary = (prompt_len - 1) // page_size
    prefill_owner = ownership.owner(prompt_len=prompt_len, page_index=boundary)
    for seq_len in range(prompt_len, prompt_len + 3 * page_size + 1):
        num_pages = ownership.num_pages(num_tokens=seq_len)
        assert ownership.owner(prompt_len=prompt_len, page_index=boundary) == prefill_owner
        tail = ownership.tail_owner(prompt_len=prompt_len, seq_len=seq_len)
        assert tail == ownership.owner(prompt_len=prompt_len, page_index=num_pages - 1)
        # Local views: only the tail owner's last page may be partial.
        lens = [
            ownership.local_seq_len(rank=r, prompt_len=prompt_len, seq_len=seq_len)
            for r in range(world_size)
        ]
        assert sum(lens) == seq_len
        for rank, length in enumerate(lens):
            pages = ownership.local_pages(rank=rank, prompt_len=prompt_len, num_pages=num_pages)
            if rank == tail:
                assert pages[-1] == num_pages - 1
                assert len(pages) * page_size - length == num_pages * page_size - seq_len
            else:
                assert length == len(pages) * page_size


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
        ownership.local_pages(rank=2, prompt_len=10, num_pages=3)
    with pytest.raises(ValueError, match="round_index"):
        ownership.prefill_positions(rank=0, prompt_len=10, round_index=1)
    with pytest.raises(ValueError, match="prompt_len"):
        ownership.owner(prompt_len=0, page_index=0)
    with pytest.raises(ValueError, match="page_index"):
        ownership.owner(prompt_len=5, page_index=-1)
    with pytest.raises(ValueError, match="seq_len"):
        ownership.tail_owner(prompt_len=5, seq_len=0)
