"""The page pool: reservations, reference counts, the prefix index and its LRU eviction
(plain Python, no device)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from longquest.engine.cache import CacheCapacityError
from longquest.engine.page_keys import page_keys, page_tokens
from longquest.engine.page_pool import PageEntry, PagePool

SALT = b"salt"
PAGE = 4


def entries(tokens: list[int]) -> list[PageEntry]:
    """The index entries of ``tokens``' full pages."""
    keys = page_keys(tokens, page_size=PAGE, salt=SALT)
    return [
        PageEntry(key=key, parent=keys[i - 1] if i else SALT,
                  tokens=page_tokens(tokens, page_index=i, page_size=PAGE))
        for i, key in enumerate(keys)
    ]  # fmt: skip


def find(pool: PagePool, entry: PageEntry) -> int | None:
    return pool.lookup(entry.key, parent=entry.parent, tokens=entry.tokens)


def test_reserve_allocate_release_without_caching():
    pool = PagePool(6)
    assert pool.num_free == 6
    pool.reserve(4)
    assert pool.num_free == 2
    with pytest.raises(CacheCapacityError, match="only 2 of 6"):
        pool.reserve(3)
    pages = pool.allocate(3, reserved=True)
    assert pages == [0, 1, 2] and pool.num_free == 2
    with pytest.raises(CacheCapacityError, match="out of KV pages"):
        pool.allocate(3)
    pool.release(pages)
    pool.release_reservation(1)
    assert pool.num_free == 6 and pool.num_cached == 0
    assert pool.allocate(1) == [0]  # low ids first again
    with pytest.raises(ValueError, match="nobody holds"):
        pool.release([3])
    pool.check()


def test_published_pages_go_idle_and_are_taken_by_reference():
    pool = PagePool(8)
    doc = entries(list(range(3, 15)))  # 3 full pages
    pages = pool.allocate(4)  # 3 prompt pages and a decode page
    for physical, entry in zip(pages, doc):
        assert pool.publish(physical, entry)
    assert [find(pool, e) for e in doc] == pages[:3]
    pool.release(pages)
    assert pool.num_free == 8 and pool.num_cached == 3
    assert all(pool.is_idle(p) for p in pages[:3]) and not pool.is_idle(pages[3])
    pool.take(pages[:2])
    pool.take(pages[:1])
    assert [pool.refs(p) for p in pages[:3]] == [2, 1, 0]
    assert pool.num_free == 6 and pool.is_idle(pages[2])
    with pytest.raises(ValueError, match="not cached"):
        pool.take([pages[3]])
    pool.release(pages[:1])
    pool.release(pages[:2])
    assert pool.num_free == 8 and pool.num_cached == 3
    pool.check()


def test_eviction_is_lazy_least_recent_and_leaf_first():
    pool = PagePool(6)
    a, b = entries(list(range(3, 15))), entries(list(range(100, 112)))
    first = pool.allocate(3)
    for physical, entry in zip(first, a):
        pool.publish(physical, entry)
    pool.release(first)  # idle, tail first: page 2, 1, 0 of a
    second = pool.allocate(3)  # empty pages first: nothing evicted yet
    assert not set(first) & set(second) and pool.evictions == 0
    for physical, entry in zip(second, b):
        pool.publish(physical, entry)
    pool.release(second)
    # Room is made from the oldest idle pages: a's last page first, then the one before.
    got = pool.allocate(2)
    assert got == [first[2], first[1]] and pool.evictions == 2
    assert find(pool, a[2]) is None and find(pool, a[1]) is None
    assert find(pool, a[0]) == first[0] and find(pool, b[2]) == second[2]
    pool.check()


def test_a_reservation_is_served_by_evicting_idle_pages():
    pool = PagePool(4)
    doc = entries(list(range(3, 19)))
    pages = pool.allocate(4)
    for physical, entry in zip(pages, doc):
        pool.publish(physical, entry)
    pool.release(pages)
    pool.reserve(4)  # every page is idle: all of them may still be promised
    assert pool.num_free == 0
    assert sorted(pool.allocate(4, reserved=True)) == sorted(pages)
    assert pool.num_cached == 0 and pool.evictions == 4
    pool.check()


def test_the_first_copy_is_the_shared_one():
    pool = PagePool(4)
    (entry,) = entries([5, 6, 7, 8])
    one, two = pool.allocate(2)
    assert pool.publish(one, entry)
    assert not pool.publish(two, entry)  # a duplicate stays private
    assert not pool.publish(one, entries([1, 2, 3, 4])[0])  # a page holds one entry
    pool.release([two])
    assert not pool.is_idle(two) and find(pool, entry) == one
    pool.release([one])
    assert pool.is_idle(one)
    with pytest.raises(ValueError, match="nobody holds"):
        pool.publish(two, entries([1, 2, 3, 4])[0])
    pool.check()


def test_a_forged_collision_is_a_miss():
    """An entry found under a key whose parent or tokens differ is not taken."""
    pool = PagePool(4)
    (real,) = entries([5, 6, 7, 8])
    (physical,) = pool.allocate(1)
    pool.publish(physical, real)
    wrong_tokens = PageEntry(key=real.key, parent=real.parent, tokens=real.tokens[::-1])
    wrong_parent = PageEntry(key=real.key, parent=b"other", tokens=real.tokens)
    assert find(pool, wrong_tokens) is None and find(pool, wrong_parent) is None
    assert pool.rejected == 2 and find(pool, real) == physical


# ----------------------------------------------------------------- state machine
@dataclass
class Request:
    """What the engine keeps of a request: its keys, its pages, its reservation."""

    tokens: list[int]
    total_pages: int
    keys: list[PageEntry]
    hit: int = 0
    pages: list[tuple[int, int]] = field(default_factory=list)
    reserved: int = 0
    prefilled: bool = False


def admit(pool: PagePool, tokens: list[int], max_pages: int) -> Request | None:
    """The engine's admission on one device: the longest cached prefix below the page
    of the last token, taken by reference, and a reservation for the rest."""
    request = Request(tokens=tokens, total_pages=-(-len(tokens) // PAGE) + max_pages,
                      keys=entries(tokens))  # fmt: skip
    shared = []
    for page in range((len(tokens) - 1) // PAGE):
        physical = find(pool, request.keys[page])
        if physical is None:
            break
        shared.append((page, physical))
    rest = request.total_pages - len(shared)
    if rest + sum(pool.is_idle(p) for _, p in shared) > pool.num_free:
        return None
    pool.take([p for _, p in shared])
    pool.reserve(rest)
    request.hit, request.pages, request.reserved = len(shared), shared, rest
    return request


def grow(pool: PagePool, request: Request, count: int) -> None:
    count = min(count, request.reserved)
    for physical in pool.allocate(count, reserved=True):
        request.pages.append((len(request.pages), physical))
    request.reserved -= count


def finish_prefill(pool: PagePool, request: Request) -> None:
    grow(pool, request, -(-len(request.tokens) // PAGE) - len(request.pages))
    for page, physical in request.pages[request.hit : len(request.keys)]:
        if not pool.publish(physical, request.keys[page]):
            break  # as the engine: the pages after a duplicate stay private
    request.prefilled = True


def release(pool: PagePool, request: Request) -> None:
    pool.release([p for _, p in request.pages])
    pool.release_reservation(request.reserved)


def state(pool: PagePool) -> tuple:
    return (list(pool._refs), list(pool._empty), list(pool._idle), dict(pool._index),
            list(pool._entry), pool._reserved)  # fmt: skip


def check(pool: PagePool, running: list[Request]) -> None:
    pool.check()
    assert pool.num_free >= 0
    held = {}
    for request in running:
        for page, physical in request.pages:
            held[physical] = held.get(physical, 0) + 1
            if page < request.hit:  # a shared page stays cached while it is held
                assert find(pool, request.keys[page]) == physical
    assert held == {p: pool.refs(p) for p in range(pool.num_pages) if pool.refs(p)}
    assert sum(r.reserved for r in running) == pool._reserved
    # No idle page is older in the LRU than an idle descendant: eviction is leaf first.
    order = {physical: i for i, physical in enumerate(pool._idle)}
    for physical in order:
        parent = pool._index.get(pool._entry[physical].parent)
        if parent is not None and parent in order:
            assert order[parent] > order[physical]


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_the_invariants(seed):
    rng = random.Random(seed)
    pool = PagePool(rng.choice([8, 12, 20]))
    documents = [[rng.randrange(3, 50) for _ in range(rng.randrange(4, 30))] for _ in range(4)]
    running: list[Request] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.35:
            doc = rng.choice(documents)
            tokens = doc[: rng.randrange(1, len(doc) + 1)]
            tokens += [rng.randrange(3, 50) for _ in range(rng.randrange(0, 6))]
            before = state(pool)
            request = admit(pool, tokens, rng.randrange(1, 4))
            if request is None:
                assert state(pool) == before  # a request that waits changes nothing
            else:
                running.append(request)
        elif op < 0.6 and running:
            request = rng.choice(running)
            if request.prefilled:
                grow(pool, request, 1)  # a decode step
            else:
                finish_prefill(pool, request)
        elif op < 0.7 and running:
            request = rng.choice([r for r in running if not r.prefilled] or running)
            if not request.prefilled:  # a failed prefill: some pages, nothing published
                grow(pool, request, rng.randrange(0, 3))
            running.remove(request)
            release(pool, request)
        elif running:
            request = rng.choice(running)
            running.remove(request)
            release(pool, request)
        check(pool, running)
    for request in running:
        release(pool, request)
    check(pool, [])
    assert pool.num_free == pool.num_pages
