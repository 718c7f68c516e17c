"""The streaming batch runner: the in-flight limit, a freed slot refilled at once, lines
that share a prompt prefix issued together, bounded reordering, memory bounded by the
look-ahead window, and the failure fallback under streaming. Engines are fakes that
answer through the step seam."""

from __future__ import annotations

import json
import random
import tracemalloc
from array import array

import pytest

from longquest.engine.scheduler import StepResult
from longquest.engine.sequence import RequestOutput
from longquest.launch.batch import run_batch
from longquest.launch.lookahead import Lookahead
from tests.launch.test_batch import FakeTokenizer, rows, write_input


def output(request, text="ok"):
    return RequestOutput(
        request_id=request.request_id, prompt_token_ids=request.prompt, text=text,
        token_ids=[1] * request.params.max_tokens, logprobs=None, finish_reason="length",
        prefill_seconds=0.0, decode_seconds=0.0, pages_attended=1, pages_total=1,
    )  # fmt: skip


class StepEngine:
    """A request finishes after ``max_tokens`` steps; records what each step got."""

    def __init__(self, fail_on=None):
        self.left = {}
        self.requests = {}
        self.steps = []  # per step: (prompts added, requests in flight after adding)
        self.most_in_flight = 0
        self.fail_on = fail_on

    def __call__(self, new):
        for request in new:
            self.left[request.request_id] = request.params.max_tokens
            self.requests[request.request_id] = request
        self.steps.append(([r.prompt for r in new], len(self.left)))
        self.most_in_flight = max(self.most_in_flight, len(self.left))
        if self.fail_on is not None and any(
            self.requests[i].prompt == self.fail_on for i in self.left
        ):
            self.left.clear()  # the engine releases everything in flight
            raise RuntimeError("index out of range")
        finished = []
        for request_id in list(self.left):
            self.left[request_id] -= 1
            if self.left[request_id] == 0:
                del self.left[request_id]
                finished.append(output(self.requests.pop(request_id)))
        return StepResult(finished=finished)


def serve(tmp_path, lines, engine, **options):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, [json.dumps(line) for line in lines])
    options.setdefault("progress", False)
    summary = run_batch(
        input_path=src, output_path=dst, step=engine, tokenizer=FakeTokenizer(), **options
    )
    return summary, rows(dst)


def test_in_flight_stays_under_the_limit_and_a_freed_slot_is_refilled_at_once(tmp_path):
    # Word lengths are the tokens: "x" * (i + 1) tells the lines apart.
    lengths = [1, 6, 6, 2, 1, 1, 3, 6]
    lines = [{"id": i, "prompt": "x" * (i + 1), "max_tokens": n} for i, n in enumerate(lengths)]
    engine = StepEngine()
    summary, out = serve(tmp_path, lines, engine, group_size=3)
    assert engine.most_in_flight == 3
    assert all(in_flight <= 3 for _, in_flight in engine.steps)
    # Line 0 finishes in the first step; line 3 takes its place in the second, while
    # lines 1 and 2 (6 steps each) are still running.
    assert engine.steps[0][0] == [[1], [2], [3]]
    assert engine.steps[1][0] == [[4]]
    assert summary["served"] == len(lines) and {r["id"] for r in out} == set(range(8))
    # Rows come in finish order: the short requests before the long ones.
    assert [r["id"] for r in out][:2] == [0, 3]


def document_question(doc, question):
    """A prompt of 40 words of ``doc``'s length then a question: a 40-token shared prefix."""
    return {"id": f"{doc}{question}", "prompt": " ".join(["d" * doc] * 40 + ["q" * question])}


def test_interleaved_documents_are_issued_grouped_by_prefix(tmp_path):
    lines = [document_question(doc, q) for q in range(1, 4) for doc in (3, 5)]  # A B A B A B
    engine = StepEngine()
    summary, _ = serve(tmp_path, lines, engine, group_size=1)
    issued = [prompts[0][0] for prompts, _ in engine.steps if prompts]
    assert issued == [3, 3, 3, 5, 5, 5]
    assert summary["served"] == 6


def test_no_line_waits_more_than_about_two_windows():
    """Every item shares a prefix with many others, the worst case for starvation."""
    rng = random.Random(0)
    prompts = [array("i", [rng.randrange(4)] * 32 + [i]) for i in range(500)]
    size = 8
    window = Lookahead(iter(range(500)), tokens_of=prompts.__getitem__, size=size, max_tokens=10**6)
    order = [window.pick() for _ in range(500)]
    assert window.pick() is None and sorted(order) == list(range(500))
    assert max(position - item for position, item in enumerate(order)) <= 2 * size


def test_the_window_holds_at_most_its_tokens_but_always_one_line():
    prompts = [array("i", [7] * 100) for _ in range(5)]
    window = Lookahead(iter(range(5)), tokens_of=prompts.__getitem__, size=4, max_tokens=250)
    assert window.pick() == 0 and len(window) == 1  # 3 lines would hold 300 tokens
    small = Lookahead(iter(range(5)), tokens_of=prompts.__getitem__, size=4, max_tokens=50)
    assert [small.pick() for _ in range(6)] == [0, 1, 2, 3, 4, None]


def test_a_failing_step_costs_only_the_culprit_its_row(tmp_path):
    lines = [{"id": i, "prompt": "x" * (i + 1) + " y", "max_tokens": 2} for i in range(6)]
    engine = StepEngine(fail_on=[4, 1])  # line 3; the probe, its first token, is served
    summary, out = serve(tmp_path, lines, engine, group_size=3)
    by_id = {r["id"]: r for r in out}
    assert "internal error" in by_id[3]["error"] and "index out of range" in by_id[3]["error"]
    assert all("text" in by_id[i] for i in (0, 1, 2, 4, 5))
    assert summary == {"served": 5, "errors": 1, "skipped": 0, "tokens": 10}


def test_refused_requests_get_their_rows_and_the_rest_is_served(tmp_path):
    class Refuses(StepEngine):
        def __call__(self, new):
            refused = {r.request_id: "prompt 0 is too long" for r in new if len(r.prompt) > 1}
            result = super().__call__([r for r in new if r.request_id not in refused])
            result.refused = refused
            return result

    lines = [{"id": "ok", "prompt": "a"}, {"id": "long", "prompt": "a b"}]
    summary, out = serve(tmp_path, lines, Refuses())
    by_id = {r["id"]: r for r in out}
    assert by_id["long"]["error"] == 'request id="long" (input line 2) is too long'
    assert "text" in by_id["ok"] and summary["errors"] == 1


def test_memory_is_bounded_by_the_window_not_the_file(tmp_path):
    """50 MB of lines: the runner holds the window, the id table (at most 24 bytes a
    line) and one line at a time, never the file."""
    src = tmp_path / "in.jsonl"
    line = 0
    with open(src, "w") as handle:
        while handle.tell() < 50 * 2**20:
            words = " ".join("w" * (1 + (line + k) % 79) for k in range(40))  # 1.6 KB
            handle.write(json.dumps({"id": line, "prompt": words, "max_tokens": 1}) + "\n")
            line += 1

    def answer(new):
        return StepResult(finished=[output(r) for r in new])

    tracemalloc.start()
    try:
        summary = run_batch(
            input_path=src, output_path=tmp_path / "out.jsonl", step=answer,
            tokenizer=FakeTokenizer(), group_size=8, lookahead=64, write=False, progress=False,
        )  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary["served"] == line
    assert peak < 32 * line + 4 * 2**20, f"peak {peak / 2**20:.1f} MiB for {line} lines"


@pytest.mark.parametrize("group_size", [1, 4])
def test_resume_after_a_kill_mid_stream(tmp_path, group_size):
    lines = [{"id": i, "prompt": "x" * (i + 1), "max_tokens": 1 + i % 3} for i in range(12)]

    class Dies(StepEngine):
        def __call__(self, new):
            if len(self.steps) == 5:
                raise KeyboardInterrupt
            return super().__call__(new)

    with pytest.raises(KeyboardInterrupt):
        serve(tmp_path, lines, Dies(), group_size=group_size)
    first = [r["id"] for r in rows(tmp_path / "out.jsonl")]
    assert 0 < len(first) < 12
    engine = StepEngine()
    summary, out = serve(tmp_path, lines, engine, group_size=group_size)
    assert summary["skipped"] == len(first) and summary["served"] == 12 - len(first)
    assert sorted(r["id"] for r in out) == list(range(12))
