"""The replicas' shared queue: lines sharing a long prefix stay with the replica that
holds it, short shared prefixes pin nothing, a lost replica's lines go first, an idle
replica always gets work, and nothing waits forever."""

from __future__ import annotations

from array import array

import pytest

from longquest.launch.routing import STICKY_TOKENS, SharedQueue


def doc(number: int, question: int, *, length: int = 2 * STICKY_TOKENS) -> tuple[str, array]:
    """A line asking question ``question`` of document ``number``."""
    body = [1000 * (number + 1) + i for i in range(length)]
    return f"d{number}q{question}", array("i", body + [7, question])


def queue(lines, *, replicas: int = 2, size: int = 64) -> SharedQueue:
    return SharedQueue(
        iter(lines), tokens_of=lambda line: line[1], replicas=replicas, size=size,
        max_tokens=1 << 30,
    )  # fmt: skip


def names(picked) -> list[str]:
    return [line[0] for line in picked]


def test_a_documents_questions_stay_with_the_replica_that_took_it():
    lines = [doc(d, q) for q in range(3) for d in range(2)]  # questions interleaved
    shared = queue(lines)
    first = [shared.pick(0, idle=True), shared.pick(1, idle=True)]
    assert names(first) == ["d0q0", "d1q0"]
    # Replica 1 asks first: it gets its own document's questions, never replica 0's.
    assert names([shared.pick(1, idle=False), shared.pick(1, idle=False)]) == ["d1q1", "d1q2"]
    assert shared.pick(1, idle=False) is None
    assert names([shared.pick(0, idle=False), shared.pick(0, idle=False)]) == ["d0q1", "d0q2"]
    assert shared.done()


def test_a_short_shared_prefix_pins_nothing():
    system = list(range(STICKY_TOKENS - 16))  # a system prompt every line starts with
    lines = [(f"l{i}", array("i", system + [500 + i] * 40)) for i in range(4)]
    shared = queue(lines)
    assert names([shared.pick(0, idle=True), shared.pick(0, idle=False)]) == ["l0", "l1"]
    assert names([shared.pick(1, idle=False)]) == ["l2"]


def test_an_idle_replica_takes_another_replicas_line_and_then_shares_it():
    lines = [doc(0, q) for q in range(4)]
    shared = queue(lines)
    assert names([shared.pick(0, idle=True)]) == ["d0q0"]
    assert shared.pick(1, idle=False) is None  # busy elsewhere: it leaves d0 to replica 0
    assert names([shared.pick(1, idle=True)]) == ["d0q1"]  # idle: it takes one
    assert names([shared.pick(1, idle=False)]) == ["d0q2"]  # and now holds d0 too


def test_a_lost_replicas_lines_go_first_and_to_the_living():
    lines = [doc(0, 0), doc(1, 0), doc(0, 1), doc(2, 0)]
    shared = queue(lines)
    taken = shared.pick(1, idle=True)
    shared.forget(1)
    shared.requeue([taken])
    assert names([shared.pick(0, idle=True)]) == ["d0q0"]  # requeued: first in line
    assert names([shared.pick(0, idle=False)]) == ["d0q1"]


def test_no_line_waits_more_than_the_window():
    lines = [doc(0, 0), doc(1, 0)] + [doc(0, q) for q in range(1, 6)]
    shared = queue(lines, size=3)
    order = [shared.pick(0, idle=True)] + [shared.pick(0, idle=False) for _ in range(6)]
    assert "d1q0" in names(order[:5])
    assert len(set(names(order))) == 7


def test_the_window_refuses_bad_sizes():
    with pytest.raises(ValueError, match="replicas >= 1"):
        queue([], replicas=0)
