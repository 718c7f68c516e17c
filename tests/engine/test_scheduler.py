"""The step-wise scheduler: requests added mid-flight decode as generate decodes them,
a freed slot is taken in the next step, bad requests are refused alone, and a failing
step releases everything in flight."""

from __future__ import annotations

import pytest

from longquest.engine.config import QuestConfig, SamplingParams
from longquest.engine.scheduler import NewRequest, Scheduler
from tests.engine.test_engine import llama_dir, make_engine, random_prompt  # noqa: F401

QUEST = QuestConfig(token_budget=32, dense_layers=1)


def request(request_id, prompt, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, logprobs=0)
    return NewRequest(request_id=request_id, prompt=prompt, params=params)


def test_requests_added_mid_flight_equal_generate(llama_dir):  # noqa: F811
    engine = make_engine(llama_dir, quest=QUEST, chunk=20)
    prompts = [random_prompt(n, 1000, n) for n in (5, 47, 90, 33)]
    lengths = [3, 12, 6, 5]
    free = engine.allocator.num_free
    scheduler = Scheduler(engine)
    outputs = {}
    first = scheduler.step([request(i, prompts[i], lengths[i]) for i in (0, 1)])
    assert first.finished == [] and first.refused == {}
    steps = 1
    while scheduler.num_unfinished:
        new = [request(i, prompts[i], lengths[i]) for i in (2, 3)] if steps == 2 else []
        for output in scheduler.step(new).finished:
            outputs[output.request_id] = output
        steps += 1
    # Request 0 (3 tokens) finished before the others.
    assert engine.allocator.num_free == free and sorted(outputs) == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        (alone,) = engine.generate([prompt], [SamplingParams(max_tokens=lengths[i], logprobs=0)])
        assert outputs[i].token_ids == alone.token_ids
        for a, b in zip(outputs[i].logprobs, alone.logprobs):
            for token, value in a.items():
                assert value == pytest.approx(b[token], abs=1e-5)


def test_a_freed_slot_is_taken_in_the_next_step(llama_dir):  # noqa: F811
    """A cache of 8 pages of 16 holds two 50-token requests: the third waits, and is
    prefilled in the step right after the short one finishes, while the long one runs."""
    engine = make_engine(llama_dir, quest=QUEST, num_pages=8)
    prefilled = []
    prefill = engine.prefill

    def recording_prefill(seq, **kwargs):
        prefilled.append((seq.request_id, step))
        prefill(seq, **kwargs)

    engine.prefill = recording_prefill
    scheduler = Scheduler(engine)
    requests = [request(i, random_prompt(50, 1000, i), n) for i, n in enumerate((2, 10, 2))]
    finished_at = {}
    for step in range(12):
        for output in scheduler.step(requests if step == 0 else []).finished:
            finished_at[output.request_id] = step
        if not scheduler.num_unfinished:
            break
    assert prefilled[:2] == [(0, 0), (1, 0)]
    assert prefilled[2] == (2, finished_at[0] + 1)
    assert finished_at[2] < finished_at[1]


def test_bad_requests_are_refused_alone(llama_dir):  # noqa: F811
    engine = make_engine(llama_dir, quest=QUEST, num_pages=8)
    scheduler = Scheduler(engine)
    good = request(1, random_prompt(10, 1000, 1), 5)
    result = scheduler.step([request(0, [], 2), good, request(2, random_prompt(500, 1000, 2), 2)])
    assert set(result.refused) == {0, 2} and "cache" in result.refused[2]
    with pytest.raises(ValueError, match="already in flight"):
        scheduler.add(good)
    while scheduler.num_unfinished:
        result = scheduler.step()
    assert [o.request_id for o in result.finished] == [1]


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_a_failing_step_releases_everything_in_flight(llama_dir, where):  # noqa: F811
    engine = make_engine(llama_dir, quest=QUEST, num_pages=16)
    free = engine.allocator.num_free
    scheduler = Scheduler(engine)
    scheduler.step([request(0, random_prompt(40, 1000, 0), 8)])
    broken = getattr(engine, where)

    def fails(*args, **kwargs):
        raise RuntimeError("device lost")

    setattr(engine, where, fails)
    new = [request(1, random_prompt(30, 1000, 1), 8)]
    with pytest.raises(RuntimeError, match="device lost"):
        scheduler.step(new)
    assert scheduler.num_unfinished == 0 and engine.allocator.num_free == free
    setattr(engine, where, broken)
    while not (result := scheduler.step(new)).finished:
        new = []
    assert result.finished[0].request_id == 1
