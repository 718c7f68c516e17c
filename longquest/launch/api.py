"""The Python API: ``LLM(model_dir, ...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from longquest.engine.config import (
    CacheConfig,
    EngineConfig,
    ParallelConfig,
    QuestConfig,
    SamplingParams,
)
from longquest.engine.scheduler import NewRequest, Scheduler, StepResult
from longquest.engine.sequence import RequestOutput
from longquest.engine.tokenizer import Prompt

# Launchers the Python API starts itself (torchrun starts processes from outside).
API_LAUNCHERS = ("local", "ray")


class LLM:
    """A model ready to generate, on one device (``launcher="local"``) or on
    ``world_size`` workers (``launcher="ray"``) that split the weights
    ``tensor_parallel_size`` ways and the KV pages the remaining ways.

    Give either the model directory and settings, or one ``config=EngineConfig(...)``:

    model: a Hugging Face model directory (config.json, tokenizer, safetensors).
    dtype: "auto" (bf16 on CUDA, fp32 on CPU), "bfloat16", "float16" or "float32".
    device: "cuda", "cuda:N", "cpu" or None (CUDA when available).
    quest: Quest sparsity; ``QuestConfig(token_budget=None)`` decodes densely.
    cache: KV cache size; by default what free GPU memory holds (32K tokens on CPU).
    world_size, launcher: the ranks (GPUs) of one replica and how they start
        (``ParallelConfig``).
    tensor_parallel_size: T, the ways the weights are split over the ``world_size`` ranks
        (it divides world_size and the model's KV heads, query heads and intermediate
        size); the other ``world_size // T`` ways split every sequence's KV pages.
    data_parallel_size: replicas of ``world_size`` ranks each, every one a Ray placement
        group on one node (``launcher="ray"`` only); ``generate`` spreads prompts over them.
    prefill_chunk_tokens: prompt tokens per prefill step (bounds activation memory).
    impl: kernels: None (Triton on CUDA, PyTorch on the CPU), "triton" or "torch".
    allow_long_context: serve prompts that, with ``max_tokens``, run past the context
        the model declares (refused by default, before any work).
    prefix_caching: reuse the KV pages of prompt prefixes seen before (a document asked
        several questions is prefilled once); outputs are those of a full prefill.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        config: EngineConfig | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        quest: QuestConfig | None = None,
        cache: CacheConfig | None = None,
        world_size: int = 1,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        launcher: str = "local",
        prefill_chunk_tokens: int = 8192,
        impl: str | None = None,
        allow_long_context: bool = False,
        prefix_caching: bool = True,
    ) -> None:
        settings = dict(dtype=dtype, device=device, quest=quest, cache=cache,
                        world_size=world_size, tensor_parallel_size=tensor_parallel_size,
                        data_parallel_size=data_parallel_size,
                        launcher=launcher, prefill_chunk_tokens=prefill_chunk_tokens, impl=impl,
                        allow_long_context=allow_long_context,
                        prefix_caching=prefix_caching)  # fmt: skip
        if config is None:
            if model is None:
                raise ValueError("give the model directory: LLM(model_dir, ...)")
            config = engine_config(model, **settings)
        elif model is not None or settings != _DEFAULT_SETTINGS:
            raise ValueError(
                "give either config=EngineConfig(...) or the model and its settings, not both"
            )
        if config.parallel.launcher not in API_LAUNCHERS:
            raise ValueError(
                f"LLM starts the 'local' or the 'ray' launcher, got {config.parallel.launcher!r}; "
                "start torchrun ranks with `longquest batch --launcher torchrun` or torchrun"
            )
        check_tensor_layout(config)
        self.config = config
        self.quest = config.quest
        self._engine = self._cluster = self._scheduler = self._replicas = None
        if config.parallel.launcher == "local":
            from longquest.engine.builder import build_engine

            self._engine, self.tokenizer = build_engine(config)
        else:
            from longquest.engine.tokenizer import Tokenizer
            from longquest.launch.replicas import ReplicaSet

            self._replicas = ReplicaSet(config)
            if len(self._replicas) == 1:
                self._cluster = self._replicas.clusters[0]
            try:
                self.tokenizer = Tokenizer(config.model)
            except BaseException:  # no LLM to shut down: release the workers here
                self.shutdown()
                raise

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; one RequestOutput per prompt, in order.

        A prompt is a string, a list of token ids, or chat messages
        (``[{"role": "user", "content": ...}]``, formatted by the chat template).
        With several replicas the prompts are spread over them, and a prompt the engine
        refuses raises its ValueError once the others are served.
        """
        if not isinstance(prompts, (str, list, tuple)):
            raise ValueError(f"prompts must be a string or a list of prompts, got {prompts!r}")
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and not isinstance(prompts[0], (str, list))
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [0]
            if not all(isinstance(p, SamplingParams) for p in params):
                raise ValueError(
                    "sampling_params must be a SamplingParams or a list of them (one per "
                    f"prompt); for a dict write SamplingParams(**d). Got {sampling_params!r}"
                )
            if len(params) != len(prompts):
                raise ValueError(
                    f"{len(prompts)} prompts but {len(params)} SamplingParams; give one, "
                    "or one per prompt"
                )
        token_ids = [self.tokenizer.encode(p, index=i) for i, p in enumerate(prompts)]
        if self._replicas is not None and self._cluster is None:
            from longquest.launch.dispatch import generate_on_replicas

            return generate_on_replicas(self._replicas.clusters, token_ids, params)
        if self._cluster is not None:
            return self._cluster.generate(token_ids, params)
        bars = progress_callback(use_tqdm, prefill_chunk_tokens=self.config.prefill_chunk_tokens)
        try:
            return self._engine.generate(token_ids, params, on_progress=bars)
        finally:
            if bars is not None:
                bars.close()

    def step(self, new: list[NewRequest]) -> StepResult:
        """Advance the engine by one step with ``new`` (token ids) added: the streaming
        seam of the batch runner (see longquest.engine.scheduler). Requests stay in
        flight between calls; finish them before calling ``generate``. With several
        replicas, give ``replicas`` to ``run_batch`` instead."""
        if self._replicas is not None and self._cluster is None:
            raise ValueError(
                f"LLM.step drives one replica; with data_parallel_size="
                f"{len(self._replicas)} pass run_batch(replicas=llm.replicas, ...) "
                "(longquest batch does), or use generate"
            )
        if self._cluster is not None:
            return self._cluster.step(new)
        if self._scheduler is None:
            self._scheduler = Scheduler(self._engine)
        return self._scheduler.step(new)

    @property
    def replicas(self):
        """The Ray replicas (a :class:`~longquest.launch.replicas.ReplicaSet`), or None
        for the local launcher."""
        return self._replicas

    @property
    def engine(self):
        """The single-device engine (``launcher="local"`` only)."""
        return self._engine

    def worker_pids(self) -> list[int]:
        """The process ids of the ranks (every replica's, in replica then rank order):
        this process for the local launcher."""
        if self._replicas is not None:
            return [pid for pids in self._replicas.worker_pids() for pid in pids]
        return [os.getpid()]

    def shutdown(self) -> None:
        """Release the workers (Ray actors); a no-op for the local launcher."""
        if self._replicas is not None:
            self._replicas.shutdown()
        self._cluster = self._replicas = None


_DEFAULT_SETTINGS = dict(dtype="auto", device=None, quest=None, cache=None, world_size=1,
                         tensor_parallel_size=1, data_parallel_size=1, launcher="local",
                         prefill_chunk_tokens=8192,
                         impl=None,
                         allow_long_context=False, prefix_caching=True)  # fmt: skip


def engine_config(
    model: str | Path,
    *,
    dtype: str | torch.dtype,
    device: str | torch.device | None,
    quest: QuestConfig | None,
    cache: CacheConfig | None,
    world_size: int,
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    launcher: str,
    prefill_chunk_tokens: int,
    impl: str | None,
    allow_long_context: bool,
    prefix_caching: bool,
) -> EngineConfig:
    """The EngineConfig of ``LLM``'s keyword settings (torch dtypes and devices as text)."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    return EngineConfig(
        model=str(model),
        dtype=dtype,
        device=None if device is None else str(device),
        quest=quest or QuestConfig(),
        cache=cache or CacheConfig(),
        parallel=ParallelConfig(
            world_size=world_size,
            tensor_parallel_size=tensor_parallel_size,
            data_parallel_size=data_parallel_size,
            launcher=launcher,
        ),
        prefill_chunk_tokens=prefill_chunk_tokens,
        impl=impl,
        allow_long_context=allow_long_context,
        prefix_caching=prefix_caching,
    )


# Prompts longer than this (or than one prefill chunk) get a prefill bar.
PREFILL_BAR_TOKENS = 2048


class ProgressBars:
    """tqdm bars on stderr as an engine's ``on_progress(stage, done, total)``: prompt
    tokens prefilled (for prompts longer than one chunk or ``PREFILL_BAR_TOKENS``),
    requests finished. ``close()`` clears what is left (after an error or Ctrl-C).

    The engine reports ``("prefill", done, total)`` as a prefill starts (``done``: the
    prompt tokens taken from the prefix cache) and again after every chunk, so the bar's
    clock starts with the prefill; it is redrawn at each report (tqdm would otherwise
    skip a report that comes soon after the last).
    """

    def __init__(self, *, prefill_chunk_tokens: int) -> None:
        self.bars: dict[str, tqdm] = {}
        self.shortest = min(prefill_chunk_tokens, PREFILL_BAR_TOKENS)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage == "prefill" and total <= self.shortest:
            return  # one quick step: no bar
        bar = self.bars.get(stage)
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            unit = "tok" if stage == "prefill" else "req"
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit=unit, leave=False)
        bar.update(done - bar.n)
        bar.refresh()
        if done >= total:
            self.bars.pop(stage).close()

    def close(self) -> None:
        while self.bars:
            self.bars.popitem()[1].close()


def progress_callback(enabled: bool, *, prefill_chunk_tokens: int) -> ProgressBars | None:
    """A ``ProgressBars`` when ``enabled``, else None (no reports)."""
    return ProgressBars(prefill_chunk_tokens=prefill_chunk_tokens) if enabled else None


def check_tensor_layout(config: EngineConfig) -> None:
    """Refuse, before any worker starts, a ``tensor_parallel_size`` the model's heads or
    MLP cannot take (the same ValueError every rank would raise in its setup). Reads only
    the model's config.json, which the driver needs for the tokenizer anyway."""
    size = config.parallel.tensor_parallel_size
    if size == 1:
        return
    from longquest.engine.model import check_tensor_parallel
    from longquest.launch.plan import read_model_config

    check_tensor_parallel(read_model_config(config.model), tensor_parallel_size=size)
