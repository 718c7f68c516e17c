"""The pool of physical KV pages: reservations, reference counts and the prefix index.

Plain Python, no torch. A page is in exactly one of three states:

- **empty**: no reference, nothing worth keeping; handed out first (low ids first).
- **held**: referenced by one or more sequences (``refs > 0``). A full prompt page a
  sequence published is also in the index, and other sequences whose prompts start with
  the same tokens take it by reference instead of computing it again.
- **idle**: no reference but still indexed: a cached page no request holds. Idle pages
  sit in an LRU and are evicted, oldest first, only when an allocation finds no empty
  page, so pages stay cached as long as the pool allows.

``num_free`` counts empty and idle pages, less the reservations: what admission may
still promise. Admission reserves every page a request will allocate, so an allocation
from a reservation never fails (it evicts idle pages where needed). A request that takes
an idle page by reference makes it held, so admission counts it as used.

A sequence releases its pages in reverse position order, so its last page enters the
LRU first: eviction is leaf first, and a page never outlives its parent in the cache
(a hit takes a page together with all the pages before it).

An index entry keeps the page's parent key and tokens: a lookup whose parent or tokens
differ is a miss (counted in ``rejected``), never someone else's context.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from longquest.engine.cache import CacheCapacityError


@dataclass(frozen=True, kw_only=True)
class PageEntry:
    """What a cached page holds: its key, its parent's key (the salt for page 0) and its
    tokens as bytes (see :mod:`longquest.engine.page_keys`)."""

    key: bytes
    parent: bytes
    tokens: bytes


class PagePool:
    """Hands out physical page ids ``0 .. num_pages - 1`` and caches full prompt pages."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._refs = [0] * num_pages
        # Pop from the end: low ids come out first, which keeps tests readable.
        self._empty = list(range(num_pages - 1, -1, -1))
        self._idle: OrderedDict[int, None] = OrderedDict()  # first: least recently released
        self._index: dict[bytes, int] = {}
        self._entry: list[PageEntry | None] = [None] * num_pages
        self._reserved = 0
        self.evictions = 0
        self.rejected = 0

    # ------------------------------------------------------------------ accounting
    @property
    def num_free(self) -> int:
        """Pages neither held nor reserved (empty or idle)."""
        return len(self._empty) + len(self._idle) - self._reserved

    @property
    def num_cached(self) -> int:
        """Pages in the prefix index (held or idle)."""
        return len(self._index)

    def refs(self, physical: int) -> int:
        """How many sequences hold page ``physical``."""
        return self._refs[physical]

    def is_idle(self, physical: int) -> bool:
        """Whether ``physical`` is cached and held by no sequence."""
        return physical in self._idle

    def reserve(self, count: int) -> None:
        """Promise ``count`` pages to a request before any work starts, or raise."""
        if count > self.num_free:
            raise CacheCapacityError(
                f"the request needs {count} more KV pages but only {self.num_free} of "
                f"{self.num_pages} are free"
            )
        self._reserved += count

    def release_reservation(self, count: int) -> None:
        """Return reserved-but-unused pages (a request finished early)."""
        if count > self._reserved:
            raise ValueError(f"releasing {count} reserved pages but only {self._reserved} are")
        self._reserved -= count

    # ----------------------------------------------------------------- page states
    def allocate(self, count: int, *, reserved: bool = False) -> list[int]:
        """Take ``count`` pages (held once each), from the caller's reservation when
        ``reserved``: empty pages first, then the least recently released idle pages."""
        if reserved:
            self.release_reservation(count)
        if count > self.num_free:
            raise CacheCapacityError(
                f"out of KV pages: asked for {count}, {self.num_free} of {self.num_pages} free"
            )
        pages = []
        for _ in range(count):
            if self._empty:
                physical = self._empty.pop()
            else:
                physical, _ = self._idle.popitem(last=False)
                del self._index[self._entry[physical].key]
                self._entry[physical] = None
                self.evictions += 1
            self._refs[physical] = 1
            pages.append(physical)
        return pages

    def take(self, pages: list[int]) -> None:
        """Hold cached ``pages`` once more each (a request reusing them)."""
        for physical in pages:
            if self._entry[physical] is None:
                raise ValueError(f"page {physical} is not cached; only cached pages are shared")
            self._idle.pop(physical, None)
            self._refs[physical] += 1

    def release(self, pages: list[int]) -> None:
        """Drop one hold of each of ``pages`` (given in position order), last first: a
        page nobody holds becomes idle if cached, else empty."""
        for physical in reversed(pages):
            if self._refs[physical] < 1:
                raise ValueError(f"releasing page {physical}, which nobody holds")
            self._refs[physical] -= 1
            if self._refs[physical]:
                continue
            if self._entry[physical] is None:
                self._empty.append(physical)
            else:
                self._idle[physical] = None

    # ------------------------------------------------------------------ the index
    def publish(self, physical: int, entry: PageEntry) -> bool:
        """Index held page ``physical`` under ``entry.key``; False (nothing changed) when
        the key is already indexed: the first copy is the shared one."""
        if self._refs[physical] < 1:
            raise ValueError(f"publishing page {physical}, which nobody holds")
        if entry.key in self._index or self._entry[physical] is not None:
            return False
        self._index[entry.key] = physical
        self._entry[physical] = entry
        return True

    def lookup(self, key: bytes, *, parent: bytes, tokens: bytes) -> int | None:
        """The cached page of ``key`` if its parent key and tokens match, else None."""
        physical = self._index.get(key)
        if physical is None:
            return None
        entry = self._entry[physical]
        if entry.parent != parent or entry.tokens != tokens:
            self.rejected += 1
            return None
        return physical

    def check(self) -> None:
        """Raise AssertionError unless the pool's invariants hold (for tests)."""
        empty, idle = set(self._empty), set(self._idle)
        assert len(empty) == len(self._empty), "a page is empty twice"
        assert not empty & idle, "a page is both empty and idle"
        for physical in range(self.num_pages):
            refs, entry = self._refs[physical], self._entry[physical]
            states = (physical in empty) + (physical in idle) + (refs > 0)
            assert refs >= 0 and states == 1, f"page {physical} is in {states} states"
            assert physical not in empty or entry is None, f"empty page {physical} is cached"
            assert physical not in idle or entry is not None, f"idle page {physical} uncached"
            if entry is not None:
                assert self._index.get(entry.key) == physical, f"page {physical} not indexed"
        assert len(self._index) == sum(e is not None for e in self._entry), "stale index"
        assert 0 <= self._reserved <= len(self._empty) + len(self._idle), "over-reserved"
