"""Exact context-parallel prefill: each rank computes K/V of its own prompt positions.

The prompt is processed in rounds (see :mod:`longquest.parallel.ownership`): in a
round every rank runs the model on its two zigzag blocks of the round's tokens and
stores their K/V in its own pages. A prompt whose first pages were taken from a
prefix cache starts at the round holding their end, clipped to it. Attention is
made exact by passing *queries*, not keys ("pass-Q"): per layer,

1. all-gather the round's queries (``round_tokens x num_qo_heads x head_dim``);
2. every rank attends all of the round's queries to the keys it holds: its pages
   before the round, cached ones included (no mask), and its blocks of this
   round (causal mask) — giving a partial ``(out, lse)`` per query;
3. all-to-all: each rank receives the partials of its own queries from every rank
   and merges them with the log-sum-exp rule.

Two collectives per layer per round. Keys never move, so a rank's memory holds
only its share of the context: the context can exceed one GPU. Passing K/V
instead (a ring or an all-gather) moves ``2 x context`` bytes per layer per round
rather than ``~2 x round`` bytes, and an all-gather would also need the whole
context on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from longquest.engine.cache import KVCache, gather_pages, key_peak
from longquest.kernels import (
    DEFAULT_TUNING,
    FLOAT8_DTYPE,
    AppendPlan,
    KernelTuning,
    append_kv,
    check_keys_fit_float8,
    merge_attention_states,
    prefill_attention,
)
from longquest.parallel.collectives import all_gather_into_tensor


@dataclass(frozen=True, kw_only=True)
class RoundPlan:
    """One prefill round of one sequence, as every rank sees it.

    round_start, round_end: the round's prompt positions ``[round_start, round_end)``,
        its grid cell clipped to the prefill's start and the prompt's end.
    num_local, max_tokens: this rank's query tokens in the round, and the most any rank has.
    order: ``[round_tokens]`` int64 — for the round's positions in order, the row of
        the flattened all-gather ``[world_size * max_tokens]`` that holds each query.
    send_rows: ``[world_size, max_tokens]`` int64 — per destination rank, the round
        rows (0-based in the round) of that rank's queries, padded with 0.
    send_valid: ``[world_size, max_tokens]`` bool — which of ``send_rows`` are real.
    slot_mapping: ``[num_local]`` int64 cache slots of this rank's tokens (None if none);
        append_plan: its plan for ``append_kv``.
    past_pages: ``[num_past]`` int32 — this rank's physical pages before the round
        (pages taken from a prefix cache included), all full.
    segments: this rank's blocks of the round: ``(first_position, end_position,
        physical pages [num_pages] int32)``; ``first_position`` is page-aligned.
    """

    round_start: int
    round_end: int
    num_local: int
    max_tokens: int
    order: torch.Tensor
    send_rows: torch.Tensor
    send_valid: torch.Tensor
    slot_mapping: torch.Tensor | None
    append_plan: AppendPlan | None
    past_pages: torch.Tensor
    segments: tuple[tuple[int, int, torch.Tensor], ...]


class ContextParallelAttention:
    """``LayerAttention`` for one prefill round under sequence parallelism.

    group: the sequence group (``world_size`` ranks) whose pages hold the keys.
    replica: the replica's whole group, when it is larger (tensor parallelism): the fp8
        key-range check reduces over it, so that no rank is left waiting.
    """

    def __init__(
        self,
        *,
        cache: KVCache,
        plan: RoundPlan,
        group: dist.ProcessGroup,
        world_size: int,
        impl: str | None = None,
        tuning: KernelTuning = DEFAULT_TUNING,
        replica: dist.ProcessGroup | None = None,
    ) -> None:
        self.tuning = tuning
        # Every rank of the replica (all tensor ranks too) raises together on fp8 keys.
        self.replica = group if replica is None else replica
        self.cache = cache
        self.plan = plan
        self.group = group
        self.world_size = world_size
        self.impl = impl

    def _check_float8_keys(self, layer: int, key: torch.Tensor) -> None:
        """fp8 bounds: every rank raises if any rank's keys of this layer pass +-448 (one
        tiny all-reduce and a sync per layer, prefill only): a rank raising alone would
        leave the others waiting in the next collective."""
        peak = key_peak(key).reshape(1)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self.replica)
        where = f"the prompt's keys (layer {layer}, round ending at {self.plan.round_end})"
        check_keys_fit_float8(keys=peak, what=where)

    def __call__(
        self, *, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        plan = self.plan
        k_cache, v_cache, key_min, key_max = self.cache.layer(layer)
        if key_min.dtype == FLOAT8_DTYPE:
            self._check_float8_keys(layer, key)
        if plan.slot_mapping is not None:
            append_kv(
                key=key,
                value=value,
                k_cache=k_cache,
                v_cache=v_cache,
                key_min=key_min,
                key_max=key_max,
                slot_mapping=plan.slot_mapping,
                plan=plan.append_plan,
                impl=self.impl,
            )
        _, num_qo_heads, head_dim = query.shape
        world, width = self.world_size, plan.max_tokens
        # 1. Every rank gets the round's queries, in position order.
        padded = query.new_zeros(width, num_qo_heads, head_dim)
        padded[: query.shape[0]] = query
        gathered = query.new_empty(world * width, num_qo_heads, head_dim)
        all_gather_into_tensor(gathered, padded, group=self.group)
        round_queries = gathered[plan.order]  # [round_tokens, num_qo_heads, head_dim]

        # 2. Partial attention of every round query over the keys this rank holds.
        out, lse = self._local_partial(round_queries, k_cache, v_cache)

        # 3. Send each rank the partials of its queries; merge what comes back.
        packed = torch.cat((out.float(), lse[..., None]), dim=-1)  # [R, H, D + 1]
        send = packed[plan.send_rows]  # [world, width, H, D + 1]
        send[~plan.send_valid] = 0.0
        send[..., -1][~plan.send_valid] = -torch.inf
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send.contiguous(), group=self.group)
        mine = received[:, : plan.num_local]
        merged, _ = merge_attention_states(
            outputs=mine[..., :head_dim].contiguous(),
            lses=mine[..., head_dim].contiguous(),
            impl=self.impl,
        )
        return merged.to(query.dtype)

    def _local_partial(
        self, queries: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [R, H, D], lse [R, H] fp32)`` of the round's queries over local keys."""
        plan = self.plan
        num_q, num_qo_heads, head_dim = queries.shape
        outs, lses = [], []
        if plan.past_pages.numel():
            keys, values = gather_pages(
                k_cache=k_cache, v_cache=v_cache, pages=plan.past_pages, num_tokens=None
            )
            o, s = prefill_attention(
                query=queries,
                key=keys,
                value=values,
                query_start=0,
                causal=False,
                impl=self.impl,
                tuning=self.tuning,
            )
            outs.append(o)
            lses.append(s)
        for first, end, pages in plan.segments:
            keys, values = gather_pages(
                k_cache=k_cache, v_cache=v_cache, pages=pages, num_tokens=end - first
            )
            # Queries before the segment see none of it: they keep out 0, lse -inf.
            skip = first - plan.round_start
            o = queries.new_zeros(num_q, num_qo_heads, head_dim)
            s = torch.full((num_q, num_qo_heads), -torch.inf, device=queries.device)
            o[skip:], s[skip:] = prefill_attention(
                query=queries[skip:],
                key=keys,
                value=values,
                query_start=0,
                causal=True,
                impl=self.impl,
                tuning=self.tuning,
            )
            outs.append(o)
            lses.append(s)
        if not outs:
            return (
                queries.new_zeros(num_q, num_qo_heads, head_dim),
                torch.full((num_q, num_qo_heads), -torch.inf, device=queries.device),
            )
        if len(outs) == 1:
            return outs[0], lses[0]
        return merge_attention_states(
            outputs=torch.stack(outs), lses=torch.stack(lses), impl=self.impl
        )
