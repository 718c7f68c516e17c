"""The running batch's decode metadata, kept on the device, and its CUDA graphs.

Rebuilding every sequence's page table in Python each step would cost ``O(pages)``
(tens of milliseconds at a million tokens), so the tables live in device buffers
for as long as the batch keeps the same sequences: a step sends one small
``[num_seqs, 7]`` int64 tensor (token, position, append page, append offset, local
tokens, local pages, pins-newest) and writes only the pages allocated since the
last step (``[steps, num_seqs, 7]`` when greedy steps are chained). Every tensor
the attention layers read is derived from those buffers on the device, so the whole
launch — model, Quest selection, collectives, logits or greedy tokens — can be
captured once in a CUDA graph and replayed while the batch lasts (one graph per
combination of the host-side ``sparse`` flag, greedy flag and step count).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from longquest.engine.attention import DecodeMetadata
from longquest.engine.cache import KVCache
from longquest.engine.coarse import CoarseBounds
from longquest.kernels import make_select_workspace, plan_decode_append

# Columns of the per-step row info.
TOKEN, POSITION, APPEND_PAGE, APPEND_OFFSET, SEQ_LEN, NUM_PAGES, PIN_LAST = range(7)
_COLUMNS = 7


class DecodeBatch:
    """Device buffers of one running batch, updated in ``O(num_seqs)`` per step.

    request_ids: the batch's sequences, in row order (a new batch is built when they change).
    width: page-table columns: the most local pages any of the sequences will hold.
    use_graphs: capture the step in a CUDA graph after its first eager run (CUDA only).
        The batch's graphs share one memory pool, freed with the batch.
    num_kv_heads: sizes the attention's split counters and the selection's workspace (one
        a row and KV head).
    group_pages, cache, impl: the two-level selection's pages a group (None: one level),
        the cache whose bounds the groups' coarse bounds come from, and the kernels that
        keep them.
    """

    def __init__(
        self,
        *,
        request_ids: list[int],
        width: int,
        page_size: int,
        device: torch.device,
        num_kv_heads: int,
        use_graphs: bool = False,
        max_steps: int = 1,
        group_pages: int | None = None,
        cache: KVCache | None = None,
        impl: str | None = None,
    ) -> None:
        if use_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        rows = len(request_ids)
        self.request_ids = list(request_ids)
        self.width = max(1, width)
        self.page_size = page_size
        self.device = device
        self.use_graphs = use_graphs
        # Per batch, not per engine: a pool handle outlives its graphs only while one of
        # them is alive, so a handle shared across batches would dangle.
        self.graph_pool = torch.cuda.graph_pool_handle() if use_graphs else None
        # [num_seqs, width] int32: local physical pages in position order; -1 global padding.
        self.page_table = torch.zeros(rows, self.width, dtype=torch.int32, device=device)
        self.global_pages = torch.full_like(self.page_table, -1)
        # [steps, num_seqs, 7] int64: one row block per chained step.
        self.step_info = torch.zeros(max_steps, rows, _COLUMNS, dtype=torch.int64, device=device)
        pin = device.type == "cuda"
        self._host_info = torch.zeros(max_steps, rows, _COLUMNS, dtype=torch.int64, pin_memory=pin)
        self.known_pages = [0] * rows  # page-table entries written so far, per row
        # Zeros between launches: decode attention's last split reduces (no merge kernel).
        self.split_counters = torch.zeros(rows * num_kv_heads, dtype=torch.int32, device=device)
        # Zeros between launches too: the histograms of a selection spread over programs.
        self.select_workspace = make_select_workspace(
            max_rows=max(rows * num_kv_heads, 1), device=device
        )
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.group_pages = group_pages
        self.coarse = None
        if group_pages is not None:
            if cache is None:
                raise ValueError("a two-level selection (group_pages) needs the cache")
            self.coarse = CoarseBounds(cache=cache, rows=rows, width=self.width,
                                       group_pages=group_pages, device=device,
                                       impl=impl)  # fmt: skip

    def update(self, *, rows: list[list[tuple[int, ...]]], local_pages: list[list]) -> None:
        """Load the row info of the next steps and any pages added since the last launch.

        rows: per step, per sequence ``(token, position, append_page or -1,
            append_offset, local_tokens, local_pages, pins_newest)`` (only step 0's
            token is read: later steps take the previous step's token on the device).
        local_pages: per sequence, its ``(global page, physical page)`` list (only the
            entries past what this batch has already written are read).
        """
        host = self._host_info[: len(rows)]
        host.copy_(torch.tensor(rows, dtype=torch.int64))
        new_rows, new_cols, new_phys, new_glob = [], [], [], []
        for row, pages in enumerate(local_pages):
            for col in range(self.known_pages[row], len(pages)):
                new_rows.append(row)
                new_cols.append(col)
                new_glob.append(pages[col][0])
                new_phys.append(pages[col][1])
            self.known_pages[row] = len(pages)
        if new_rows:
            if max(new_cols) >= self.width:
                raise RuntimeError(
                    f"a sequence holds {max(new_cols) + 1} pages but the batch was sized for "
                    f"{self.width}; this is a bug in the page reservation"
                )
            index = torch.tensor([new_rows, new_cols], dtype=torch.int64)
            values = torch.tensor([new_phys, new_glob], dtype=torch.int32)
            index, values = index.to(self.device), values.to(self.device)
            self.page_table[index[0], index[1]] = values[0]
            self.global_pages[index[0], index[1]] = values[1]
        if self.coarse is not None:
            # Full pages before the first step's append: the row's tokens then, by page.
            full = [(row[SEQ_LEN] - (row[APPEND_PAGE] >= 0)) // self.page_size for row in rows[0]]
            self.coarse.refresh(page_table=self.page_table, full_pages=full)
        self.step_info[: len(rows)].copy_(host, non_blocking=True)

    def first_tokens(self) -> torch.Tensor:
        """``[num_seqs]`` int64: the tokens the first step feeds in (device buffer view)."""
        return self.step_info[0, :, TOKEN]

    def inputs(self, *, step: int = 0, sparse: bool) -> tuple[torch.Tensor, DecodeMetadata]:
        """``(positions [num_seqs] int64, metadata)`` of one step, derived on the device
        from the batch's buffers (so a graph replays them)."""
        info = self.step_info[step]
        plan = plan_decode_append(
            page_ids=info[:, APPEND_PAGE].to(torch.int32),
            page_offsets=info[:, APPEND_OFFSET].to(torch.int32),
            page_size=self.page_size,
        )
        num_pages = info[:, NUM_PAGES].to(torch.int32)
        coarse = None
        if self.coarse is not None and sparse:
            appended = (info[:, APPEND_PAGE] >= 0).to(torch.int64)
            full = torch.div(info[:, SEQ_LEN] - appended, self.page_size, rounding_mode="floor")
            coarse = self.coarse.step(page_table=self.page_table, num_pages=num_pages,
                                      full_pages=full)  # fmt: skip
        meta = DecodeMetadata(
            append_plan=plan,
            slot_mapping=plan.slot_mapping,
            append_rows=None,
            page_table=self.page_table,
            seq_lens=info[:, SEQ_LEN].to(torch.int32),
            num_pages=num_pages,
            global_pages=self.global_pages,
            pin_last=info[:, PIN_LAST] != 0,
            sparse=sparse,
            split_counters=self.split_counters,
            select_workspace=self.select_workspace,
            coarse=coarse,
        )
        return info[:, POSITION], meta

    def graphs(self) -> dict[tuple, torch.cuda.CUDAGraph]:
        """The captured CUDA graphs by key (see :meth:`run`); replaying one reruns that
        step on the same buffers (benchmarks time it)."""
        return {key: graph for key, (graph, _) in self._graphs.items()}

    def run(
        self, *, key: tuple, forward: Callable[[], torch.Tensor], capture: bool = True
    ) -> torch.Tensor:
        """Run the step: ``forward()`` eagerly, or its CUDA graph once captured.

        forward: computes the step's result (logits, or greedy tokens) from
        :meth:`inputs`. key: the host-side facts ``forward`` depends on (e.g. the
        ``sparse`` flag); its first run with a given key is eager (it warms up the
        kernels and the communicators); the graph is captured right after and replayed
        from the next step on. The returned tensor is overwritten by the next replay.
        capture=False runs eagerly and captures nothing (a launch that will not recur).
        """
        if not self.use_graphs:
            return forward()
        captured = self._graphs.get(key)
        if captured is not None:
            graph, logits = captured
            graph.replay()
            return logits
        logits = forward()
        if not capture:
            return logits
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            static_logits = forward()
        self._graphs[key] = (graph, static_logits)
        return logits
