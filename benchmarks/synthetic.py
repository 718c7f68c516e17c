"""Random real-shape models and synthetically filled KV caches, for speed and scale work.

Decode speed does not depend on weight values, and a million-token prefill is a
benchmark of its own, so these helpers build a model of real shape with random
weights, and fill a sequence's KV pages (and their Quest bounds) with seeded random
keys and values instead of running a prefill.

The fill is defined per *global* page: page ``g`` of layer ``l`` gets the same
values whichever rank holds it, so a synthetic context decodes to the same tokens
on one device and on any number of sequence-parallel ranks.
"""

from __future__ import annotations

import torch

from longquest.engine.config import ModelConfig, SamplingParams
from longquest.engine.engine import LLMEngine
from longquest.engine.model import Model
from longquest.engine.sequence import Sequence
from longquest.kernels import store_bounds

# Tokens generated per random draw while filling (bounds the temporary memory).
_FILL_BLOCK_PAGES = 4096


def llama31_8b_config(*, max_position_embeddings: int = 4 * 2**20) -> ModelConfig:
    """Llama-3.1-8B's architecture (32 layers, 32 query / 8 KV heads, head_dim 128)."""
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_qo_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=(
            ("factor", 8.0),
            ("high_freq_factor", 4.0),
            ("low_freq_factor", 1.0),
            ("original_max_position_embeddings", 8192),
            ("rope_type", "llama3"),
        ),
        max_position_embeddings=max_position_embeddings,
        eos_token_ids=(128001, 128008, 128009),
    )


def random_model(
    config: ModelConfig, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> Model:
    """A Model of ``config``'s shape with seeded random weights (identical on every rank)."""
    model = Model(config, dtype=dtype, device=torch.device(device))
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif param.dim() >= 2:
                # 1/sqrt(fan_in) keeps activations O(1) through the layers.
                std = param.shape[-1] ** -0.5
                param.normal_(0.0, std, generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model


def fill_synthetic(
    engine: LLMEngine,
    *,
    context_tokens: int,
    first_token: int = 1,
    seed: int = 0,
    params: SamplingParams | None = None,
    request_id: int = 0,
) -> Sequence:
    """Add a sequence of ``context_tokens`` tokens whose KV cache is random, not prefilled.

    Reserves pages for ``context_tokens + params.max_tokens`` like a real request
    (``engine.add_request``: CacheCapacityError when it cannot fit), writes this rank's pages of
    every layer, and returns the Sequence, ready for ``engine.decode([...])``: its
    next input token is ``first_token``. Sequences decoded together need distinct
    ``request_id`` values (and distinct ``seed`` values for distinct contents).
    """
    params = params or SamplingParams(max_tokens=64, ignore_eos=True)
    prompt = [first_token] * context_tokens
    seq = engine.add_request(prompt, params, request_id=request_id)
    engine.grow(seq, num_tokens=context_tokens)
    cache, page_size = engine.cache, engine.page_size
    shape = cache.shape
    local = dict(seq.local_pages)  # global page -> physical page
    num_pages = -(-context_tokens // page_size)
    device = cache.k.device
    for layer in range(shape.num_layers):
        for first in range(0, num_pages, _FILL_BLOCK_PAGES):
            count = min(_FILL_BLOCK_PAGES, num_pages - first)
            mine = [g for g in range(first, first + count) if g in local]
            if not mine:
                continue
            generator = torch.Generator(device=device).manual_seed(
                seed * 1_000_003 + layer * 65_537 + first
            )
            block = (count, shape.num_kv_heads, page_size, shape.head_dim)
            keys = torch.randn(block, generator=generator, device=device, dtype=shape.dtype)
            values = torch.randn(block, generator=generator, device=device, dtype=shape.dtype)
            rows = torch.tensor([g - first for g in mine], device=device)
            pages = torch.tensor([local[g] for g in mine], device=device)
            k, v = keys[rows], values[rows]
            last = num_pages - 1
            if last in local and (context_tokens % page_size) and last in mine:
                # Slots past the context on the newest page are empty: zero, out of the bounds.
                filled = context_tokens % page_size
                where = mine.index(last)
                k[where, :, filled:] = 0
                v[where, :, filled:] = 0
            cache.k[layer, pages] = k
            cache.v[layer, pages] = v
            kmin, kmax = k.amin(dim=2), k.amax(dim=2)
            if last in mine and context_tokens % page_size:
                filled = context_tokens % page_size
                where = mine.index(last)
                kmin[where] = k[where, :, :filled].amin(dim=1)
                kmax[where] = k[where, :, :filled].amax(dim=1)
            # Rounded outward when the bounds are fp8, exactly as append_kv stores them.
            store_bounds(cache.key_min[layer], cache.key_max[layer], pages, kmin, kmax)
    # Positions 0 .. context_tokens - 1 are in the cache; the next step feeds
    # first_token at position context_tokens (the engine's "last token is the input").
    seq.output = [first_token]
    return seq


def decode_steps(engine: LLMEngine, seqs: list[Sequence], *, launches: int) -> list[float]:
    """Run ``launches`` decode launches of ``seqs`` (each makes ``engine.steps_per_launch``
    tokens a sequence, fewer near max_tokens); return each launch's wall seconds per
    token (synced). The first launch of a batch also captures its CUDA graph."""
    import time

    times = []
    for _ in range(launches):
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        before = len(seqs[0].output)
        start = time.perf_counter()
        engine.decode(seqs)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        made = max(1, len(seqs[0].output) - before)
        times.append((time.perf_counter() - start) / made)
    return times
