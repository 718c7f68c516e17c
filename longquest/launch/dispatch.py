"""Feeding data-parallel replicas from one shared queue, driven concurrently.

Each replica (a :class:`~longquest.launch.ray_cluster.RayCluster`) keeps up to ``limit``
requests in flight. The driver starts a step on every replica that has work and waits
with ``ray.wait`` for whichever finishes first, so a replica busy with a long prefill
holds back no other; a replica that finishes a step takes its next lines from the
:class:`~longquest.launch.routing.SharedQueue` (lines sharing a prefix go to the replica
that holds it). Every row goes to ``write`` in this process: one writer for the output.

Faults, told apart by what Ray raises:

- A replica that is lost (an actor died, ``RayActorError``; or its ranks disagree: one
  raised while another returned or is still running after ``RANKS_AGREE_S``) is torn down
  and its lines go back to the queue, first in line for the living replicas; they have
  no row yet, so none is written twice. A line that was in flight on ``MAX_LOSSES`` lost
  replicas gets an error row instead (it may be what kills them). When no replica is
  left the job stops with a RuntimeError; the rows written stay.
- A step that raised on every rank (``RayTaskError``: the actors live, and each rank's
  scheduler dropped what was in flight) is the work's fault, as in
  longquest.launch.stream: the replica serves those lines again one at a time, so only
  the culprit fails. A ValueError is the line's own: its error row. Any other exception
  is the line's only if the replica serves a one-token probe right after it (the row
  then says "internal error"); otherwise the replica is lost as above. Either way the
  line is written once and no other replica sees it.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from tqdm import tqdm

from longquest.engine.config import SamplingParams
from longquest.engine.scheduler import NewRequest, StepResult
from longquest.engine.sequence import RequestOutput
from longquest.launch.ray_cluster import RayCluster
from longquest.launch.routing import SharedQueue
from longquest.launch.stream import BatchItem, internal_error_row, refused_row

# Lost replicas a line may have been in flight on before it gets an error row.
MAX_LOSSES = 2
# After one rank of a step raised, how long the others may take to end that step: a rank
# still running then waits in a collective for the one that failed.
RANKS_AGREE_S = 30.0


@dataclass
class ReplicaStats:
    """What one replica served, for its progress line and the job's summary."""

    replica: int
    lines: int = 0
    errors: int = 0
    tokens: int = 0  # completion tokens
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens taken from the prefix cache
    wall_s: float = 0.0  # from the job's start to this replica's last finished step
    lost: str | None = None  # why the replica was lost, if it was
    nodes: list[str] = field(default_factory=list)  # its ranks' Ray node ids, rank order

    def summary(self) -> dict:
        return {
            "replica": self.replica,
            "lines": self.lines,
            "errors": self.errors,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "prefill_tokens": self.prompt_tokens - self.cached_prompt_tokens,
            "wall_s": round(self.wall_s, 3),
            "lost": self.lost,
            "nodes": self.nodes,
        }


@dataclass(frozen=True)
class _Probe:
    """A one-token request that tells whether ``item``'s failure was its own."""

    request_id: int
    item: BatchItem
    error: Exception


@dataclass
class _Replica:
    index: int
    cluster: RayCluster
    stats: ReplicaStats
    in_flight: dict[int, BatchItem] = field(default_factory=dict)  # request id -> line
    refs: list | None = None  # the step in progress: one ObjectRef a rank, rank 0's first
    alive: bool = True
    # Lines of a failed step, served one at a time before any other line.
    alone: deque[BatchItem] = field(default_factory=deque)
    probe: _Probe | None = None  # in flight after a line failed alone


class ReplicaFeeder:
    """Serves every line of ``queue`` on ``clusters`` (replica ``i`` is ``clusters[i]``).

    row_of: the result row of a line and its output.
    write: takes each row (a result or an error) as soon as it exists.
    limit: requests in flight on one replica.
    """

    def __init__(
        self,
        *,
        clusters: list[RayCluster],
        queue: SharedQueue[BatchItem],
        row_of: Callable[[BatchItem, RequestOutput], dict],
        write: Callable[[dict], None],
        limit: int,
        progress: bool = True,
    ) -> None:
        self.queue, self.row_of, self.write, self.limit = queue, row_of, write, limit
        self.replicas = [
            _Replica(index=i, cluster=c, stats=ReplicaStats(replica=i, nodes=list(c.node_ids)))
            for i, c in enumerate(clusters)
        ]
        self._losses: dict[int, int] = {}  # input line -> lost replicas it was on
        self._next_id = 0
        self._start = time.perf_counter()
        self._bars = [
            tqdm(desc=f"replica {i}", unit="line", position=i + 1, disable=not progress)
            for i in range(len(clusters))
        ]

    def run(self) -> list[dict]:
        """Serve every line; the replicas' summaries (``ReplicaStats.summary``)."""
        try:
            while True:
                self._launch([r for r in self.replicas if r.alive and r.refs is None])
                busy = [r for r in self.replicas if r.refs is not None]
                if not busy:
                    if self.queue.done():
                        break
                    continue  # a lost replica's lines were requeued: launch again
                self._wait(busy)
        finally:
            for bar in self._bars:
                bar.close()
        return [replica.stats.summary() for replica in self.replicas]

    def _launch(self, ready: list[_Replica]) -> None:
        """Top the ``ready`` replicas up from the queue, one line each in turn (so
        replicas that are free together share the next lines), and start their steps. A
        replica with lines to serve alone, or a probe in flight, takes no other line."""
        new: dict[int, list[NewRequest]] = {replica.index: [] for replica in ready}
        for replica in ready:
            if replica.alone and not replica.in_flight and replica.probe is None:
                new[replica.index].append(self._issue(replica, replica.alone[0]))
        taking = [replica for replica in ready if not replica.alone and replica.probe is None]
        while taking:
            for replica in list(taking):
                item = None
                if len(replica.in_flight) < self.limit:
                    item = self.queue.pick(replica.index, idle=not replica.in_flight)
                if item is None:
                    taking.remove(replica)
                    continue
                new[replica.index].append(self._issue(replica, item))
        for replica in ready:
            if replica.in_flight or replica.probe is not None:
                replica.refs = replica.cluster.start_step(new[replica.index])

    def _issue(self, replica: _Replica, item: BatchItem) -> NewRequest:
        self._next_id += 1
        replica.in_flight[self._next_id] = item
        return NewRequest(request_id=self._next_id, prompt=list(item.token_ids), params=item.params)

    def _wait(self, busy: list[_Replica]) -> None:
        """Wait until some replica's step ends or fails, and take what it gave."""
        ray.wait([ref for r in busy for ref in r.refs], num_returns=1, timeout=1.0)
        for replica in busy:
            ready, _ = ray.wait(replica.refs, num_returns=len(replica.refs), timeout=0)
            error = _first_error(ready)  # a failed rank fails the step at once
            if error is not None:
                self._failed(replica, error)
            elif len(ready) == len(replica.refs):
                result = ray.get(replica.refs[0])
                replica.refs = None
                self._take(replica, result)

    def _take(self, replica: _Replica, result: StepResult) -> None:
        stats, probe = replica.stats, replica.probe
        serving_alone = bool(replica.alone and replica.in_flight)  # alone[0] in flight
        if probe is not None:
            # Any answer to the probe: the replica still serves, so the line that failed
            # alone failed on its own.
            finished = [o for o in result.finished if o.request_id != probe.request_id]
            if len(finished) < len(result.finished) or result.refused:
                replica.probe = None
                self._error_row(replica, internal_error_row(probe.item, probe.error))
            result = StepResult(finished=finished)
        for request_id, message in result.refused.items():
            self._error_row(replica, refused_row(replica.in_flight.pop(request_id), message))
        for output in result.finished:
            self.write(self.row_of(replica.in_flight.pop(output.request_id), output))
            stats.lines += 1
            stats.tokens += len(output.token_ids)
            stats.prompt_tokens += len(output.prompt_token_ids)
            stats.cached_prompt_tokens += output.cached_prompt_tokens
        if serving_alone and not replica.in_flight:
            replica.alone.popleft()  # the line served alone is done
        self._show(replica)

    def _error_row(self, replica: _Replica, row: dict) -> None:
        self.write(row)
        replica.stats.errors += 1

    def _show(self, replica: _Replica) -> None:
        stats = replica.stats
        stats.wall_s = time.perf_counter() - self._start
        bar = self._bars[replica.index]
        bar.update(stats.lines + stats.errors - bar.n)
        bar.set_postfix(tok_s=f"{stats.tokens / max(stats.wall_s, 1e-9):.1f}", refresh=False)

    def _failed(self, replica: _Replica, error: Exception) -> None:
        """A step of ``replica`` raised ``error`` on some rank: the replica is lost, or
        (every rank raised in the step itself) the work in flight failed."""
        if not isinstance(error, ray.exceptions.RayTaskError) or not _all_raised(replica.refs):
            self._lose(replica, error)
            return
        if replica.probe is not None:  # it served nothing right after a failure: broken
            self._lose(replica, error)
            return
        replica.refs = None
        cause = _cause(error)
        lines = list(replica.in_flight.values())
        replica.in_flight.clear()
        if replica.alone:  # the line served alone failed: it leaves the list here
            replica.alone.popleft()
        if len(lines) > 1:
            replica.alone.extend(lines)
            print(
                f"[longquest] replica {replica.index}: a step of {len(lines)} lines failed "
                f"({type(cause).__name__}: {cause}); serving them one at a time",
                file=sys.stderr,
            )
        elif isinstance(cause, ValueError):  # the line's own fault, refused before any work
            self._error_row(replica, refused_row(lines[0], str(cause)))
            self._show(replica)
        else:
            self._next_id += 1
            replica.probe = _Probe(request_id=self._next_id, item=lines[0], error=cause)
            replica.refs = replica.cluster.start_step([NewRequest(
                request_id=self._next_id, prompt=list(lines[0].token_ids[:1]),
                params=SamplingParams(max_tokens=1),
            )])  # fmt: skip

    def _lose(self, replica: _Replica, error: Exception) -> None:
        """Tear ``replica`` down and hand its lines in flight to the others."""
        replica.alive, replica.refs = False, None
        replica.stats.lost = _describe(error)
        replica.stats.wall_s = time.perf_counter() - self._start
        replica.cluster.shutdown()
        self.queue.forget(replica.index)
        self._bars[replica.index].set_description(f"replica {replica.index} (lost)")
        # Its lines in flight, those it was to serve alone (the first of which is in
        # flight when any is), and the line a probe was to judge.
        lines = list(replica.in_flight.values())
        lines += list(replica.alone)[1 if lines and replica.alone else 0 :]
        lines += [replica.probe.item] if replica.probe is not None else []
        replica.in_flight.clear()
        replica.alone.clear()
        replica.probe = None
        again = []
        for item in lines:
            self._losses[item.line] = self._losses.get(item.line, 0) + 1
            if self._losses[item.line] < MAX_LOSSES:
                again.append(item)
                continue
            replica.stats.errors += 1
            self.write({"id": item.id, "error": (
                f"{MAX_LOSSES} replicas were lost while serving this line (last: "
                f"{replica.stats.lost}); rerun with --retry-errors to try it again")})  # fmt: skip
        self.queue.requeue(again)
        left = sum(r.alive for r in self.replicas)
        print(
            f"[longquest] replica {replica.index} lost ({replica.stats.lost}); {len(again)} "
            f"of its lines go to the {left} replicas left",
            file=sys.stderr,
        )
        if not left:
            raise RuntimeError(
                f"every replica failed (the last: replica {replica.index}, "
                f"{replica.stats.lost}); the rows written are safe: rerun to resume"
            ) from error


def _cause(error: Exception) -> Exception:
    """What a rank raised, for a ``RayTaskError`` (which wraps it in Ray's report)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(error, ray.exceptions.RayTaskError) and cause else error


def _describe(error: Exception) -> str:
    cause = _cause(error)
    return f"{type(cause).__name__}: {cause}".splitlines()[0][:500]


def _first_error(refs: list) -> Exception | None:
    """The exception of the first of ``refs`` (finished) that raised, or None."""
    for ref in refs:
        try:
            ray.get(ref)
        except Exception as error:  # noqa: BLE001 - sorted out by the caller
            return error
    return None


def _all_raised(refs: list) -> bool:
    """Whether every rank's step (``refs``) raised in the step itself within
    ``RANKS_AGREE_S``: then the actors live and each rank's scheduler dropped the same
    requests, so the replica is whole."""
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=RANKS_AGREE_S)
    if pending:
        return False
    return all(isinstance(_first_error([ref]), ray.exceptions.RayTaskError) for ref in ready)


def generate_on_replicas(
    clusters: list[RayCluster], prompts: list[list[int]], params: list[SamplingParams]
) -> list[RequestOutput]:
    """Serve every prompt on the replicas, spread by the shared queue; the outputs in
    input order. A prompt the engine refuses raises its ValueError once the rest are
    served."""
    items = [
        BatchItem(id=index, line=index + 1, token_ids=array("i", prompt), params=sampling)
        for index, (prompt, sampling) in enumerate(zip(prompts, params, strict=True))
    ]
    queue = SharedQueue(
        iter(items), tokens_of=lambda item: item.token_ids, replicas=len(clusters),
        size=len(items), max_tokens=sum(len(p) for p in prompts) + 1,
    )  # fmt: skip
    outputs: dict[int, RequestOutput] = {}
    refused: list[str] = []

    def write(row: dict) -> None:
        if "error" in row:
            refused.append(row["error"])
        else:
            outputs[row["index"]] = row["output"]

    def row_of(item: BatchItem, output: RequestOutput) -> dict:
        return {"index": item.id, "output": dataclasses.replace(output, request_id=item.id)}

    # An even share each, so the first replica to ask does not take every prompt.
    limit = -(-len(items) // len(clusters))
    feeder = ReplicaFeeder(
        clusters=clusters, queue=queue, row_of=row_of, write=write, limit=limit, progress=False
    )
    feeder.run()
    if refused:
        raise ValueError(refused[0])
    return [outputs[index] for index in range(len(items))]
