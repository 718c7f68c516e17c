"""How much fits: per GPU memory of every (T, S) layout of a model on ``num_gpus`` GPUs,
from its config.json alone (no weights read, no model built).

A layout is ``T`` tensor-parallel ranks times ``S = num_gpus / T`` sequence-parallel
ranks (see ARCHITECTURE.md, "Parallelism"). ``T`` divides the KV heads, the query heads
and the intermediate size; ``T`` larger than the KV heads (splitting one KV head's pages
over several ranks) is not supported. Per GPU:

- weights: at ``T = 1`` the whole model (every rank holds it). At ``T > 1`` ``1 / T`` of
  the q/k/v, o, gate/up and down projections and of the embedding and LM head (by
  vocabulary rows); the norms are replicated.
- KV pages: the cache's own page size (:class:`~longquest.engine.cache.CacheShape`) for
  ``num_kv_heads / T`` heads, Quest's key bounds included; a sequence's pages are spread
  over the ``S`` ranks by :class:`~longquest.parallel.ownership.PageOwnership`.
- working memory: an estimate, on the safe side, of what the engine needs beside
  weights and pages (:func:`working_bytes`).
- the cache: what the engine's default sizing gives it (``memory_fraction`` of the
  memory left after weights, less a fixed headroom: ``engine_cache_bytes``), or less
  where the working estimate needs more.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from longquest.engine.cache import CacheShape, pages_for
from longquest.engine.config import (
    BOUNDS_DTYPE_NAMES,
    DTYPE_NAMES,
    CacheConfig,
    ModelConfig,
)
from longquest.engine.validate import check_float, check_int
from longquest.parallel.ownership import PageOwnership

GIB = 2**30
# The tokens a "1M" context holds, and the unit of the KV column.
MILLION_TOKENS = 2**20


@dataclass(frozen=True, kw_only=True)
class PlanAssumptions:
    """What the plan sets aside beyond weights and pages; each figure errs high."""

    # CUDA context, cuBLAS and Triton workspaces: outside the free memory the engine sees.
    cuda_context_bytes: int = GIB
    # NCCL communicators of the T and S groups and the peer-memory buffers (2+ GPUs only).
    collective_bytes: int = GIB
    # Decode's CUDA graphs keep their intermediates in one pool while a batch runs.
    cuda_graph_bytes: int = GIB
    # Sequences a decode batch's logits are counted for.
    decode_rows: int = 64
    # Kept out of the cache before memory_fraction (longquest.engine.builder.cache_pages).
    engine_headroom_bytes: int = 2 * GIB


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """What to plan for.

    context_tokens: tokens of one sequence (prompt and generated) to hold.
    num_gpus: GPUs of one replica (``T * S``).
    gpu_memory_gib: memory of each GPU, GiB.
    dtype: the model dtype (``EngineConfig.dtype`` names; ``"auto"`` is bf16, as on CUDA).
    bounds_dtype: ``CacheConfig.bounds_dtype`` (None: the model dtype).
    page_size, prefill_chunk_tokens: as in ``QuestConfig`` / ``EngineConfig``.
    memory_fraction: ``CacheConfig.memory_fraction``.
    """

    context_tokens: int
    num_gpus: int
    gpu_memory_gib: float
    dtype: str = "bfloat16"
    bounds_dtype: str | None = None
    page_size: int = 16
    prefill_chunk_tokens: int = 8192
    memory_fraction: float = CacheConfig().memory_fraction

    def __post_init__(self) -> None:
        check_int(self.context_tokens, name="PlanRequest.context_tokens", minimum=1,
                  accepts="a whole number of tokens >= 1")  # fmt: skip
        check_int(self.num_gpus, name="PlanRequest.num_gpus", minimum=1,
                  accepts="a whole number >= 1")  # fmt: skip
        check_float(self.gpu_memory_gib, name="PlanRequest.gpu_memory_gib", above=0.0,
                    accepts="a number of GiB > 0")  # fmt: skip
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(
                f"PlanRequest.dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}"
            )
        if self.bounds_dtype not in BOUNDS_DTYPE_NAMES:
            names = ", ".join(name for name in BOUNDS_DTYPE_NAMES if name)
            raise ValueError(
                f"PlanRequest.bounds_dtype must be None or {names}, got {self.bounds_dtype!r}"
            )
        check_int(self.page_size, name="PlanRequest.page_size", minimum=1,
                  accepts="a power of two (16)")  # fmt: skip
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"PlanRequest.page_size must be a power of two, got {self.page_size}")
        step = 2 * self.page_size
        multiple = f"a positive multiple of 2 * page_size = {step}"
        check_int(self.prefill_chunk_tokens, name="PlanRequest.prefill_chunk_tokens",
                  minimum=step, accepts=multiple)  # fmt: skip
        if self.prefill_chunk_tokens % step:
            raise ValueError(
                f"PlanRequest.prefill_chunk_tokens must be {multiple}, "
                f"got {self.prefill_chunk_tokens}"
            )
        check_float(self.memory_fraction, name="PlanRequest.memory_fraction", above=0.0,
                    maximum=1.0, accepts="a number in (0, 1]")  # fmt: skip

    @property
    def torch_dtype(self) -> torch.dtype:
        # Imported here, as the loader below: the CLI builds its parser without them.
        from longquest.engine.builder import resolve_dtype

        return resolve_dtype(self.dtype, torch.device("cuda"))

    @property
    def torch_bounds_dtype(self) -> torch.dtype | None:
        from longquest.engine.builder import resolve_bounds_dtype

        return resolve_bounds_dtype(self.bounds_dtype)

    @property
    def gpu_memory_bytes(self) -> int:
        return int(self.gpu_memory_gib * GIB)


@dataclass(frozen=True, kw_only=True)
class Layout:
    """One (T, S) layout, per GPU. Bytes throughout; contexts in tokens of one sequence.

    page_bytes: one KV page of this GPU's heads, every layer, key bounds included.
    working_bytes: the working-memory estimate at the requested context, or at
        ``max_context`` when that is shorter (it grows with the context).
    engine_cache_bytes: the cache the engine's default sizing would allocate.
    kv_budget_bytes: the cache that leaves room for ``working_bytes``: the smaller of
        ``engine_cache_bytes`` and what weights and working memory leave.
    max_context: the longest sequence the layout holds (0: not even the weights fit).
    """

    tensor_parallel: int
    sequence_parallel: int
    context_tokens: int
    weight_bytes: int
    page_bytes: int
    page_size: int
    working_bytes: int
    engine_cache_bytes: int
    kv_budget_bytes: int
    max_context: int

    @property
    def kv_bytes_per_million(self) -> int:
        """KV bytes on each GPU for 2**20 tokens of one sequence."""
        return self.page_bytes * (MILLION_TOKENS // self.page_size) // self.sequence_parallel

    @property
    def fits(self) -> bool:
        return self.max_context >= self.context_tokens

    @property
    def engine_cache_too_large(self) -> bool:
        """The engine's default cache would leave less than the working estimate."""
        return self.engine_cache_bytes > self.kv_budget_bytes


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of ``model_dir/config.json``; reads nothing else.

    FileNotFoundError when the directory or its config.json is missing; ValueError when
    the file is not JSON or describes an architecture the engine does not run.
    """
    from longquest.engine.loader import model_config_from_hf, read_hf_config

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        where = "does not exist" if not path.is_dir() else "has no config.json"
        raise FileNotFoundError(
            f"model directory {str(path)!r} {where}; pass a Hugging Face model directory "
            "(only its config.json is read)"
        )
    hf_config = read_hf_config(path)
    return model_config_from_hf(hf_config)


def tensor_parallel_sizes(model: ModelConfig, *, num_gpus: int) -> list[int]:
    """The T that divide ``num_gpus``, the KV heads, the query heads and the MLP, ascending."""
    sizes = (model.num_kv_heads, model.num_qo_heads, model.intermediate_size, num_gpus)
    return [t for t in range(1, num_gpus + 1) if all(size % t == 0 for size in sizes)]


def parameters_per_gpu(model: ModelConfig, *, tensor_parallel: int) -> int:
    """Parameters one GPU holds at tensor-parallel size T (1: the whole model).

    The projections split T ways, the embedding and LM head by ``ceil(vocab / T)`` rows
    (one tensor when tied), the norms whole on every rank.
    """
    t, hidden, head_dim = tensor_parallel, model.hidden_size, model.head_dim
    qkv_rows = (model.num_qo_heads + 2 * model.num_kv_heads) * head_dim
    split = qkv_rows * hidden + hidden * model.num_qo_heads * head_dim
    split += 3 * model.intermediate_size * hidden  # gate, up, down
    split += qkv_rows if model.qkv_bias else 0
    replicated = 2 * hidden + (2 * head_dim if model.qk_norm else 0)
    vocab_rows = -(-model.vocab_size // t)
    embedding = vocab_rows * hidden * (1 if model.tie_word_embeddings else 2)
    return model.num_layers * (split // t + replicated) + embedding + hidden


def page_bytes_per_gpu(model: ModelConfig, *, tensor_parallel: int, request: PlanRequest) -> int:
    """Bytes of one page on one GPU: the engine's own ``CacheShape.bytes_per_page`` for
    the GPU's ``num_kv_heads / T`` heads."""
    shape = CacheShape(
        num_layers=model.num_layers,
        num_pages=1,
        page_size=request.page_size,
        num_kv_heads=model.num_kv_heads // tensor_parallel,
        head_dim=model.head_dim,
        dtype=request.torch_dtype,
        bounds_dtype=request.torch_bounds_dtype,
    )
    return shape.bytes_per_page


def pages_per_gpu(*, context_tokens: int, sequence_parallel: int, request: PlanRequest) -> int:
    """Pages the most loaded of the S ranks holds for one sequence of ``context_tokens``."""
    num_pages = pages_for(context_tokens, request.page_size)
    ownership = PageOwnership(
        world_size=sequence_parallel,
        page_size=request.page_size,
        prefill_chunk_tokens=request.prefill_chunk_tokens,
    )
    return max(
        ownership.num_local_pages(rank=rank, num_pages=num_pages)
        for rank in range(sequence_parallel)
    )


def working_bytes(
    model: ModelConfig,
    *,
    tensor_parallel: int,
    sequence_parallel: int,
    local_tokens: int,
    request: PlanRequest,
    assumptions: PlanAssumptions,
) -> int:
    """Working memory of one GPU, summed over phases that the engine runs one after the
    other (so it errs high):

    - a prefill chunk's activations: the residual stream, q/k/v, the MLP's gate/up; under
      sequence parallelism the round's ``S x chunk`` queries and the fp32 partial results
      every rank sends and receives;
    - prefill attention's K and V of one layer's earlier pages (``local_tokens`` of them
      on this GPU), gathered, and a copy of each (the gather's indexing, or a layout
      the attention kernel wants);
    - decode logits (fp32, the whole vocabulary, and the sampler's copy) for
      ``decode_rows`` sequences, the CUDA graph pool, the CUDA context and, on 2+ GPUs,
      the collectives' buffers.
    """
    t, element = tensor_parallel, request.torch_dtype.itemsize
    chunk, rows = request.prefill_chunk_tokens, sequence_parallel * request.prefill_chunk_tokens
    head_dim, hidden = model.head_dim, model.hidden_size
    qo_heads, kv_heads = model.num_qo_heads // t, model.num_kv_heads // t
    stream = 4 * chunk * hidden * element
    qkv = 2 * chunk * (qo_heads + 2 * kv_heads) * head_dim * element
    attention = 3 * rows * qo_heads * head_dim * element + 3 * rows * qo_heads * (head_dim + 1) * 4
    mlp = 3 * chunk * (model.intermediate_size // t) * element
    gather = 4 * local_tokens * kv_heads * head_dim * element
    logits = 2 * assumptions.decode_rows * model.vocab_size * 4
    fixed = assumptions.cuda_context_bytes + assumptions.cuda_graph_bytes
    if tensor_parallel * sequence_parallel > 1:
        fixed += assumptions.collective_bytes
    return stream + qkv + attention + mlp + gather + logits + fixed


def engine_cache_bytes(
    *, free_bytes: int, memory_fraction: float, assumptions: PlanAssumptions
) -> int:
    """The cache the engine sizes by default when ``free_bytes`` are free after loading
    the weights (``longquest.engine.builder.cache_pages``)."""
    return int(max(0, free_bytes - assumptions.engine_headroom_bytes) * memory_fraction)


def plan_layout(
    model: ModelConfig,
    *,
    tensor_parallel: int,
    request: PlanRequest,
    assumptions: PlanAssumptions = PlanAssumptions(),
) -> Layout:
    """The memory of one layout (``tensor_parallel`` must divide ``request.num_gpus``)."""
    t, s = tensor_parallel, request.num_gpus // tensor_parallel
    weights = parameters_per_gpu(model, tensor_parallel=t) * request.torch_dtype.itemsize
    page_bytes = page_bytes_per_gpu(model, tensor_parallel=t, request=request)
    left = request.gpu_memory_bytes - weights
    engine_cache = engine_cache_bytes(
        free_bytes=max(0, left - assumptions.cuda_context_bytes),
        memory_fraction=request.memory_fraction,
        assumptions=assumptions,
    )

    def budget(context: int) -> tuple[int, int]:
        """(working bytes, cache bytes that leave room for them) at ``context`` tokens."""
        local = pages_per_gpu(context_tokens=context, sequence_parallel=s, request=request)
        working = working_bytes(
            model, tensor_parallel=t, sequence_parallel=s,
            local_tokens=local * request.page_size, request=request, assumptions=assumptions,
        )  # fmt: skip
        return working, max(0, min(engine_cache, left - working))

    def holds(context: int) -> bool:
        pages = pages_per_gpu(context_tokens=context, sequence_parallel=s, request=request)
        return pages <= budget(context)[1] // page_bytes  # the pages the cache allocates

    # The largest context that holds: binary search (pages and working memory both grow
    # with it); ``high`` needs more pages than the whole memory holds.
    low, high = 0, s * request.page_size * (max(0, left) // page_bytes + 2)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if holds(middle) else (low, middle - 1)
    working, kv_budget = budget(min(request.context_tokens, low) or request.context_tokens)
    return Layout(
        tensor_parallel=t,
        sequence_parallel=s,
        context_tokens=request.context_tokens,
        weight_bytes=weights,
        page_bytes=page_bytes,
        page_size=request.page_size,
        working_bytes=working,
        engine_cache_bytes=engine_cache,
        kv_budget_bytes=kv_budget,
        max_context=low,
    )


def plan_layouts(
    model: ModelConfig, *, request: PlanRequest, assumptions: PlanAssumptions = PlanAssumptions()
) -> list[Layout]:
    """Every (T, S) layout of ``request.num_gpus`` GPUs the model allows, T ascending."""
    return [
        plan_layout(model, tensor_parallel=t, request=request, assumptions=assumptions)
        for t in tensor_parallel_sizes(model, num_gpus=request.num_gpus)
    ]


def recommend(layouts: list[Layout]) -> Layout | None:
    """The layout to use: the smallest T that holds the context (every T > 1 adds
    all-reduces to each layer), or None when none does."""
    return next((layout for layout in layouts if layout.fits), None)
