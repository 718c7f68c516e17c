"""The batch runner's look-ahead window: which parsed line to issue next.

Lines enter the window in file order as it has room (at most ``size`` lines and
``max_tokens`` prompt tokens, and at least one line). Each pick prefers the line that
shares the longest token prefix with the last line issued, so the questions on one
document go to the engine back to back and find the document's pages still cached.
Prefixes are compared through a signature: digests of the first 16, 32, 64, ... tokens
(doubling), so two prompts sharing P tokens agree on the entries up to the largest
power of two times 16 that is at most P. Ties go to the oldest line, and a line that
has waited ``size`` picks is issued next whatever it shares, so nothing starves and no
line moves more than about ``2 * size`` places.

The picks depend only on the lines and the order of the calls, so ranks that run the
same runner over the same file make the same picks.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

SIGNATURE_TOKENS = 16  # the shortest prefix compared; entries double from there

Item = TypeVar("Item")


def prefix_signature(token_ids: array) -> list[bytes]:
    """Digests of the first 16, 32, 64, ... tokens of ``token_ids`` (``array("i")``),
    as long as the prompt has that many; empty for a prompt under 16 tokens."""
    data = memoryview(token_ids).cast("B")
    signature, tokens = [], SIGNATURE_TOKENS
    while tokens <= len(token_ids):
        prefix = data[: tokens * token_ids.itemsize]
        signature.append(hashlib.blake2b(prefix, digest_size=8).digest())
        tokens *= 2
    return signature


class WindowReader(Generic[Item]):
    """A source read one item ahead, for a window of at most ``size`` items and
    ``max_tokens`` prompt tokens (and at least one item): the next item enters only once
    it fits."""

    def __init__(self, source: Iterator[Item], *, tokens_of, size: int, max_tokens: int) -> None:
        self._source, self.tokens_of = source, tokens_of
        self.size, self.max_tokens = size, max_tokens
        self._next: Item | None = None  # read from the source, not in the window yet
        self._exhausted = False

    def next_fitting(self, *, waiting: int, tokens: int) -> Item | None:
        """The next item if it fits a window holding ``waiting`` items of ``tokens``
        prompt tokens; None when it does not fit yet or the source is exhausted."""
        if waiting >= self.size:
            return None
        if self._next is None and not self._exhausted:
            self._next = next(self._source, None)
            self._exhausted = self._next is None
        if self._next is None:
            return None
        if waiting and tokens + len(self.tokens_of(self._next)) > self.max_tokens:
            return None  # it waits, read, until the window has room
        item, self._next = self._next, None
        return item


@dataclass
class _Waiting(Generic[Item]):
    item: Item
    signature: list[bytes]
    tokens: int
    entered: int  # picks made when it entered the window


class Lookahead(Generic[Item]):
    """Items from ``source`` (with their prompt ``array("i")`` given by ``tokens_of``)
    handed out one :meth:`pick` at a time, grouped by shared prefix."""

    def __init__(self, source: Iterator[Item], *, tokens_of, size: int, max_tokens: int) -> None:
        if size < 1 or max_tokens < 1:
            raise ValueError(
                f"look-ahead needs size >= 1 and max_tokens >= 1, got {size}, {max_tokens}"
            )
        self._reader = WindowReader(source, tokens_of=tokens_of, size=size, max_tokens=max_tokens)
        self.size, self.max_tokens = size, max_tokens
        self._waiting: dict[int, _Waiting[Item]] = {}
        self._order: deque[int] = deque()  # entry numbers in file order; picked ones lazily
        self._by_prefix: dict[bytes, deque[int]] = {}  # signature entry -> entry numbers
        self._entered = 0
        self._picks = 0
        self._tokens = 0
        self._last: list[bytes] = []

    def __len__(self) -> int:
        """Lines in the window now."""
        return len(self._waiting)

    def pick(self) -> Item | None:
        """The next item to issue, or None when the source is exhausted and the window
        is empty."""
        self._fill()
        if not self._waiting:
            return None
        while self._order[0] not in self._waiting:
            self._order.popleft()
        chosen = self._order[0]
        if self._picks - self._waiting[chosen].entered < self.size:
            chosen = self._longest_shared(default=chosen)
        waiting = self._waiting.pop(chosen)
        for key in waiting.signature:
            numbers = self._by_prefix[key]
            numbers.remove(chosen)
            if not numbers:
                del self._by_prefix[key]
        self._tokens -= waiting.tokens
        self._last = waiting.signature
        self._picks += 1
        return waiting.item

    def _longest_shared(self, *, default: int) -> int:
        """The oldest waiting line sharing the longest prefix with the last pick."""
        for key in reversed(self._last):
            numbers = self._by_prefix.get(key)
            if numbers:
                return numbers[0]
        return default

    def _fill(self) -> None:
        read = self._reader.next_fitting
        while (item := read(waiting=len(self._waiting), tokens=self._tokens)) is not None:
            self._enter(item)

    def _enter(self, item: Item) -> None:
        token_ids = self._reader.tokens_of(item)
        number = self._entered
        self._entered += 1
        waiting = _Waiting(
            item=item,
            signature=prefix_signature(token_ids),
            tokens=len(token_ids),
            entered=self._picks,
        )
        self._waiting[number] = waiting
        self._order.append(number)
        self._tokens += waiting.tokens
        for key in waiting.signature:
            self._by_prefix.setdefault(key, deque()).append(number)
