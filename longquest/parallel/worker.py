"""One rank of a replica (T tensor x S sequence ranks): its rank group and how it is built.

Every rank runs the same generation loop (``LLMEngine``) on the same requests in
the same order (SPMD). What differs from one device comes in through the engine's
:class:`~longquest.engine.ranks.RankGroup` seam, which :class:`SequenceParallelRanks`
implements:

- page ownership (:class:`~longquest.parallel.ownership.PageOwnership`): a rank
  allocates and stores only its own pages of every sequence;
- decode attention goes through :class:`~longquest.parallel.comm.SequenceParallelComm`
  (global top-k, log-sum-exp merge);
- prefill is context-parallel (:mod:`longquest.parallel.prefill`), from the end of
  the pages a prefix cache supplied (``Sequence.cached_pages``);
- sampling happens once: rank 0's tokens are broadcast, so every rank appends
  the same token (temperature > 0 included).

Under tensor parallelism (:mod:`longquest.parallel.mesh`) the engine's rank group is
the rank's *sequence group* (the S ranks that hold the same weight shard and KV heads):
ownership, the decode attention's collectives and context-parallel prefill run inside
it as they do at T = 1, while admission and the sampled tokens are agreed over the
whole replica, and the model (a shard, ``longquest.engine.model.TensorParallel``)
sums and gathers over its tensor group.

Decode splits every MLP over the sequence ranks by default (``split_mlp``): each rank
reads a ``1 / S`` share of its MLP weights (the largest part of the weights a step
reads), and one all-reduce sums the parts — over the sequence group at T = 1, over the
whole replica at T > 1, where it also does the tensor group's sum. The weights stay
whole within the sequence group (prefill, where every rank runs other tokens, needs
them).

Collectives per decode step: 2 per sparse layer, 1 per dense layer, plus one per
layer with the MLP split, plus one broadcast of the sampled tokens. Admission
(whether a request's pages fit) is one tiny all-reduce per attempt, so every rank
admits the same requests. Per prefill round: 2 per layer, plus one broadcast of
the last prompt token's logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from longquest.engine.attention import AttentionComm, LocalComm
from longquest.engine.config import EngineConfig, ModelConfig
from longquest.engine.model import MlpSplit, Model
from longquest.engine.ranks import ProgressCallback
from longquest.engine.sequence import Sequence
from longquest.kernels import plan_append
from longquest.parallel.mesh import build_mesh
from longquest.parallel.ownership import PageOwnership
from longquest.parallel.peer import PeerCollectives
from longquest.parallel.prefill import ContextParallelAttention, RoundPlan
from longquest.parallel.tensor import GroupCollectives, SplitMlp

if TYPE_CHECKING:
    from longquest.engine.engine import LLMEngine
    from longquest.engine.tokenizer import Tokenizer


class SequenceParallelRanks:
    """The :class:`~longquest.engine.ranks.RankGroup` of one rank of a sequence-parallel
    group: ``LLMEngine(ranks=SequenceParallelRanks(...), ...)``.

    group: the process group of the ``world_size`` sequence ranks; ``rank`` is this
        one's index.
    comm: decode attention's collectives (``SequenceParallelComm``), also the MLP split's
        at T = 1.
    device: where the admission and token collectives' tensors live (NCCL needs CUDA).
    split_mlp: decode splits every MLP over the ranks where they divide it.
    replica: the replica's whole group (all T x S ranks), over which admission and the
        sampled tokens are agreed; None when ``group`` is the whole replica (T = 1).
    mlp_sum: the replica's whole group's collectives, which sum a tensor-parallel
        model's MLP parts when decode splits them over the sequence ranks (T > 1).
    """

    def __init__(
        self,
        *,
        group: dist.ProcessGroup,
        ownership: PageOwnership,
        world_size: int,
        rank: int,
        comm: AttentionComm,
        device: torch.device | str,
        split_mlp: bool = True,
        replica: dist.ProcessGroup | None = None,
        mlp_sum: GroupCollectives | None = None,
    ) -> None:
        if ownership.world_size != world_size:
            raise ValueError(
                f"ownership is for {ownership.world_size} ranks but world_size={world_size}"
            )
        self.group = group
        self.ownership = ownership
        self.world_size = world_size
        self.rank = rank
        self.comm = comm
        self.device = torch.device(device)
        self.split_mlp = split_mlp
        self.replica = group if replica is None else replica
        self.mlp_sum = mlp_sum
        # Rank 0 of the replica samples for everyone.
        self._source = dist.get_global_rank(self.replica, 0)

    def owner(self, *, page_index: int) -> int:
        return self.ownership.owner(page_index=page_index)

    def next_local_page(self, *, page_index: int) -> int:
        return self.ownership.next_local_page(rank=self.rank, page_index=page_index)

    def agreed_pages(self, num_pages: int) -> int:
        # Every rank plans with the smallest pool, so capacity decisions agree.
        return self.agree_min(num_pages)

    def most_pages_needed(self, *, num_pages: int) -> int:
        own = self.ownership
        return max(own.num_local_pages(rank=r, num_pages=num_pages) for r in range(self.world_size))

    def all_agree(self, fits: bool) -> bool:
        return bool(self.agree_min(int(fits)))

    def agree_min(self, value: int) -> int:
        flag = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.replica)
        return int(flag)

    def share_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        dist.broadcast(tokens, src=self._source, group=self.replica)
        return tokens

    def mlp_split(self, *, model: Model, model_config: ModelConfig) -> MlpSplit | None:
        """Each rank reads only its share of the MLP weights in decode (see MlpSplit)."""
        if not self.split_mlp or self.world_size == 1:
            return None
        tensor_parallel = model.tensor is not None
        reducer = self.mlp_sum if tensor_parallel else self.comm
        if not hasattr(reducer, "all_reduce"):
            raise ValueError(
                "split_mlp needs the collectives that sum the parts (comm=SequenceParallelComm "
                "at T = 1, mlp_sum=GroupCollectives over the replica at T > 1), got "
                f"{type(reducer).__name__}; pass split_mlp=False"
            )
        if model.layers[0].down_proj.shape[1] % self.world_size:
            return None  # this rank's intermediate size does not split evenly
        model.split_mlp(blocks=self.world_size)
        if not tensor_parallel:
            return self.comm
        return SplitMlp(rank=self.rank, world_size=self.world_size, everyone=self.mlp_sum)

    def prefill(
        self, *, engine: LLMEngine, seq: Sequence, on_progress: ProgressCallback | None
    ) -> torch.Tensor:
        """Context-parallel prefill in rounds, from the end of ``seq.cached_pages`` (pages
        already in ``seq.local_pages``); the rank holding the last prompt token computes
        its logits and shares them."""
        if self.ownership.page_size != engine.page_size:
            raise ValueError(
                f"ownership page_size {self.ownership.page_size} != cache page_size "
                f"{engine.page_size}"
            )
        prompt = seq.prompt
        own = self.ownership
        start = seq.cached_pages * engine.page_size
        if start >= len(prompt):
            raise ValueError(
                f"seq.cached_pages={seq.cached_pages} covers {start} tokens of a "
                f"{len(prompt)}-token prompt; the last prompt token must be computed"
            )
        hidden = None
        last_owner = own.tail_owner(seq_len=len(prompt))
        rounds = range(own.first_round(start=start), own.num_rounds(prompt_len=len(prompt)))
        for round_index in rounds:
            plan, positions = self._round_plan(engine, seq, round_index, start=start)
            attention = ContextParallelAttention(
                cache=engine.cache,
                plan=plan,
                group=self.group,
                world_size=self.world_size,
                impl=engine.impl,
                tuning=engine.tuning,
                replica=self.replica,
            )
            with torch.inference_mode():
                if positions:
                    ids = torch.tensor([prompt[p] for p in positions], dtype=torch.int64)
                    out = engine.model(
                        input_ids=ids.to(engine.device),
                        positions=torch.tensor(positions, dtype=torch.int64).to(engine.device),
                        attention=attention,
                    )
                    if positions[-1] == len(prompt) - 1:
                        hidden = out[-1:]
                else:
                    self._join_round_without_tokens(engine, attention)
            if on_progress:
                on_progress("prefill", plan.round_end, len(prompt))
        vocab_size = engine.config.vocab_size
        logits = torch.empty(1, vocab_size, dtype=torch.float32, device=engine.device)
        if self.rank == last_owner:
            with torch.inference_mode():
                logits.copy_(engine.model.compute_logits(hidden))
        dist.broadcast(logits, src=dist.get_global_rank(self.group, last_owner), group=self.group)
        return logits

    @staticmethod
    def _join_round_without_tokens(engine: LLMEngine, attention: ContextParallelAttention) -> None:
        """A rank with no tokens in a partial round (the last, or the first after a
        cached prefix) still takes part in every layer's collectives: its keys serve the
        other ranks' queries."""
        config, device, model = engine.config, engine.device, engine.model
        dtype = engine.cache.shape.dtype
        query = torch.empty(0, model.num_qo_heads, config.head_dim, dtype=dtype, device=device)
        key = torch.empty(0, model.num_kv_heads, config.head_dim, dtype=dtype, device=device)
        for layer in range(config.num_layers):
            attention(layer=layer, query=query, key=key, value=key)

    def _round_plan(
        self, engine: LLMEngine, seq: Sequence, round_index: int, *, start: int
    ) -> tuple[RoundPlan, list[int]]:
        """The plan of one prefill round of a prefill from token ``start``, and this
        rank's token positions in it."""
        own, prompt_len, page_size = self.ownership, len(seq.prompt), engine.page_size
        span = dict(start=start, prompt_len=prompt_len, round_index=round_index)
        ranges = [own.prefill_positions(rank=r, **span) for r in range(self.world_size)]
        counts = [sum(b - a for a, b in rs) for rs in ranges]
        width = max(max(counts), 1)
        round_start, round_end = own.round_span(**span)
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
        engine.grow(seq, num_tokens=round_end)
        local = dict(seq.local_pages)
        # Every page before the round is full and earlier than all its queries, cached
        # (shared) pages included: attended without a mask.
        first_page = round_start // page_size
        past = [phys for g, phys in seq.local_pages if g < first_page]
        segments = []
        for a, b in ranges[self.rank]:
            pages = [local[g] for g in range(a // page_size, -(-b // page_size))]
            segments.append((a, b, torch.tensor(pages, dtype=torch.int32, device=engine.device)))
        slots = None
        if positions:
            slots = torch.tensor(
                [local[p // page_size] * page_size + p % page_size for p in positions],
                dtype=torch.int64,
            ).to(engine.device)
        device = engine.device
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


def check_same_everywhere(config: EngineConfig, *, group: dist.ProcessGroup) -> None:
    """Raise ValueError on every rank if the ranks were started with different configs.

    One all-gather of the config's JSON at start-up: a rank with another budget,
    page size or model would otherwise hang or silently compute garbage later.
    """
    mine = config.to_json()
    everyone: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    for rank, theirs in enumerate(everyone):
        if theirs != mine:
            raise ValueError(
                f"ranks were started with different settings: this rank has {mine}, rank "
                f"{rank} has {theirs}; start every rank with the same arguments"
            )


def build_worker(
    config: EngineConfig, *, group: dist.ProcessGroup, rank: int, device: torch.device | str
) -> tuple[LLMEngine, Tokenizer]:
    """This rank's engine (with :class:`SequenceParallelRanks`) and the tokenizer.

    config: the same on every rank (checked); ``config.parallel.world_size`` ranks form
        ``group`` (one replica), split ``tensor_parallel_size`` x S as
        :mod:`longquest.parallel.mesh` lays them out. device: this rank's device (its GPU,
        or the CPU). Collective: every rank of ``group`` calls it.
    """
    from longquest.engine.builder import build_engine
    from longquest.parallel.comm import SequenceParallelComm

    check_same_everywhere(config, group=group)
    world_size, parallel = config.parallel.world_size, config.parallel
    if dist.get_world_size(group) != world_size:
        raise ValueError(
            f"the group has {dist.get_world_size(group)} ranks but the config's "
            f"world_size={world_size}; start as many ranks as ParallelConfig.world_size"
        )
    device = torch.device(device)
    mesh = build_mesh(group=group, rank=rank, tensor_parallel_size=parallel.tensor_parallel_size)
    size, sequences = mesh.tensor_parallel_size, mesh.sequence_parallel_size

    def peer_over(axis: dist.ProcessGroup, axis_rank: int, axis_size: int):
        if not parallel.peer_collectives:
            return None
        return PeerCollectives.create(
            group=axis, rank=axis_rank, world_size=axis_size, device=device, tuning=config.tuning
        )

    # Every rank builds the axes' collectives in the same order: tensor, sequence, replica.
    tensor = mlp_sum = None
    if size > 1:
        tensor = GroupCollectives(
            group=mesh.tensor, rank=mesh.tensor_rank, world_size=size,
            peer=peer_over(mesh.tensor, mesh.tensor_rank, size), tuning=config.tuning,
        )  # fmt: skip
    # A tensor rank with one sequence rank holds every page of its heads: nothing to join.
    comm: AttentionComm = LocalComm()
    if sequences > 1 or size == 1:
        comm = SequenceParallelComm(
            group=mesh.sequence, rank=mesh.sequence_rank, world_size=sequences,
            impl=config.impl, peer=peer_over(mesh.sequence, mesh.sequence_rank, sequences),
            tuning=config.tuning,
        )  # fmt: skip
    if size > 1 and sequences > 1 and parallel.split_mlp:
        mlp_sum = GroupCollectives(
            group=group, rank=rank, world_size=world_size,
            peer=peer_over(group, rank, world_size), tuning=config.tuning,
        )  # fmt: skip
    # A round splits into 2 * S blocks of whole pages.
    page_size = config.quest.page_size
    step = 2 * page_size
    chunk = max(step, config.prefill_chunk_tokens // step * step)
    ranks = SequenceParallelRanks(
        group=mesh.sequence,
        ownership=PageOwnership(
            world_size=sequences, page_size=page_size, prefill_chunk_tokens=chunk
        ),
        world_size=sequences,
        rank=mesh.sequence_rank,
        comm=comm,
        device=device,
        split_mlp=parallel.split_mlp,
        replica=group,
        mlp_sum=mlp_sum,
    )
    return build_engine(config, device=device, ranks=ranks, tensor=tensor)
