"""A line whose request fails inside a replica's step costs no replica: it gets one error
row, every other line its answer, and no replica is lost; a replica that fails every
step is lost and its lines go to the others. The replicas are Ray actors that stand in
for engine ranks (a step finishes each request at once and raises, dropping what is in
flight as the scheduler does, while a request holds the token ``BAD``)."""

from __future__ import annotations

import json
from array import array

import pytest

from longquest.engine.config import SamplingParams
from longquest.engine.scheduler import NewRequest, StepResult
from longquest.engine.sequence import RequestOutput
from longquest.launch.routing import SharedQueue
from longquest.launch.stream import BatchItem

ray = pytest.importorskip("ray")

from longquest.launch.dispatch import ReplicaFeeder  # noqa: E402

BAD = 13


@ray.remote(num_cpus=0)
class FakeRank:
    """``failure``: "value" (a ValueError), "runtime" (another exception; the rank still
    serves), or "always" (every step raises: a broken device)."""

    def __init__(self, failure: str) -> None:
        self.failure = failure
        self.in_flight: dict[int, NewRequest] = {}

    def step(self, new: list[NewRequest]) -> StepResult:
        self.in_flight.update((r.request_id, r) for r in new)
        if self.failure == "always" or any(BAD in r.prompt for r in self.in_flight.values()):
            self.in_flight.clear()
            raise (ValueError if self.failure == "value" else RuntimeError)("prompt 0: bad work")
        finished = [_output(request) for request in self.in_flight.values()]
        self.in_flight.clear()
        return StepResult(finished=finished)


def _output(request: NewRequest) -> RequestOutput:
    return RequestOutput(
        request_id=request.request_id, prompt_token_ids=request.prompt,
        text=" ".join(map(str, request.prompt)), token_ids=[0], logprobs=None,
        finish_reason="length", prefill_seconds=0.0, decode_seconds=0.0,
        pages_attended=0.0, pages_total=0.0,
    )  # fmt: skip


class FakeReplica:
    """What ReplicaFeeder uses of a RayCluster: its actors and their nodes, ``start_step``,
    ``shutdown``."""

    def __init__(self, failure: str, *, world_size: int) -> None:
        self.actors = [FakeRank.remote(failure) for _ in range(world_size)]
        self.node_ids = ["local"] * world_size

    def start_step(self, new: list[NewRequest]) -> list:
        return [actor.step.remote(new) for actor in self.actors]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def _serve(failures: list[str], *, bad: set[int], world_size: int = 2):
    """Serve lines 0..9 (those in ``bad`` hold BAD) on one replica a failure mode, four
    in flight each; the rows written and the replicas' summaries."""
    items = [
        BatchItem(id=f"q{i}", line=i + 1, params=SamplingParams(max_tokens=1),
                  token_ids=array("i", [5, i, *([BAD] if i in bad else [])]))
        for i in range(10)
    ]  # fmt: skip
    queue = SharedQueue(iter(items), tokens_of=lambda item: item.token_ids,
                        replicas=len(failures), size=16, max_tokens=1000)  # fmt: skip
    replicas = [FakeReplica(failure, world_size=world_size) for failure in failures]
    rows: list[dict] = []
    feeder = ReplicaFeeder(
        clusters=replicas, queue=queue, write=rows.append, limit=4, progress=False,
        row_of=lambda item, output: {"id": item.id, "text": output.text},
    )  # fmt: skip
    try:
        summaries = feeder.run()
    finally:
        for replica in replicas:
            replica.shutdown()
    assert sorted(row["id"] for row in rows) == sorted(item.id for item in items)  # each once
    return {row["id"]: row for row in rows}, summaries


@pytest.mark.parametrize("failure", ["value", "runtime"])
def test_a_bad_line_gets_one_error_row_and_costs_no_replica(ray_runtime, failure, capsys):
    rows, summaries = _serve([failure, failure], bad={3})
    assert "error" in rows["q3"] and "bad work" in rows["q3"]["error"]
    if failure == "runtime":
        assert "internal error" in rows["q3"]["error"] and "--retry-errors" in rows["q3"]["error"]
    else:
        assert "input line 4" in rows["q3"]["error"]
    assert all(rows[f"q{i}"]["text"] == f"5 {i}" for i in range(10) if i != 3)
    assert not any(s["lost"] for s in summaries)
    assert sum(s["errors"] for s in summaries) == 1
    assert sum(s["lines"] for s in summaries) == 9
    assert "serving them one at a time" in capsys.readouterr().err


def test_a_replica_that_fails_every_step_is_lost_and_its_lines_go_to_the_other(ray_runtime):
    rows, summaries = _serve(["always", "value"], bad=set(), world_size=1)
    assert all(rows[f"q{i}"] == {"id": f"q{i}", "text": f"5 {i}"} for i in range(10))
    assert summaries[0]["lost"] and "bad work" in summaries[0]["lost"]
    assert not summaries[1]["lost"] and summaries[1]["lines"] == 10
    json.dumps(summaries)  # the job's summary stays JSON
