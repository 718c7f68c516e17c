"""What the job benchmark runs on: the model, the prompts, engines with prefix caching on or
off, and a timed ``generate`` call.

A job's prompts go to ``LLMEngine.generate`` in one call, which is the call ``LLM.generate``
makes on one device once the prompts are token ids (the benchmark's prompts already are).
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.synthetic import llama31_8b_config, random_model
from longquest.engine.builder import DEFAULT_CPU_CACHE_TOKENS
from longquest.engine.cache import CacheShape, KVCache, pages_for, pages_that_fit
from longquest.engine.config import ModelConfig, QuestConfig, SamplingParams
from longquest.engine.engine import LLMEngine
from longquest.engine.loader import load_model
from longquest.engine.model import Model
from longquest.engine.sequence import RequestOutput

# Token ids below this are left out of random prompts (real vocabularies keep specials there).
FIRST_TOKEN = 256


@dataclass(frozen=True, kw_only=True)
class Setup:
    """The model every mode runs, where, and how it was made.

    hf_config: the model directory's transformers config, None for random weights.
    """

    model: Model
    config: ModelConfig
    hf_config: object | None
    device: torch.device
    dtype: torch.dtype
    impl: str | None
    description: str
    quest: QuestConfig = field(default_factory=QuestConfig)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def load_setup(
    *, model_dir: Path | None, device: torch.device, impl: str | None, seed: int = 0
) -> Setup:
    """A model directory's weights, or Llama-3.1-8B's shape with seeded random weights."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if model_dir is None:
        config = llama31_8b_config()
        model = random_model(config, dtype=dtype, device=device, seed=seed)
        hf_config, description = None, "Llama-3.1-8B shape, random weights"
    else:
        from transformers import AutoConfig

        model, config = load_model(model_dir, dtype=dtype, device=device)
        hf_config, description = AutoConfig.from_pretrained(model_dir), Path(model_dir).name
    return Setup(model=model, config=config, hf_config=hf_config, device=device, dtype=dtype,
                 impl=impl, description=description)  # fmt: skip


def random_tokens(count: int, *, vocab: int, seed: int) -> list[int]:
    """``count`` seeded random token ids in ``[FIRST_TOKEN, vocab)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TOKEN, vocab, (count,), generator=generator).tolist()


def job_prompts(
    *, documents: int, questions: int, context: int, question_tokens: int, vocab: int
) -> list[list[int]]:
    """Document-major prompts: document ``d``'s ``context`` tokens, then question ``q``'s own
    ``question_tokens`` tokens (every question distinct)."""
    prompts = []
    for d in range(documents):
        document = random_tokens(context, vocab=vocab, seed=1_000 + d)
        for q in range(questions):
            question = random_tokens(question_tokens, vocab=vocab, seed=1_000_000 + d * 1_000 + q)
            prompts.append(document + question)
    return prompts


def cache_pages(
    setup: Setup, *, prompts: list[list[int]], max_tokens: int, cache_tokens: int | None,
    reserve_gib: float,
) -> int:  # fmt: skip
    """Pages for the KV cache: every request at once if that fits, else what memory holds
    (CUDA: free memory less ``reserve_gib``; CPU: the builder's default token count)."""
    page = setup.quest.page_size
    if cache_tokens is not None:
        return pages_for(cache_tokens, page)
    want = sum(pages_for(len(p) + max_tokens, page) for p in prompts)
    if not setup.cuda:
        return min(want, pages_for(DEFAULT_CPU_CACHE_TOKENS, page))
    free = torch.cuda.mem_get_info(setup.device)[0] - int(reserve_gib * 2**30)
    config = setup.config
    fit = pages_that_fit(free_bytes=max(0, free), page_size=page, num_layers=config.num_layers,
                         num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                         dtype=setup.dtype)  # fmt: skip
    return min(want, fit)


def make_engine(setup: Setup, *, pages: int, chunk: int, prefix_caching: bool | None) -> LLMEngine:
    """An engine of ``pages`` KV pages; ``prefix_caching`` None leaves the engine's default."""
    config = setup.config
    shape = CacheShape(num_layers=config.num_layers, num_pages=pages,
                       page_size=setup.quest.page_size, num_kv_heads=config.num_kv_heads,
                       head_dim=config.head_dim, dtype=setup.dtype)  # fmt: skip
    switch = {} if prefix_caching is None else {"prefix_caching": prefix_caching}
    return LLMEngine(model=setup.model, model_config=config,
                     cache=KVCache(shape, device=setup.device), quest=setup.quest,
                     detokenize=lambda ids: "", eos_token_ids=(), prefill_chunk_tokens=chunk,
                     impl=setup.impl, **switch)  # fmt: skip


def release(setup: Setup) -> None:
    """Return freed memory (a dropped engine's cache) to the device."""
    gc.collect()
    if setup.cuda:
        torch.cuda.empty_cache()


def warm_up(engine: LLMEngine, setup: Setup, *, tokens: int, rows: int = 1) -> None:
    """On CUDA, compile the kernels and capture decode graphs before the clock starts, on
    prompts no job shares: one of ``tokens`` tokens alone (every prefill chunk shape, and a
    batch of one), then ``rows`` short ones together, so decode batches as wide as the
    job's are compiled too (Triton builds a kernel per class of batch width: 1, multiples
    of 16, others; one short prompt stops early, so a wide batch's two classes are both
    seen). The CPU's PyTorch kernels have nothing to compile."""
    if not setup.cuda:
        return
    vocab = setup.config.vocab_size
    long_prompt = random_tokens(tokens, vocab=vocab, seed=7)
    engine.generate([long_prompt], [SamplingParams(max_tokens=16, ignore_eos=True)])
    if rows == 1:
        return
    prompts = [random_tokens(256, vocab=vocab, seed=8 + row) for row in range(rows)]
    params = [SamplingParams(max_tokens=24, ignore_eos=True) for _ in prompts]
    params[-1] = SamplingParams(max_tokens=9, ignore_eos=True)
    engine.generate(prompts, params)


@dataclass(frozen=True, kw_only=True)
class TimedCall:
    """One timed ``generate``.

    peak_gib: the most memory allocated during the call (CUDA; None on the CPU).
    prefix_stats: the engine's prefix-cache counts during the call (its ``prefix_stats()``
        after less before; ``cached_pages`` is the change in pages the cache holds), None
        for an engine without them.
    """

    seconds: float
    outputs: list[RequestOutput]
    peak_gib: float | None
    prefix_stats: dict | None


def _prefix_counts(engine: LLMEngine) -> dict:
    return asdict(engine.prefix_stats())


def timed_generate(
    engine: LLMEngine, setup: Setup, prompts: list[list[int]], params: SamplingParams
) -> TimedCall:
    """One ``generate`` of every prompt, timed (synchronized on CUDA)."""
    before = _prefix_counts(engine)
    if setup.cuda:
        torch.cuda.synchronize(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
    start = time.perf_counter()
    outputs = engine.generate(prompts, [params] * len(prompts))
    if setup.cuda:
        torch.cuda.synchronize(setup.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(setup.device) / 2**30 if setup.cuda else None
    after = _prefix_counts(engine)
    during = None if after is None else {k: v - before.get(k, 0) for k, v in after.items()}
    return TimedCall(seconds=seconds, outputs=outputs, peak_gib=peak, prefix_stats=during)


def engine_summary(call: TimedCall, *, jobs: int) -> dict:
    """One engine mode's numbers: time, throughput, prompt tokens computed and reused."""
    outputs, seconds = call.outputs, call.seconds
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    cached = sum(getattr(o, "cached_prompt_tokens", 0) for o in outputs)
    return {
        "wall_seconds": round(seconds, 3),
        "doc_questions_per_hour": round(jobs / seconds * 3600, 1),
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
        "prefill_tokens_computed": prompt - cached,
        "prefill_seconds_sum": round(sum(o.prefill_seconds for o in outputs), 3),
        "output_tokens": sum(len(o.token_ids) for o in outputs),
        "peak_memory_gib": None if call.peak_gib is None else round(call.peak_gib, 2),
        "prefix_stats": call.prefix_stats,
    }
