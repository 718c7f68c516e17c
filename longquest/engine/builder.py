"""Builds an LLMEngine from a model directory: weights, tokenizer, a sized cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from longquest.engine.cache import CacheShape, KVCache, pages_that_fit
from longquest.engine.config import DTYPE_NAMES, CacheConfig, EngineConfig, ModelConfig
from longquest.engine.engine import LLMEngine
from longquest.engine.loader import load_model
from longquest.engine.model import TensorParallel
from longquest.engine.page_keys import cache_salt
from longquest.engine.ranks import RankGroup
from longquest.engine.tokenizer import Tokenizer

# The CPU has no memory query the engine trusts (other processes share it), so
# without a configured size the cache holds this many tokens.
DEFAULT_CPU_CACHE_TOKENS = 32768

DTYPES = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
assert tuple(DTYPES) == DTYPE_NAMES, "EngineConfig validates the names resolve_dtype knows"


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` is bf16 on CUDA and fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    resolved = DTYPES[dtype]
    if resolved is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return resolved


def resolve_bounds_dtype(name: str | None) -> torch.dtype | None:
    """``CacheConfig.bounds_dtype`` as a torch dtype; None keeps the model dtype."""
    return None if name is None else getattr(torch, name)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks the current CUDA device when there is one, else the CPU."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cuda", "cpu"):
        raise ValueError(f"unknown device {str(device)!r}; use 'cuda', 'cuda:N' or 'cpu'")
    device = parsed
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available; use 'cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def cache_pages(
    *,
    config: ModelConfig,
    cache: CacheConfig,
    page_size: int,
    dtype,
    device,
    world_size: int = 1,
    num_kv_heads: int | None = None,
    most_pages_needed: Callable[[int], int] | None = None,
) -> int:
    """Pages per layer for this rank: configured, or what free device memory holds.

    world_size: the sequence ranks sharing every sequence's pages. num_kv_heads: the KV
    heads this rank's pages hold (a tensor rank's share; None: all of the model's).
    most_pages_needed(n): the most of a sequence's ``n`` pages any rank holds (the rank
    group's ownership rule); with ``cache.max_tokens`` every rank gets that many pages of
    a ``max_tokens`` sequence, so one sequence that long fits. None: an even split.
    """
    if cache.num_pages is not None:
        return cache.num_pages
    if cache.max_tokens is not None:
        pages = -(-cache.max_tokens // page_size)
        # Pages follow positions in blocks, so a short sequence may sit on few ranks.
        share = most_pages_needed(pages) if most_pages_needed else -(-pages // world_size)
        return share + 4  # rounding slack
    if device.type != "cuda":
        return -(-DEFAULT_CPU_CACHE_TOKENS // page_size)
    free, _ = torch.cuda.mem_get_info(device)
    # Keep room for activations of a prefill chunk and the logits.
    headroom = 2 * 2**30
    return pages_that_fit(
        free_bytes=int(max(0, free - headroom) * cache.memory_fraction),
        page_size=page_size,
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads if num_kv_heads is None else num_kv_heads,
        head_dim=config.head_dim,
        dtype=dtype,
        bounds_dtype=resolve_bounds_dtype(cache.bounds_dtype),
    )


def build_engine(
    config: EngineConfig,
    *,
    device: torch.device | str | None = None,
    ranks: RankGroup | None = None,
    tensor: TensorParallel | None = None,
) -> tuple[LLMEngine, Tokenizer]:
    """Load the model and tokenizer, size the cache, return the engine and tokenizer.

    config: what to build (model, dtype, Quest, cache, prefill chunk, kernels).
    device: where this rank runs; None resolves ``config.device``.
    ranks: the rank group (the sequence-parallel worker passes its own); None is one
        device. With ``config.parallel.world_size > 1`` the cache is sized for this
        rank's share of the context (its sequence ranks' share of its KV heads' pages).
    tensor: the tensor-parallel group (``config.parallel.tensor_parallel_size`` ranks)
        this rank's model is a shard of; None holds the whole model.
    """
    quest, parallel = config.quest, config.parallel
    if (1 if tensor is None else tensor.world_size) != parallel.tensor_parallel_size:
        raise ValueError(
            f"config.parallel.tensor_parallel_size={parallel.tensor_parallel_size} but the "
            f"tensor group has {1 if tensor is None else tensor.world_size} ranks; build "
            "tensor-parallel ranks with longquest.parallel.worker.build_worker"
        )
    device = resolve_device(config.device if device is None else device)
    torch_dtype = resolve_dtype(config.dtype, device)
    model, model_config = load_model(config.model, dtype=torch_dtype, device=device, tensor=tensor)
    tokenizer = Tokenizer(config.model)
    num_pages = cache_pages(
        config=model_config,
        cache=config.cache,
        page_size=quest.page_size,
        dtype=torch_dtype,
        device=device,
        world_size=parallel.sequence_parallel_size,
        num_kv_heads=model.num_kv_heads,
        most_pages_needed=None if ranks is None else _pages_needed_by(ranks),
    )
    if num_pages < 1:
        raise ValueError(
            f"no device memory left for the KV cache on {device} after loading the weights; "
            "use a smaller model, a larger CacheConfig.memory_fraction or more GPUs"
        )
    shape = CacheShape(
        num_layers=model_config.num_layers,
        num_pages=num_pages,
        page_size=quest.page_size,
        num_kv_heads=model.num_kv_heads,  # this tensor rank's heads
        head_dim=model_config.head_dim,
        dtype=torch_dtype,
        bounds_dtype=resolve_bounds_dtype(config.cache.bounds_dtype),
    )
    engine = LLMEngine(
        model=model,
        model_config=model_config,
        cache=KVCache(shape, device=device),
        quest=quest,
        detokenize=tokenizer.decode,
        eos_token_ids=tuple(model_config.eos_token_ids) + tokenizer.eos_token_ids,
        prefill_chunk_tokens=config.prefill_chunk_tokens,
        impl=config.impl,
        ranks=ranks,
        tuning=config.tuning,
        allow_long_context=config.allow_long_context,
        prefix_caching=config.prefix_caching,
        prefix_salt=cache_salt(
            model=model_config,
            dtype=torch_dtype,
            page_size=quest.page_size,
            bounds_dtype=shape.bounds_dtype,
            world_size=parallel.world_size,
            tensor_parallel_size=parallel.tensor_parallel_size,
            weights=weights_identity(config.model),
        ),
    )
    return engine, tokenizer


def weights_identity(model_dir: str) -> tuple[tuple[str, int], ...]:
    """The names and sizes of the model's safetensors files: part of the prefix cache's
    salt, so pages of other weights under the same config are never taken. (Not their
    times: copies of one model on several hosts must agree.)"""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    return tuple((path.name, path.stat().st_size) for path in files)


def _pages_needed_by(ranks: RankGroup) -> Callable[[int], int]:
    return lambda num_pages: ranks.most_pages_needed(num_pages=num_pages)
