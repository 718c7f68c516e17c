"""The kernels' tuning: block sizes, program counts and split caps, in one frozen object.

Every public launcher whose grid or tiles depend on one of these takes a keyword-only
``tuning: KernelTuning = DEFAULT_TUNING``; a benchmark that compares settings passes
``dataclasses.replace(DEFAULT_TUNING, ...)``. Values are the fastest measured on an H100 or
H200 (benchmarks/NOTES-kernels.md holds the numbers behind each). Limits that a kernel's
layout imposes (not tuning) are constants of its module instead.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True, kw_only=True)
class KernelTuning:
    """Launch sizes of the Triton kernels. Every field is a positive int.

    The ``score_*`` fields size :func:`~longquest.kernels.page_scores`, ``select_*`` and
    ``spread_*`` :func:`~longquest.kernels.select_pages`, ``decode_*``
    :func:`~longquest.kernels.paged_decode_attention`, ``rank_block``
    ``keep_global_top_k`` and ``peer_*`` the peer collectives.
    """

    # Elements of one [pages, head_dim] bounds tile, elementwise form: 16 pages at head_dim 128.
    score_tile_elements: int = 2048
    # The same through the tensor cores: 32 pages at 128 (fewer registers a page; 82% of
    # copy bandwidth at 1M tokens on an H100 against 76% elementwise).
    score_dot_tile_elements: int = 4096
    # Warps of a bf16/fp16-bounds score program: 4 (about 100 registers a thread).
    score_num_warps: int = 4
    # Score programs an SM, bf16/fp16 bounds: four fit; 2 and 8 are slower at 1M tokens.
    score_programs_per_sm: int = 4
    # fp8 bounds (pages as the product's rows): 64-page tiles; 32 with 6 programs an SM
    # is as fast at 8 x 192K tokens, 128 with 8 warps slower.
    score_fp8_block_pages: int = 64
    # fp8 bounds: 2 warps; 4 are 1.7 us slower a layer at 8 x 192K on two GPUs.
    score_fp8_num_warps: int = 2
    # fp8 bounds: Triton's pipeline 3 stages deep; 4 is 0.5 us slower.
    score_fp8_num_stages: int = 3
    # fp8 bounds: 3 programs an SM; 4 is the same, 2 slower.
    score_fp8_programs_per_sm: int = 3
    # Rows up to this many pages are selected by one program in one launch.
    select_single_pass_max: int = 4096
    # The longest list one selection program holds in registers.
    select_register_max: int = 8192
    # Block a selection program loops over when its list exceeds select_register_max.
    select_loop_block: int = 4096
    # Pass-1 chunks of a two-pass selection: at least 1024 pages (8 x 6144 pages, k = 128:
    # 19.4 us against 20.4 for 2048).
    select_min_chunk: int = 1024
    # Rows longer than this may be spread over several programs in one launch.
    spread_min_pages: int = 4096
    # A spread program's part: at least 512 pages (8 x 8192 pages: 16 programs 14.1 us, 8
    # programs 15.1).
    spread_min_chunk: int = 512
    # Fewer programs a row than this take the two passes instead: 2 programs at 64 rows x
    # 6144 pages take 25.7 us against 19.8.
    spread_min_programs: int = 4
    # Prefill chunks of at least this many queries take cuDNN's fused attention; shorter
    # ones the Triton kernel: cuDNN builds a plan for every new shape (about 0.1 s on an
    # H200), which a short or ragged chunk (a question after a cached document) never repays.
    prefill_cudnn_min_queries: int = 2048
    # Tokens a decode program loads per loop iteration (several pages gathered at once).
    decode_tokens_per_block: int = 64
    # Decode programs an SM (four fit): 8 splits at a two-rank share of a 2048-token budget
    # at batch 8 take 21.9 us against 23.7 for 5.
    decode_programs_per_sm: int = 4
    # Warps of a decode program at head_dim <= 128 (twice this above).
    decode_num_warps: int = 4
    # Triton pipeline stages of the decode page gathers.
    decode_num_stages: int = 2
    # Splits when the last split reduces, over every page: 16 leave 128 programs at batch 1
    # and read 1M tokens' pages on a rank of two in 870 us against 552 for 32.
    decode_max_splits_dense: int = 32
    # The same over a selection: 16 (a rank of two: 12.0 us against 13.2 for 32 at batch 1).
    decode_max_splits_selected: int = 16
    # Splits the last split merges per L2 round trip ([group, 16, head_dim] fp32 is 64
    # registers a thread at group 4, head_dim 128).
    decode_merge_chunk: int = 16
    # Candidates a global-ranking program takes: 16 beat one program a row (8 rows, top_k
    # 256: 11.3 us against 21.0) and blocks of 32 and 64.
    rank_block: int = 16
    # A peer-collective program moves at least this many payload bytes.
    peer_min_chunk_bytes: int = 2048
    # 4-byte payload words a peer program moves per loop step.
    peer_block_words: int = 512
    # Rows a peer-merge program holds at once ([rows, head_dim] fp32 a source).
    peer_merge_rows: int = 8
    # The largest tensor-parallel sum or gather sent over peer memory (decode's, up to 512
    # rows of hidden 8192 in bf16); larger ones (a prefill chunk's) take NCCL: the peer
    # buffer is 4 x ranks x the largest payload. A memory bound, not a measured speed.
    peer_max_payload_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KernelTuning.{field.name} must be an int >= 1, got {value!r}")
        for name in (
            "score_tile_elements",
            "score_dot_tile_elements",
            "score_fp8_block_pages",
            "select_loop_block",
            "decode_tokens_per_block",
            "decode_merge_chunk",
            "rank_block",
            "peer_block_words",
            "peer_merge_rows",
        ):
            if not _power_of_two(getattr(self, name)):
                raise ValueError(
                    f"KernelTuning.{name} must be a power of two (a Triton block size), "
                    f"got {getattr(self, name)}"
                )
        if self.score_fp8_block_pages < 16:
            raise ValueError(
                "KernelTuning.score_fp8_block_pages must be >= 16 (tl.dot's smallest tile), "
                f"got {self.score_fp8_block_pages}"
            )
        if self.select_loop_block > self.select_register_max:
            raise ValueError(
                f"KernelTuning.select_loop_block ({self.select_loop_block}) must not exceed "
                f"select_register_max ({self.select_register_max})"
            )


DEFAULT_TUNING = KernelTuning()
