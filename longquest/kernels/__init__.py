"""Quest's kernels: Triton implementations beside plain PyTorch references (ref.py).

Every public launcher takes keyword-only arguments, validates shapes, dtypes and
devices, and accepts ``impl="triton" | "torch" | None`` (None: Triton on CUDA,
PyTorch elsewhere). Layouts are documented in :mod:`longquest.kernels.ref`.
"""

from longquest.kernels.append import AppendPlan, append_kv, plan_append, plan_decode_append
from longquest.kernels.decode import paged_decode_attention
from longquest.kernels.merge import merge_attention_states
from longquest.kernels.prefill import prefill_attention
from longquest.kernels.scores import page_scores
from longquest.kernels.topk import select_pages
from longquest.kernels.topk_spread import make_select_workspace

__all__ = [
    "AppendPlan",
    "append_kv",
    "make_select_workspace",
    "merge_attention_states",
    "page_scores",
    "paged_decode_attention",
    "plan_append",
    "plan_decode_append",
    "prefill_attention",
    "select_pages",
]
