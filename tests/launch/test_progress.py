"""The progress bars of ``generate``: which reports make a bar, and that the bar holds
every report as it comes (tqdm replaced by a recorder: no terminal rendering tested)."""

from __future__ import annotations

import pytest

from longquest.launch import api


class Recorder:
    """Stands in for tqdm: records each bar's position at every redraw."""

    made: list[Recorder] = []

    def __init__(self, *, total, desc, unit, leave):
        self.total, self.desc, self.n = total, desc, 0
        self.shown: list[int] = []
        self.closed = False
        Recorder.made.append(self)

    def update(self, count):
        self.n += count

    def refresh(self):
        self.shown.append(self.n)

    def close(self):
        self.closed = True


@pytest.fixture
def recorder(monkeypatch):
    Recorder.made = []
    monkeypatch.setattr(api, "tqdm", Recorder)
    return Recorder


def test_a_prefill_bar_advances_per_chunk_from_its_start(recorder):
    bars = api.progress_callback(True, prefill_chunk_tokens=8192)
    for done in (0, 8192, 12000):  # a 12K prompt in chunks of 8192
        bars("prefill", done, 12000)
    (bar,) = recorder.made
    assert (bar.desc, bar.total, bar.shown, bar.closed) == (
        "prefill",
        12000,
        [0, 8192, 12000],
        True,
    )


@pytest.mark.parametrize(
    ("chunk", "total", "shown"),
    [(8192, 7000, True), (8192, 2048, False), (1024, 1500, True), (1024, 1024, False)],
)
def test_a_prompt_longer_than_a_chunk_or_a_few_thousand_tokens_gets_a_bar(
    recorder, chunk, total, shown
):
    bars = api.progress_callback(True, prefill_chunk_tokens=chunk)
    bars("prefill", 0, total)
    bars("prefill", total, total)
    assert bool(recorder.made) == shown


def test_close_clears_bars_left_open(recorder):
    bars = api.progress_callback(True, prefill_chunk_tokens=256)
    bars("prefill", 0, 1000)
    bars("requests", 1, 3)
    bars.close()
    assert len(recorder.made) == 2 and all(bar.closed for bar in recorder.made)
    assert api.progress_callback(False, prefill_chunk_tokens=256) is None
