"""The per-rank engine of sequence parallelism.

Every rank runs the same generation loop (``LLMEngine``) on the same requests in
the same order (SPMD). What differs from one device:

- page ownership (:class:`~longquest.parallel.ownership.PageOwnership`): a rank
  allocates and stores only its own pages of every sequence;
- decode attention goes through :class:`~longquest.parallel.comm.SequenceParallelComm`
  (global top-k, log-sum-exp merge);
- prefill is context-parallel (:mod:`longquest.parallel.prefill`);
- sampling happens once: rank 0's tokens are broadcast, so every rank appends
  the same token (temperature > 0 included).

Decode splits every MLP over the ranks by default (``split_mlp``): each rank
reads a ``1 / world_size`` share of the MLP weights, the largest part of the
weights a step reads, and one all-reduce sums the parts. The weights stay
replicated (prefill, where every rank runs other tokens, needs all of them).

Collectives per decode step: 2 per sparse layer, 1 per dense layer, plus one per
layer with the MLP split, plus one broadcast of the sampled tokens. Admission
(whether a request's pages fit) is one tiny all-reduce per attempt, so every rank
admits the same requests. Per prefill round: 2 per layer, plus one broadcast of
the last prompt token's logits.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from longquest.engine.cache import PageAllocator, pages_for
from longquest.engine.engine import LLMEngine
from longquest.engine.sequence import Sequence
from longquest.kernels import plan_append
from longquest.parallel.ownership import PageOwnership
from longquest.parallel.prefill import ContextParallelAttention, RoundPlan


class SequenceParallelEngine(LLMEngine):
    """``LLMEngine`` for one rank of a sequence-parallel group."""

    def __init__(
        self,
        *,
        group: dist.ProcessGroup,
        ownership: PageOwnership,
        world_size: int,
        split_mlp: bool = True,
        **engine_kwargs,
    ) -> None:
        super().__init__(owner=ownership, **engine_kwargs)
        if ownership.world_size != world_size:
            raise ValueError(
                f"ownership is for {ownership.world_size} ranks but world_size={world_size}"
            )
        if ownership.page_size != self.page_size:
            raise ValueError(
                f"ownership page_size {ownership.page_size} != cache page_size {self.page_size}"
            )
        self.group = group
        self.world_size = world_size
        self.ownership = ownership
        # Every rank plans with the smallest pool, so capacity decisions agree.
        pool = torch.tensor([self.cache.shape.num_pages], dtype=torch.int64, device=self.device)
        dist.all_reduce(pool, op=dist.ReduceOp.MIN, group=group)
        self.allocator = PageAllocator(int(pool))
        # Each rank reads only its share of the MLP weights in decode (see MlpSplit).
        if split_mlp and world_size > 1:
            if not hasattr(self.comm, "all_reduce"):
                raise ValueError(
                    f"split_mlp needs a comm with all_reduce (SequenceParallelComm), got "
                    f"{type(self.comm).__name__}; pass split_mlp=False"
                )
            if self.config.intermediate_size % world_size == 0:
                self.model.split_mlp(blocks=world_size)
                self.mlp_split = self.comm

    # ----------------------------------------------------------------- admission
    def _most_pages_needed(self, prompt_len: int, total_tokens: int) -> int:
        counts = [0] * self.world_size
        for page in range(pages_for(total_tokens, self.page_size)):
            counts[self.ownership.owner(prompt_len=prompt_len, page_index=page)] += 1
        return max(counts)

    def _all_agree(self, fits: bool) -> bool:
        flag = torch.tensor([int(fits)], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag)

    # ------------------------------------------------------------------ sampling
    def _sample(self, seq_list: list[Sequence], logits: torch.Tensor):
        tokens, logprobs = super()._sample(seq_list, logits)
        # Rank 0 decides; the others take its tokens so every cache stays identical.
        dist.broadcast(tokens, src=dist.get_global_rank(self.group, 0), group=self.group)
        return tokens, logprobs

    def _greedy_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        tokens = super()._greedy_tokens(logits)
        dist.broadcast(tokens, src=dist.get_global_rank(self.group, 0), group=self.group)
        return tokens

    # ------------------------------------------------------------------- prefill
    def _prefill(self, seq: Sequence, on_progress) -> None:
        start_time = time.perf_counter()
        prompt = seq.prompt
        own = self.ownership
        hidden = None
        last_owner = own.owner(
            prompt_len=len(prompt), page_index=(len(prompt) - 1) // self.page_size
        )
        for round_index in range(own.num_rounds(prompt_len=len(prompt))):
            plan, positions = self._round_plan(seq, round_index)
            attention = ContextParallelAttention(
                cache=self.cache,
                plan=plan,
                group=self.group,
                world_size=self.world_size,
                impl=self.impl,
            )
            with torch.inference_mode():
                if positions:
                    ids = torch.tensor([prompt[p] for p in positions], dtype=torch.int64)
                    out = self.model(
                        input_ids=ids.to(self.device),
                        positions=torch.tensor(positions, dtype=torch.int64).to(self.device),
                        attention=attention,
                    )
                    if positions[-1] == len(prompt) - 1:
                        hidden = out[-1:]
                else:
                    self._join_round_without_tokens(attention)
            if on_progress:
                on_progress("prefill", plan.round_end, len(prompt))
        # The rank holding the last prompt token computes its logits and shares them.
        logits = torch.empty(1, self.config.vocab_size, dtype=torch.float32, device=self.device)
        if self.rank == last_owner:
            with torch.inference_mode():
                logits.copy_(self.model.compute_logits(hidden))
        dist.broadcast(logits, src=dist.get_global_rank(self.group, last_owner), group=self.group)
        self._accept(seq_list=[seq], logits=logits)
        seq.prefill_seconds = time.perf_counter() - start_time

    def _join_round_without_tokens(self, attention: ContextParallelAttention) -> None:
        """A rank with no tokens in a (short, final) round still takes part in every
        layer's collectives: its keys serve the other ranks' queries."""
        config = self.config
        dtype = self.cache.shape.dtype
        query = torch.empty(
            0, config.num_qo_heads, config.head_dim, dtype=dtype, device=self.device
        )
        key = torch.empty(0, config.num_kv_heads, config.head_dim, dtype=dtype, device=self.device)
        for layer in range(config.num_layers):
            attention(layer=layer, query=query, key=key, value=key)

    def _round_plan(self, seq: Sequence, round_index: int) -> tuple[RoundPlan, list[int]]:
        """The plan of one prefill round, and this rank's token positions in it."""
        own, prompt_len, page_size = self.ownership, len(seq.prompt), self.page_size
        ranges = [
            own.prefill_positions(rank=r, prompt_len=prompt_len, round_index=round_index)
            for r in range(self.world_size)
        ]
        counts = [sum(b - a for a, b in rs) for rs in ranges]
        width = max(max(counts), 1)
        chunks = own.round_chunks(prompt_len=prompt_len, round_index=round_index)
        round_start = chunks[0][0] * page_size
        round_end = min(chunks[-1][1] * page_size, prompt_len)
        # Where each round position sits in the flattened all-gather, and who owns it.
        order = [0] * (round_end - round_start)
        send_rows = [[0] * width for _ in range(self.world_size)]
        send_valid = [[False] * width for _ in range(self.world_size)]
        for r, rs in enumerate(ranges):
            row = 0
            for a, b in rs:
                for p in range(a, b):
                    order[p - round_start] = r * width + row
                    send_rows[r][row] = p - round_start
                    send_valid[r][row] = True
                    row += 1
        positions = [p for a, b in ranges[self.rank] for p in range(a, b)]
        self._grow(seq, round_end)
        local = dict(seq.local_pages)
        first_page = round_start // page_size
        past = [phys for g, phys in seq.local_pages if g < first_page]
        segments = []
        for a, b in ranges[self.rank]:
            pages = [local[g] for g in range(a // page_size, -(-b // page_size))]
            segments.append((a, b, torch.tensor(pages, dtype=torch.int32, device=self.device)))
        slots = None
        if positions:
            slots = torch.tensor(
                [local[p // page_size] * page_size + p % page_size for p in positions],
                dtype=torch.int64,
            ).to(self.device)
        device = self.device
        plan = RoundPlan(
            round_start=round_start,
            round_end=round_end,
            num_local=len(positions),
            max_tokens=width,
            order=torch.tensor(order, dtype=torch.int64, device=device),
            send_rows=torch.tensor(send_rows, dtype=torch.int64, device=device),
            send_valid=torch.tensor(send_valid, dtype=torch.bool, device=device),
            slot_mapping=slots,
            append_plan=(
                plan_append(slot_mapping=slots, page_size=page_size) if slots is not None else None
            ),
            past_pages=torch.tensor(past, dtype=torch.int32, device=device),
            segments=tuple(segments),
        )
        return plan, positions


def check_same_everywhere(*, group: dist.ProcessGroup, world_size: int, **settings) -> None:
    """Raise ValueError on every rank if the ranks were started with different settings.

    One all-gather of the settings' text at start-up: a rank with another budget,
    page size or model would otherwise hang or silently compute garbage later.
    """
    mine = repr(sorted(settings.items()))
    everyone: list[str | None] = [None] * world_size
    dist.all_gather_object(everyone, mine, group=group)
    for rank, theirs in enumerate(everyone):
        if theirs != mine:
            raise ValueError(
                f"ranks were started with different settings: this rank has {mine}, rank "
                f"{rank} has {theirs}; start every rank with the same arguments"
            )


def build_worker(
    model_dir,
    *,
    group: dist.ProcessGroup,
    rank: int,
    world_size: int,
    dtype="auto",
    device=None,
    quest=None,
    cache=None,
    prefill_chunk_tokens: int = 8192,
    impl: str | None = None,
    split_mlp: bool = True,
    peer_collectives: bool = True,
):
    """Build this rank's SequenceParallelEngine and the tokenizer (see build_engine).

    split_mlp: decode splits every MLP over the ranks (see SequenceParallelEngine).
    peer_collectives: decode's collectives write straight into the other GPUs' memory
        (:class:`~longquest.parallel.peer.PeerCollectives`) where every rank can; else NCCL.
    """
    from functools import partial

    from longquest.engine.builder import build_engine, resolve_device
    from longquest.engine.config import QuestConfig
    from longquest.parallel.comm import SequenceParallelComm
    from longquest.parallel.peer import PeerCollectives

    quest = quest or QuestConfig()
    check_same_everywhere(
        group=group,
        world_size=world_size,
        model=str(model_dir),
        dtype=str(dtype),
        quest=quest,
        cache=cache,
        prefill_chunk_tokens=prefill_chunk_tokens,
        split_mlp=split_mlp,
        peer_collectives=peer_collectives,
    )
    device = resolve_device(device)
    peer = None
    if peer_collectives:
        peer = PeerCollectives.create(group=group, rank=rank, world_size=world_size, device=device)
    # A round splits into 2 * world_size whole-page chunks.
    step = 2 * quest.page_size
    chunk = max(step, prefill_chunk_tokens // step * step)
    ownership = PageOwnership(
        world_size=world_size, page_size=quest.page_size, prefill_chunk_tokens=chunk
    )
    make_engine = partial(
        SequenceParallelEngine,
        group=group,
        ownership=ownership,
        world_size=world_size,
        rank=rank,
        comm=SequenceParallelComm(
            group=group, rank=rank, world_size=world_size, impl=impl, peer=peer
        ),
        split_mlp=split_mlp,
    )
    return build_engine(
        model_dir,
        dtype=dtype,
        device=device,
        quest=quest,
        cache=cache,
        prefill_chunk_tokens=chunk,
        impl=impl,
        world_size=world_size,
        make_engine=make_engine,
    )
