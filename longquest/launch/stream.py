"""Feeding batch lines to a step-wise engine so it stays full.

A :data:`Step` takes the requests to add and advances the engine by one step: a local
:class:`~longquest.engine.scheduler.Scheduler`, ``RayCluster.step`` (every actor gets the
same requests), or :func:`steps_from_generate` over a blocking ``generate``. The feeder
keeps up to ``limit`` requests in flight and gives a finished request's slot to the next
line in the very next step; each row is handed to ``write`` as its request finishes.

Errors: a request refused when added (a ValueError: its own fault) gets its error row
alone. When a step fails, the engine has released everything in flight; the feeder then
serves those requests one at a time, so only the culprit gets an error row. A failure
that is not a ValueError is the request's only if the engine still serves a one-token
probe right after it (the row says "internal error"); otherwise the feeder raises it and
writes no row for the request, so a rerun serves it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from longquest.engine.config import SamplingParams
from longquest.engine.scheduler import NewRequest, StepResult
from longquest.engine.sequence import RequestOutput

Step = Callable[[list[NewRequest]], StepResult]
Generate = Callable[[list[list[int]], list[SamplingParams]], list[RequestOutput]]


@dataclass(frozen=True, kw_only=True)
class BatchItem:
    id: object  # the id's JSON value, written back unchanged
    line: int
    token_ids: array  # array("i"): 4 bytes a token while the line waits
    params: SamplingParams


def steps_from_generate(generate: Generate) -> Step:
    """A Step over a blocking ``generate(prompts, params)``: each step serves the
    requests it is given to the end (they decode together) and returns them all."""

    def step(new: list[NewRequest]) -> StepResult:
        if not new:
            return StepResult()
        outputs = generate([r.prompt for r in new], [r.params for r in new])
        finished = [
            dataclasses.replace(output, request_id=request.request_id)
            for request, output in zip(new, outputs, strict=True)
        ]
        return StepResult(finished=finished)

    return step


def name_request(message: str, *, request_id: object, line: int) -> str:
    """Engine and tokenizer messages say ``prompt N`` (a position); say which line."""
    name = f"request id={json.dumps(request_id, ensure_ascii=False)} (input line {line})"
    return re.sub(r"\bprompt \d+\b", name, message, count=1)


def refused_row(item: BatchItem, message: str) -> dict:
    """The error row of a line the engine refused (``message`` names the line)."""
    return {"id": item.id, "error": name_request(message, request_id=item.id, line=item.line)}


def internal_error_row(item: BatchItem, error: Exception) -> dict:
    """The error row of a line whose request failed (not refused) while the engine went
    on serving other work right after it; a warning goes to stderr too."""
    message = (
        f"internal error while serving this request ({type(error).__name__}: {error}); "
        "the engine served other work right after it, so it is this request's. Rerun "
        "with --retry-errors to try it again"
    )
    print(f"[longquest] request id={item.id!r}: {message}", file=sys.stderr)
    return {"id": item.id, "error": message}


class Feeder:
    """Issues picked lines to ``step``, at most ``limit`` in flight, and writes a row
    for each as it finishes.

    pick: the next line to issue, or None when there is none left.
    row_of: the result row of a line and its output.
    write: takes each row (a result or an error) as soon as it exists.
    """

    def __init__(
        self,
        *,
        step: Step,
        pick: Callable[[], BatchItem | None],
        row_of: Callable[[BatchItem, RequestOutput], dict],
        write: Callable[[dict], None],
        limit: int,
    ) -> None:
        self.step, self.pick, self.write, self.limit = step, pick, write, limit
        self.row_of = row_of
        self.in_flight: dict[int, BatchItem] = {}  # request id -> line, in issue order
        self._next_id = 0

    def run(self) -> None:
        """Serve every line ``pick`` gives."""
        while True:
            new = []
            while len(self.in_flight) < self.limit:
                item = self.pick()
                if item is None:
                    break
                new.append(self._request(item.token_ids, item.params))
                self.in_flight[new[-1].request_id] = item
            if not self.in_flight:
                return
            try:
                result = self.step(new)
            except Exception as error:  # noqa: BLE001 - sorted out in _recover
                self._recover(error)
                continue
            for request_id, message in result.refused.items():
                self.write(refused_row(self.in_flight.pop(request_id), message))
            for output in result.finished:
                self.write(self.row_of(self.in_flight.pop(output.request_id), output))

    def _request(self, token_ids, params: SamplingParams) -> NewRequest:
        self._next_id += 1
        return NewRequest(request_id=self._next_id, prompt=list(token_ids), params=params)

    def _recover(self, error: Exception) -> None:
        """After a failed step (the engine released everything in flight): serve what was
        in flight one at a time, or raise when the engine itself is broken."""
        stuck = list(self.in_flight.values())
        self.in_flight.clear()
        if len(stuck) == 1:
            self.write(self._row_for_failure(stuck[0], error))
            return
        if not isinstance(error, ValueError) and not self._engine_serves(stuck[0]):
            raise error
        for item in stuck:
            self.write(self._serve_alone(item))

    def _serve_alone(self, item: BatchItem) -> dict:
        try:
            output = self._finish(self._request(item.token_ids, item.params))
        except Exception as error:  # noqa: BLE001 - sorted out in _row_for_failure
            return self._row_for_failure(item, error)
        return self.row_of(item, output)

    def _row_for_failure(self, item: BatchItem, error: Exception) -> dict:
        """The error row of a request that failed alone; raises ``error`` when the
        engine no longer serves anything (not this request's fault: no row)."""
        if isinstance(error, ValueError):  # the request's own fault, refused before any work
            return refused_row(item, str(error))
        if not self._engine_serves(item):
            raise error
        return internal_error_row(item, error)

    def _finish(self, request: NewRequest) -> RequestOutput:
        """Serve ``request`` alone to the end; raises ValueError when it is refused."""
        result = self.step([request])
        while True:
            if request.request_id in result.refused:
                raise ValueError(result.refused[request.request_id])
            for output in result.finished:
                if output.request_id == request.request_id:
                    return output
            result = self.step([])

    def _engine_serves(self, item: BatchItem) -> bool:
        """Whether the engine still serves a one-token request (the item's first token)."""
        probe = self._request(item.token_ids[:1], SamplingParams(max_tokens=1))
        try:
            self._finish(probe)
        except Exception:  # noqa: BLE001 - any failure means the engine is unusable
            return False
        return True
