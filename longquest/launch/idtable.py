"""A compact table of request ids for batch jobs of tens of millions of lines.

An id is kept as a 62-bit BLAKE2b digest of its key (``results.id_key``) in
open-addressing hash tables held in flat arrays: 8 bytes for the digest and the id's
state in the results file, 4 bytes for the input line it was first seen on. Between
50% and 75% full, 20M ids take 320-480 MB where a ``set[str]`` and a ``dict`` of line
numbers take several GB. Two distinct ids share a digest with odds about n^2 / 2^63
(1 in 20,000 for 20M ids); such an id would be taken for the other.
"""

from __future__ import annotations

import hashlib
from array import array

NOT_IN_RESULTS, RESULT, ERROR = 0, 1, 2
_STATE_BITS = 3  # the low two bits of a slot hold the state
# The table is split by the digest's top byte into shards that grow one at a time by a
# half, so memory stays within 12 / 0.5 bytes an id and no growth doubles it at once.
_SHARDS = 256
_MAX_LOAD = 0.75


def _digest(key: str) -> int:
    """The key's digest with its low two bits cleared and never zero (zero: empty slot)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & ~_STATE_BITS) or 4


class _Shard:
    """Linear probing over ``words`` (digest | state, 0 when empty) and ``lines``."""

    __slots__ = ("words", "lines", "count")

    def __init__(self, slots: int) -> None:
        self.words = array("Q", bytes(8 * slots))
        self.lines = array("I", bytes(4 * slots))
        self.count = 0

    def slot(self, digest: int) -> int:
        """The slot holding ``digest``, or the empty slot where it would go."""
        words, size = self.words, len(self.words)
        slot = (digest >> 2) % size
        while True:
            word = words[slot]
            if word == 0 or word & ~_STATE_BITS == digest:
                return slot
            slot = slot + 1 if slot + 1 < size else 0

    def find_or_insert(self, digest: int) -> int:
        slot = self.slot(digest)
        if self.words[slot] == 0:
            if self.count + 1 > _MAX_LOAD * len(self.words):
                self._grow()
                slot = self.slot(digest)
            self.words[slot] = digest
            self.count += 1
        return slot

    def _grow(self) -> None:
        old = (self.words, self.lines)
        slots = len(self.words) + len(self.words) // 2 + 16
        self.words, self.lines = array("Q", bytes(8 * slots)), array("I", bytes(4 * slots))
        for word, line in zip(*old):
            if word:
                slot = self.slot(word & ~_STATE_BITS)
                self.words[slot], self.lines[slot] = word, line


class IdTable:
    """Ids with their state in the results file (last row wins) and the input line
    they were first seen on (0: not seen in the input yet)."""

    def __init__(self) -> None:
        self._shards = [_Shard(16) for _ in range(_SHARDS)]

    def __len__(self) -> int:
        return sum(shard.count for shard in self._shards)

    def __eq__(self, other: object) -> bool:
        """Same ids, states and lines, inserted in the same order (tables read from one
        file compare equal; a changed file almost surely does not)."""
        if not isinstance(other, IdTable):
            return NotImplemented
        return all(
            a.words == b.words and a.lines == b.lines for a, b in zip(self._shards, other._shards)
        )

    __hash__ = None  # mutable

    def _locate(self, key: str, *, insert: bool) -> tuple[_Shard, int]:
        digest = _digest(key)
        shard = self._shards[digest >> 56]
        return shard, shard.find_or_insert(digest) if insert else shard.slot(digest)

    def record_row(self, key: str, *, error: bool) -> None:
        """A results-file row for ``key``: its state becomes RESULT or ERROR."""
        shard, slot = self._locate(key, insert=True)
        word = shard.words[slot] & ~_STATE_BITS
        shard.words[slot] = word | (ERROR if error else RESULT)

    def state(self, key: str) -> int:
        """NOT_IN_RESULTS, RESULT or ERROR: the state of ``key``'s last results row."""
        shard, slot = self._locate(key, insert=False)
        return shard.words[slot] & _STATE_BITS

    def is_done(self, key: str, *, retry_errors: bool) -> bool:
        """Whether ``key`` is not to be served again: it has a result row, or (without
        ``retry_errors``) an error row."""
        state = self.state(key)
        return state == RESULT or (state == ERROR and not retry_errors)

    def first_seen(self, key: str, *, line: int) -> int:
        """The input line ``key`` was first seen on; ``line`` (recorded) if this is the
        first time. Lines are numbered from 1 and below 2^32."""
        shard, slot = self._locate(key, insert=True)
        first = shard.lines[slot]
        if first == 0:
            shard.lines[slot] = first = line
        return first
