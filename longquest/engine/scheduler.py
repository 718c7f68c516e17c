"""Step-wise scheduling of one engine: requests join at any time, each step admits what
fits, prefills it and runs one decode launch.

Scheduling is continuous batching with prefill first: at the start of every step the
waiting queue's head is admitted (its prompt plus ``max_tokens`` reserved up front) and
prefilled while it fits, so a slot freed by the last step is refilled before the next
decode launch. :func:`generate_all` (``LLMEngine.generate``) adds a whole list and steps
until it is done; a streaming caller (the batch runner, a Ray actor) adds requests as
slots free.

Every rank of a sequence-parallel group runs its own scheduler over its own engine and
must be given the same requests in the same steps: admission and decode are collective.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from longquest.engine.cache import CacheCapacityError
from longquest.engine.config import SamplingParams
from longquest.engine.ranks import ProgressCallback
from longquest.engine.sequence import RequestOutput, Sequence

if TYPE_CHECKING:
    from longquest.engine.engine import LLMEngine


@dataclass(frozen=True, kw_only=True)
class NewRequest:
    """A request given to :meth:`Scheduler.step`; ``request_id`` names its output and
    must differ from every request still in flight."""

    request_id: int
    prompt: list[int]
    params: SamplingParams


@dataclass(kw_only=True)
class StepResult:
    """What one :meth:`Scheduler.step` gives back.

    finished: the requests that finished in this step, in finish order.
    refused: ``{request_id: message}`` of new requests refused before any work (the
        ValueError a bad request raises: empty prompt, too long, too big for the cache).
    """

    finished: list[RequestOutput] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)


class Scheduler:
    """The requests in flight on one engine and the step that advances them.

    on_progress: passed to every prefill (``("prefill", done, total)`` reports).
    """

    def __init__(self, engine: LLMEngine, *, on_progress: ProgressCallback | None = None):
        self.engine = engine
        self.on_progress = on_progress
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._prefilling: Sequence | None = None
        self._ids: set[int] = set()

    @property
    def num_unfinished(self) -> int:
        """Requests added and not finished yet (waiting or running)."""
        return len(self._ids)

    def add(self, request: NewRequest) -> None:
        """Queue ``request``. Raises ValueError (nothing changed) when it can never be
        served (see ``LLMEngine.new_sequence``) or its id is in flight."""
        if request.request_id in self._ids:
            raise ValueError(f"request id {request.request_id} is already in flight")
        seq = self.engine.new_sequence(
            request.prompt, request.params, request_id=request.request_id
        )
        self._waiting.append(seq)
        self._ids.add(request.request_id)

    def step(self, new: Iterable[NewRequest] = ()) -> StepResult:
        """Add ``new`` (refusing bad ones alone), then admit and prefill what fits and
        run one decode launch. On any exception every request in flight is released and
        forgotten (the engine keeps its whole cache) and the exception propagates."""
        result = StepResult()
        for request in new:
            try:
                self.add(request)
            except ValueError as error:
                result.refused[request.request_id] = str(error)
        try:
            finished = self._advance()
        except BaseException:
            self.abort()
            raise
        for seq in finished:
            self._ids.discard(seq.request_id)
        result.finished = [seq.result() for seq in finished]
        return result

    def abort(self) -> None:
        """Release every request in flight and forget them (waiting ones hold nothing)."""
        prefilling = [self._prefilling] if self._prefilling is not None else []
        for seq in self._running + prefilling:
            self.engine.release(seq)
        self._waiting.clear()
        self._running = []
        self._prefilling = None
        self._ids.clear()

    def _advance(self) -> list[Sequence]:
        """Admit and prefill the waiting head while it fits, then one decode launch;
        the sequences that finished, each released."""
        engine, finished = self.engine, []
        while self._waiting and engine.admit(self._waiting[0]):
            seq = self._prefilling = self._waiting.popleft()
            engine.prefill(seq, on_progress=self.on_progress)
            self._prefilling = None
            if seq.finish_reason:
                engine.release(seq)
                finished.append(seq)
            else:
                self._running.append(seq)
        if not self._running:
            if self._waiting:  # nothing running yet the head doesn't fit: cannot happen
                raise CacheCapacityError("a request does not fit the empty cache")
            return finished
        engine.decode(self._running)
        for seq in [s for s in self._running if s.finish_reason]:
            self._running.remove(seq)
            engine.release(seq)
            finished.append(seq)
        return finished


def generate_all(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: list[SamplingParams],
    *,
    on_progress: ProgressCallback | None = None,
) -> list[RequestOutput]:
    """Serve every prompt to the end; results in input order. Every prompt is checked
    before any work (a ValueError names the first bad one by its position).

    on_progress(stage, done, total): prefill reports as in ``LLMEngine.prefill``, and
    ``("requests", finished, len(prompts))`` after each finished request.
    """
    if len(prompts) != len(params):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
    scheduler = Scheduler(engine, on_progress=on_progress)
    for index, (prompt, sampling) in enumerate(zip(prompts, params)):
        scheduler.add(NewRequest(request_id=index, prompt=prompt, params=sampling))
    done: list[RequestOutput] = []
    while scheduler.num_unfinished:
        for output in scheduler.step().finished:
            done.append(output)
            if on_progress:
                on_progress("requests", len(done), len(prompts))
    return sorted(done, key=lambda output: output.request_id)
