"""Per-request state and results (plain Python, no device work)."""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from longquest.engine.config import SamplingParams

if TYPE_CHECKING:
    from longquest.engine.page_keys import PromptKeys


@dataclass(kw_only=True)
class RequestOutput:
    """What ``LLM.generate`` returns for one prompt.

    logprobs: per generated token, ``{token_id: logprob}`` holding the sampled token
        and the top ``SamplingParams.logprobs`` tokens; None unless asked for.
    finish_reason: ``"stop"`` (EOS or a stop string) or ``"length"`` (max_tokens).
    pages_attended: mean pages read per decode step, per sparse layer and KV head.
    pages_total: mean pages the sequence had per decode step.
    cached_prompt_tokens: prompt tokens taken from the prefix cache (not computed).
    """

    request_id: int
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str
    prefill_seconds: float
    decode_seconds: float
    pages_attended: float
    pages_total: float
    cached_prompt_tokens: int = 0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(len(self.token_ids) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass(kw_only=True)
class Sequence:
    """A request being served. Positions ``0 .. len(token_ids) - 2`` are in the cache;
    the last token is the one the next decode step feeds in."""

    request_id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    reserved_pages: int = 0
    # Leading pages taken from the prefix cache: prefill starts at their end.
    cached_pages: int = 0
    cached_prompt_tokens: int = 0  # cached_pages * page_size
    # Keys of the prompt's full pages (longquest.engine.page_keys), once admission needs them.
    prompt_keys: PromptKeys | None = field(default=None, repr=False)
    # (global page index, physical page id) of the pages this rank holds, ascending.
    local_pages: list[tuple[int, int]] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    pages_attended_sum: float = 0.0
    pages_total_sum: float = 0.0
    decode_steps: int = 0

    @property
    def token_ids(self) -> list[int]:
        """Prompt and output (a new list: O(length); use ``last_token`` in hot paths)."""
        return self.prompt + self.output

    @property
    def last_token(self) -> int:
        """The token the next decode step feeds in."""
        return self.output[-1] if self.output else self.prompt[-1]

    @property
    def length(self) -> int:
        """Tokens so far, prompt and output."""
        return len(self.prompt) + len(self.output)

    def append_token(
        self,
        token: int,
        *,
        logprobs: dict[int, float] | None,
        eos_token_ids: Container[int],
        detokenize: Callable[[list[int]], str],
    ) -> None:
        """Append a generated token (and its top log-probabilities when the request
        wants them), then set ``finish_reason`` and ``text`` if the sequence is done."""
        self.output.append(token)
        params = self.params
        if params.logprobs is not None:
            keep = dict(list(logprobs.items())[: params.logprobs + 1])
            keep[token] = logprobs[token]
            self.logprobs.append(keep)
        # The text is decoded when the sequence finishes, or every step when stop strings
        # must be searched: decoding the whole output each step costs O(n^2) in its length.
        if not params.ignore_eos and token in eos_token_ids:
            self.finish_reason = "stop"
            self.text = detokenize(self.output[:-1])
            return
        if params.stop:
            self.text = detokenize(self.output)
            for stop in params.stop:
                cut = self.text.find(stop)
                if cut >= 0:
                    self.text = self.text[:cut]
                    self.finish_reason = "stop"
                    return
        if len(self.output) >= params.max_tokens:
            self.text = self.text if params.stop else detokenize(self.output)
            self.finish_reason = "length"

    def result(self) -> RequestOutput:
        steps = max(self.decode_steps, 1)
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt,
            text=self.text,
            token_ids=list(self.output),
            logprobs=list(self.logprobs) if self.params.logprobs is not None else None,
            finish_reason=self.finish_reason or "length",
            prefill_seconds=self.prefill_seconds,
            decode_seconds=self.decode_seconds,
            pages_attended=self.pages_attended_sum / steps,
            pages_total=self.pages_total_sum / steps,
            cached_prompt_tokens=self.cached_prompt_tokens,
        )
