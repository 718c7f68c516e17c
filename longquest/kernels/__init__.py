"""Quest's kernels: Triton implementations beside plain PyTorch references (ref.py).

Every public launcher takes keyword-only arguments, validates shapes, dtypes and
devices, and accepts ``impl="triton" | "torch" | None`` (None: Triton on CUDA,
PyTorch elsewhere). Launchers whose tiles or grids are tuned take
``tuning: KernelTuning`` (default :data:`DEFAULT_TUNING`). Layouts are documented in
:mod:`longquest.kernels.ref`. engine/ and parallel/ import from this module only.
"""

from longquest.kernels._checks import INDEX_DTYPES, check_dim, check_tensor
from longquest.kernels.append import AppendPlan, append_kv, plan_append, plan_decode_append
from longquest.kernels.coarse import coarse_bounds, refresh_last_full_group
from longquest.kernels.decode import paged_decode_attention
from longquest.kernels.float8 import (
    FLOAT8_DTYPE,
    FLOAT8_MAX,
    check_keys_fit_float8,
    store_bounds,
)
from longquest.kernels.global_topk import keep_global_top_k, pack_candidates
from longquest.kernels.merge import merge_attention_states
from longquest.kernels.norm_rope import add_rms_norm, rms_norm, rotate_query_key, silu_mul
from longquest.kernels.peer import MAX_PROGRAMS as PEER_MAX_PROGRAMS
from longquest.kernels.peer import SUM_DTYPES, buffer_bytes, peer_exchange
from longquest.kernels.peer_attention import peer_gather_candidates, peer_merge
from longquest.kernels.prefill import prefill_attention
from longquest.kernels.scores import page_scores
from longquest.kernels.topk import select_pages
from longquest.kernels.topk_spread import make_select_workspace
from longquest.kernels.tuning import DEFAULT_TUNING, KernelTuning
from longquest.kernels.two_level import (
    group_page_scores,
    select_candidates,
    select_pages_two_level,
)

__all__ = [
    "DEFAULT_TUNING",
    "FLOAT8_DTYPE",
    "FLOAT8_MAX",
    "INDEX_DTYPES",
    "PEER_MAX_PROGRAMS",
    "SUM_DTYPES",
    "AppendPlan",
    "KernelTuning",
    "add_rms_norm",
    "append_kv",
    "buffer_bytes",
    "check_dim",
    "check_keys_fit_float8",
    "check_tensor",
    "coarse_bounds",
    "group_page_scores",
    "keep_global_top_k",
    "make_select_workspace",
    "merge_attention_states",
    "pack_candidates",
    "page_scores",
    "paged_decode_attention",
    "peer_exchange",
    "peer_gather_candidates",
    "peer_merge",
    "plan_append",
    "plan_decode_append",
    "prefill_attention",
    "refresh_last_full_group",
    "rms_norm",
    "rotate_query_key",
    "select_candidates",
    "select_pages",
    "select_pages_two_level",
    "silu_mul",
    "store_bounds",
]
