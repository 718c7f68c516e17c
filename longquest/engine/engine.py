"""The engine of one rank: admission, prefill, batched Quest decode.

The loop over them, continuous batching with prefill first, is
:class:`~longquest.engine.scheduler.Scheduler`: whenever the waiting queue's head fits
in the cache (its prompt plus ``max_tokens`` is reserved up front, so a running request
never runs out of pages), it is prefilled and joins the decode batch.
Full prompt pages are cached: a prompt that starts with cached pages takes them by
reference and prefills only the rest (:mod:`longquest.engine.admission`).

The loop is written SPMD-ready: page ownership, admission, prefill and the
cross-rank steps go through one injected :class:`~longquest.engine.ranks.RankGroup`,
so the sequence-parallel worker in longquest.parallel runs this same loop on every rank.

The public methods below (``new_sequence``, ``admit``, ``add_request``, ``prefill``,
``decode``, ``release``, ``grow``, ``drop_decode_batch``, ``decode_batch``) are what
the scheduler (longquest.engine.scheduler) and ``generate`` are made of; benchmarks
drive the engine through them one step at a time.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from longquest.engine.admission import Admission, PrefixStats
from longquest.engine.attention import PagedAttention
from longquest.engine.cache import CacheCapacityError, KVCache, pages_for
from longquest.engine.config import ModelConfig, QuestConfig, SamplingParams
from longquest.engine.decode_batch import DecodeBatch
from longquest.engine.model import Model
from longquest.engine.page_keys import cache_salt
from longquest.engine.page_pool import PagePool
from longquest.engine.ranks import ProgressCallback, RankGroup, SingleDevice
from longquest.engine.requests import check_request
from longquest.engine.sampler import sample, top_logprobs
from longquest.engine.scheduler import generate_all
from longquest.engine.sequence import RequestOutput, Sequence
from longquest.kernels import DEFAULT_TUNING, KernelTuning


class Detokenizer(Protocol):
    def __call__(self, token_ids: list[int]) -> str: ...


class LLMEngine:
    """Serves generation requests given as token ids."""

    def __init__(
        self,
        *,
        model: Model,
        model_config: ModelConfig,
        cache: KVCache,
        quest: QuestConfig,
        detokenize: Detokenizer,
        eos_token_ids: tuple[int, ...],
        prefill_chunk_tokens: int = 8192,
        impl: str | None = None,
        ranks: RankGroup | None = None,
        tuning: KernelTuning = DEFAULT_TUNING,
        cuda_graphs: bool | None = None,
        steps_per_launch: int | None = None,
        allow_long_context: bool = False,
        prefix_caching: bool = True,
        prefix_salt: bytes | None = None,
    ) -> None:
        if prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {prefill_chunk_tokens}")
        self.model = model
        self.config = model_config
        self.cache = cache
        self.quest = quest
        self.page_size = cache.shape.page_size
        self.ranks = ranks or SingleDevice()
        self.rank = self.ranks.rank
        self.world_size = self.ranks.world_size
        self.comm = self.ranks.comm
        # Every rank plans with the same pool, so capacity decisions agree.
        self.allocator = PagePool(self.ranks.agreed_pages(cache.shape.num_pages))
        shape = cache.shape  # the builder's salt names the weights too
        tensor_size = 1 if model.tensor is None else model.tensor.world_size
        prefix_salt = prefix_salt or cache_salt(
            model=model_config, dtype=shape.dtype, page_size=shape.page_size,
            bounds_dtype=shape.bounds_dtype, world_size=self.world_size * tensor_size,
            tensor_parallel_size=tensor_size,
        )  # fmt: skip
        self.admission = Admission(pool=self.allocator, ranks=self.ranks, page_size=self.page_size,
                                   salt=prefix_salt, prefix_caching=prefix_caching)  # fmt: skip
        self.detokenize = detokenize
        self.eos_token_ids = set(eos_token_ids)
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.impl = impl
        self.tuning = tuning
        # Decode splits the MLPs over the ranks where the rank group does.
        self.mlp_split = self.ranks.mlp_split(model=model, model_config=model_config)
        self.device = cache.k.device
        # Decode steps replay CUDA graphs by default on CUDA with the Triton kernels.
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and impl in (None, "triton")
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA cache, got {self.device}")
        self.cuda_graphs = cuda_graphs
        # Greedy steps chained per launch: amortises the host's per-launch work.
        if steps_per_launch is None:
            steps_per_launch = 8 if cuda_graphs else 1
        if isinstance(steps_per_launch, bool) or not isinstance(steps_per_launch, int):
            raise ValueError(f"steps_per_launch must be an int >= 1, got {steps_per_launch!r}")
        if steps_per_launch < 1:
            raise ValueError(f"steps_per_launch must be >= 1, got {steps_per_launch}")
        self.steps_per_launch = steps_per_launch
        # Past the declared context a model's outputs are untested: refused unless asked.
        self.allow_long_context = allow_long_context
        self._batch: DecodeBatch | None = None

    # ----------------------------------------------------------------- public API
    @property
    def capacity_tokens(self) -> int:
        """Tokens the cache holds across all ranks (one sequence, balanced ownership)."""
        return self.allocator.num_pages * self.page_size * self.world_size

    def generate(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        *,
        on_progress: ProgressCallback | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results in input order (a
        :class:`~longquest.engine.scheduler.Scheduler` stepped to the end).

        on_progress(stage, done, total) is called as each prefill starts and after each of
        its chunks (``stage="prefill"``, prompt tokens done) and after each finished
        request (``"requests"``).
        """
        return generate_all(self, prompts, params, on_progress=on_progress)

    def new_sequence(
        self, prompt: list[int], params: SamplingParams, *, request_id: int = 0
    ) -> Sequence:
        """A checked sequence for ``prompt``, not admitted yet (follow with :meth:`admit`).

        Raises ValueError for a request that can never be served (empty, past the
        model's context, bad sampling settings) and CacheCapacityError (a ValueError)
        when it needs more pages than the whole cache holds.
        """
        return self._new_sequence(request_id, prompt, params)

    def add_request(
        self, prompt: list[int], params: SamplingParams, *, request_id: int = 0
    ) -> Sequence:
        """A new sequence for ``prompt`` with its pages reserved (prompt + max_tokens).

        Raises ValueError for an empty prompt and CacheCapacityError when the request
        does not fit the cache, or not its free pages now. Requests decoded together
        need distinct ``request_id`` values. Follow with :meth:`prefill`.
        """
        seq = self._new_sequence(request_id, prompt, params)
        if not self.admit(seq):
            raise CacheCapacityError(
                f"request {request_id} does not fit the {self.allocator.num_free} free pages "
                "now; release a sequence first"
            )
        return seq

    def prefill(self, seq: Sequence, *, on_progress: ProgressCallback | None = None) -> None:
        """Exact prefill of ``seq``'s prompt past its cached pages (through the rank
        group), then publish its full prompt pages and sample its first output token.
        After an exception, :meth:`release` ``seq``: nothing of it was published."""
        start_time = time.perf_counter()
        if on_progress:  # the rank group reports each chunk
            on_progress("prefill", seq.cached_prompt_tokens, len(seq.prompt))
        logits = self.ranks.prefill(engine=self, seq=seq, on_progress=on_progress)
        self.admission.publish(seq)
        self._accept(seq_list=[seq], logits=logits)
        seq.prefill_seconds = time.perf_counter() - start_time

    def grow(self, seq: Sequence, *, num_tokens: int) -> None:
        """Give ``seq`` the pages this rank holds of its first ``num_tokens`` tokens,
        from its reservation."""
        have = seq.local_pages[-1][0] + 1 if seq.local_pages else 0
        # Jump over the other ranks' pages: a decode step costs O(1), not O(their pages).
        page = self.ranks.next_local_page(page_index=have)
        while page < pages_for(num_tokens, self.page_size):
            (physical,) = self.allocator.allocate(1, reserved=True)
            seq.reserved_pages -= 1
            seq.local_pages.append((page, physical))
            page = self.ranks.next_local_page(page_index=page + 1)

    def release(self, seq: Sequence) -> None:
        """Give back ``seq``'s pages (its published ones stay cached until evicted) and
        what is left of its reservation."""
        self._batch = None  # its tables name the pages freed here
        self.admission.release(seq)

    def prefix_stats(self) -> PrefixStats:
        """What the prefix cache saved on this rank: hits, prompt tokens computed and
        taken from the cache, evictions."""
        return self.admission.stats()

    @property
    def decode_batch(self) -> DecodeBatch | None:
        """The decode batch of the last :meth:`decode` (its buffers and captured graphs),
        or None after a release."""
        return self._batch

    def drop_decode_batch(self) -> None:
        """Forget the decode batch: the next :meth:`decode` rebuilds it (and captures its
        graphs again). Needed after anything the batch's tables or graphs depend on
        changed under it: the pages of a sequence, ``quest``, the comm's collectives."""
        self._batch = None

    # --------------------------------------------------------------- bookkeeping
    def _new_sequence(self, index: int, prompt: list[int], params: SamplingParams) -> Sequence:
        check_request(
            index=index, prompt=prompt, params=params, model_config=self.config,
            allow_long_context=self.allow_long_context,
        )  # fmt: skip
        self.admission.check_capacity(index=index, prompt_len=len(prompt), params=params)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return Sequence(request_id=index, prompt=list(prompt), params=params, generator=generator)

    def admit(self, seq: Sequence) -> bool:
        """Take ``seq``'s cached prompt pages and reserve the rest of the pages this rank
        holds of the whole sequence if every rank can; False (nothing changed) when not
        now. Sets ``seq.cached_pages``: its prefill starts at their end."""
        return self.admission.admit(seq)

    # -------------------------------------------------------------------- decode
    def decode(self, running: list[Sequence]) -> None:
        """One launch: ``steps_per_launch`` greedy steps chained on the device (fewer
        near ``max_tokens``), or one step when a row samples or wants logprobs."""
        start_time = time.perf_counter()
        # Greedy rows without logprobs pick their token on the device, inside the graph,
        # so several steps can chain without the host; tokens past a stop are dropped.
        greedy = all(s.params.temperature == 0.0 and s.params.logprobs is None for s in running)
        steps = 1
        if greedy:
            left = min(s.params.max_tokens - len(s.output) for s in running)
            steps = max(1, min(self.steps_per_launch, left))
        batch, sparse = self._prepare_decode(running, steps=steps)

        def forward() -> torch.Tensor:
            ids = batch.first_tokens()
            picked = []
            for step in range(steps):
                positions, meta = batch.inputs(step=step, sparse=sparse)
                attention = PagedAttention(
                    cache=self.cache,
                    quest=self.quest,
                    metadata=meta,
                    comm=self.comm,
                    impl=self.impl,
                    tuning=self.tuning,
                )
                hidden = self.model(
                    input_ids=ids,
                    positions=positions,
                    attention=attention,
                    mlp_split=self.mlp_split,
                )
                if not greedy:
                    return self.model.compute_logits(hidden)
                ids = self._greedy_tokens(hidden)
                picked.append(ids)
            return torch.stack(picked, dim=1)  # [num_seqs, steps]

        # A launch shorter than steps_per_launch is a batch's last one (its shortest row ends
        # there, and the batch changes): capturing it would cost more than it saves.
        capture = steps == 1 or steps == self.steps_per_launch
        with torch.inference_mode():
            out = batch.run(key=(sparse, greedy, steps), forward=forward, capture=capture)
        if greedy:
            table = out.tolist()
            per_step = []
            for step in range(steps):
                live = [i for i, seq in enumerate(running) if not seq.finish_reason]
                if not live:
                    break
                self._append_tokens(
                    seq_list=[running[i] for i in live],
                    tokens=[table[i][step] for i in live],
                    logprobs=None,
                )
                per_step.append(live)
        else:
            self._accept(seq_list=running, logits=out)
            per_step = [list(range(len(running)))]
        elapsed = (time.perf_counter() - start_time) / steps
        budget = self.quest.page_budget
        for live in per_step:
            for i in live:
                seq = running[i]
                total = pages_for(seq.length - 1, self.page_size)
                seq.decode_seconds += elapsed
                seq.decode_steps += 1
                seq.pages_total_sum += total
                seq.pages_attended_sum += total if budget is None else min(budget, total)

    def _prepare_decode(
        self, running: list[Sequence], *, steps: int = 1
    ) -> tuple[DecodeBatch, bool]:
        """Grow every sequence by ``steps`` tokens and load those steps into the batch.

        Step ``j`` feeds position ``length - 1 + j``; only step 0's input token is known
        here (later ones come from the device). Returns the batch (rebuilt when the
        running sequences changed) and whether any sequence has more pages than the
        budget in any of the steps (else scoring is skipped).
        """
        ids = [s.request_id for s in running]
        batch = self._batch
        group_pages = self.quest.group_pages
        if batch is None or batch.request_ids != ids or batch.group_pages != group_pages:
            self._batch = None  # free the old buffers and graphs first
            width = max(len(s.local_pages) + s.reserved_pages for s in running)
            batch = self._batch = DecodeBatch(
                request_ids=ids,
                width=width,
                page_size=self.page_size,
                device=self.device,
                use_graphs=self.cuda_graphs,
                max_steps=self.steps_per_launch,
                num_kv_heads=self.model.num_kv_heads,  # this tensor rank's
                group_pages=group_pages,
                cache=self.cache,
                impl=self.impl,
            )
        rows = [[] for _ in range(steps)]
        sparse, budget = False, self.quest.page_budget
        for seq in running:
            for step in range(steps):
                position = seq.length - 1 + step
                self.grow(seq, num_tokens=position + 1)
                page, offset = divmod(position, self.page_size)
                pages = seq.local_pages
                owns_newest = bool(pages) and pages[-1][0] == page
                full = (len(pages) - owns_newest) * self.page_size
                rows[step].append(
                    (
                        seq.last_token if step == 0 else 0,
                        position,
                        pages[-1][1] if owns_newest else -1,
                        offset,
                        full + (offset + 1 if owns_newest else 0),
                        len(pages),
                        int(owns_newest),
                    )
                )
                sparse |= budget is not None and page + 1 > budget
        batch.update(rows=rows, local_pages=[s.local_pages for s in running])
        return batch, sparse

    # ------------------------------------------------------------------ sampling
    def _greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy tokens ``[num_seqs]`` int64 of the final hidden states ``[num_seqs,
        hidden_size]``, rank 0's on every rank, on the device with no host sync
        (capturable)."""
        return self.ranks.share_tokens(self.model.greedy_tokens(hidden))

    def _accept(self, *, seq_list: list[Sequence], logits: torch.Tensor) -> None:
        tokens, logprobs = sample(
            logits=logits,
            params=[s.params for s in seq_list],
            generators=[s.generator for s in seq_list],
        )
        # Rank 0 decides; the others take its tokens so every cache stays identical.
        tokens = self.ranks.share_tokens(tokens)
        want = [s.params.logprobs for s in seq_list if s.params.logprobs is not None]
        rows = top_logprobs(logprobs, tokens, max(want)) if want else None
        self._append_tokens(seq_list=seq_list, tokens=tokens.tolist(), logprobs=rows)

    def _append_tokens(
        self,
        *,
        seq_list: list[Sequence],
        tokens: list[int],
        logprobs: list[dict[int, float]] | None,
    ) -> None:
        for i, seq in enumerate(seq_list):
            seq.append_token(
                tokens[i],
                logprobs=None if logprobs is None else logprobs[i],
                eos_token_ids=self.eos_token_ids,
                detokenize=self.detokenize,
            )
