"""The work queue that data-parallel replicas share: which waiting line a replica takes.

Lines enter a bounded window in file order, as in longquest.launch.lookahead (at most
``size`` lines and ``max_tokens`` prompt tokens, and at least one line), each with its
prompt's prefix signature (``prefix_signature``: digests of the first 16, 32, 64, ...
tokens). A replica that takes a line becomes a holder of the line's signature entries of
``STICKY_TOKENS`` tokens or more: its prefix cache now has those pages. A waiting line's
holders are the living holders of its longest held entry; shorter shared prefixes (a
common system prompt) are cheap to prefill again and pin nothing, so such lines go to
whichever replica asks first.

A replica asking for work takes, in this order: the oldest line if it has waited
``size`` picks (nothing starves); the line sharing the longest held prefix with the last
line it took (a document's questions back to back, while its pages are cached); the
oldest line it holds or nobody holds; and, only when it has nothing in flight, the
oldest line at all (it would otherwise idle; it becomes a second holder of that prefix).
Lines handed back from a lost replica (:meth:`SharedQueue.requeue`) go first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from longquest.launch.lookahead import SIGNATURE_TOKENS, WindowReader, prefix_signature

# Shared prefixes shorter than this do not tie lines to a replica: re-prefilling them
# costs little, and a system prompt every line starts with would send all to one.
STICKY_TOKENS = 256
_FIRST_STICKY = (STICKY_TOKENS // SIGNATURE_TOKENS).bit_length() - 1  # its signature index
# Signature entries whose holders are remembered, least recently taken forgotten first:
# a replica's prefix cache keeps far fewer pages than this.
HELD_ENTRIES = 1 << 16

Item = TypeVar("Item")


@dataclass
class _Waiting(Generic[Item]):
    item: Item
    sticky: list[bytes]  # signature entries of STICKY_TOKENS tokens or more
    tokens: int
    entered: int  # picks made when it entered the window


class SharedQueue(Generic[Item]):
    """Items from ``source`` (prompt ``array("i")`` given by ``tokens_of``) handed to
    replicas ``0 .. replicas - 1`` one :meth:`pick` at a time."""

    def __init__(
        self,
        source: Iterator[Item],
        *,
        tokens_of: Callable[[Item], object],
        replicas: int,
        size: int,
        max_tokens: int,
    ) -> None:
        if size < 1 or max_tokens < 1 or replicas < 1:
            raise ValueError(
                f"the shared queue needs size, max_tokens and replicas >= 1, got {size}, "
                f"{max_tokens}, {replicas}"
            )
        self._reader = WindowReader(source, tokens_of=tokens_of, size=size, max_tokens=max_tokens)
        self.size, self.max_tokens = size, max_tokens
        self.alive = set(range(replicas))
        self._waiting: dict[int, _Waiting[Item]] = {}
        self._order: deque[int] = deque()  # waiting entry numbers, oldest first
        self._by_entry: dict[bytes, deque[int]] = {}  # sticky entry -> waiting numbers
        self._holders: OrderedDict[bytes, set[int]] = OrderedDict()
        self._last: dict[int, list[bytes]] = {}  # replica -> sticky entries of its last line
        self._entered = self._picks = self._tokens = 0

    def __len__(self) -> int:
        """Lines waiting in the window now."""
        return len(self._waiting)

    def done(self) -> bool:
        """Whether every line has been picked (none waiting, none left to read)."""
        self._fill()
        return not self._waiting

    def pick(self, replica: int, *, idle: bool) -> Item | None:
        """The next line for ``replica`` (``idle``: it has nothing in flight), or None
        when no line suits it now."""
        self._fill()
        if not self._waiting:
            return None
        oldest = self._order[0]
        chosen = None
        if self._picks - self._waiting[oldest].entered >= self.size:
            chosen = oldest
        if chosen is None:
            chosen = self._sharing_last(replica)
        if chosen is None:
            chosen = next((n for n in self._order if self._suits(n, replica)), None)
        if chosen is None and idle:
            chosen = oldest
        return None if chosen is None else self._take(chosen, replica)

    def requeue(self, items: Iterable[Item]) -> None:
        """Put ``items`` (a lost replica's lines) back; they go before every other line."""
        for item in reversed(list(items)):
            number = self._enter(item, entered=self._picks - self.size)
            self._order.remove(number)
            self._order.appendleft(number)

    def forget(self, replica: int) -> None:
        """``replica`` is gone: it holds nothing and takes nothing."""
        self.alive.discard(replica)
        self._last.pop(replica, None)

    def _holders_of(self, waiting: _Waiting[Item]) -> set[int]:
        for key in reversed(waiting.sticky):
            holders = self._holders.get(key, set()) & self.alive
            if holders:
                return holders
        return set()

    def _suits(self, number: int, replica: int) -> bool:
        holders = self._holders_of(self._waiting[number])
        return not holders or replica in holders

    def _sharing_last(self, replica: int) -> int | None:
        """The oldest waiting line sharing the longest sticky prefix with ``replica``'s
        last line, when ``replica`` still holds that prefix."""
        for key in reversed(self._last.get(replica, [])):
            numbers = self._by_entry.get(key)
            if numbers and self._suits(numbers[0], replica):
                return numbers[0]
        return None

    def _take(self, number: int, replica: int) -> Item:
        waiting = self._waiting.pop(number)
        self._order.remove(number)
        for key in waiting.sticky:
            numbers = self._by_entry[key]
            numbers.remove(number)
            if not numbers:
                del self._by_entry[key]
            self._holders.setdefault(key, set()).add(replica)
            self._holders.move_to_end(key)
        while len(self._holders) > HELD_ENTRIES:
            self._holders.popitem(last=False)
        self._tokens -= waiting.tokens
        self._last[replica] = waiting.sticky
        self._picks += 1
        return waiting.item

    def _fill(self) -> None:
        read = self._reader.next_fitting
        while (item := read(waiting=len(self._waiting), tokens=self._tokens)) is not None:
            self._enter(item, entered=self._picks)

    def _enter(self, item: Item, *, entered: int) -> int:
        token_ids = self._reader.tokens_of(item)
        number = self._entered
        self._entered += 1
        sticky = prefix_signature(token_ids)[_FIRST_STICKY:]
        self._waiting[number] = _Waiting(
            item=item, sticky=sticky, tokens=len(token_ids), entered=entered
        )
        self._order.append(number)
        self._tokens += len(token_ids)
        for key in sticky:
            self._by_entry.setdefault(key, deque()).append(number)
        return number
