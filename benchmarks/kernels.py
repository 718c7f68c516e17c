"""Kernel benchmark: one Llama-3.1-8B attention layer's Quest decode step on one GPU.

For every (batch, context) it times, eager and CUDA-graph-captured: the append of
one decode token per sequence, page scoring, page selection, attention over the
selected pages, the merge of two partial states (as sequence parallelism does),
the Quest step (scores + select + attention, *without* the merge) and the Quest
total (step + merge), beside dense decode by torch SDPA on contiguous K/V and by
the engine's own paged kernel (``selected=None``). Pages are a random permutation
of the pool, as an allocator leaves them. A correctness check against SDPA runs
first; a wrong kernel stops the run before any number is printed.

    python benchmarks/kernels.py                      # GPU: the full grid, ~minutes
    python benchmarks/kernels.py --smoke              # CPU, tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `longquest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    bench,
    bench_graph,
    bench_host,
    measure_copy_bandwidth,
    print_table,
    write_result,
)
from benchmarks.quest_check import LayerShape, check_correctness, launcher_options, sdpa  # noqa: E402
from longquest.kernels import (  # noqa: E402
    append_kv,
    merge_attention_states,
    page_scores,
    paged_decode_attention,
    plan_append,
    select_pages,
)

LLAMA_8B = LayerShape(num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16)
SMOKE = LayerShape(num_qo_heads=8, num_kv_heads=2, head_dim=64, page_size=16)
OPS = ("append", "scores", "select", "attend", "merge", "quest_step", "dense_paged", "sdpa")
HEADROOM = 3 * 2**30  # do_bench's 256 MiB flush buffer, graph pools, scores, allocator slack
