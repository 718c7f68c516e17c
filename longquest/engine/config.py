"""Frozen, keyword-only configs, one per concern, validated on construction."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field

from longquest.engine.model_config import SUPPORTED_ARCHITECTURES as SUPPORTED_ARCHITECTURES
from longquest.engine.model_config import ModelConfig as ModelConfig
from longquest.engine.validate import (
    check_bool,
    check_float,
    check_int,
    plain_numbers,
    stop_strings,
)
from longquest.kernels import KernelTuning

# CacheConfig.bounds_dtype values; None stores the bounds in the model dtype.
BOUNDS_DTYPE_NAMES = (None, "float8_e4m3fn")


@dataclass(frozen=True, kw_only=True)
class QuestConfig:
    """Quest sparsity. ``token_budget=None`` means dense decoding.

    page_size: tokens a KV page holds (a power of two).
    token_budget: tokens attended per decode step and KV head; the page budget
        is ``token_budget // page_size``.
    dense_layers: the first layers, which always attend densely.
    spread_selection: on a GPU, select a long row's pages in one launch spread over
        several programs (``longquest.kernels.topk_spread``), which must all be resident
        at once. Turn it off where other work holds the GPU's SMs for long (MPS with an
        active-thread limit, green contexts): a program left waiting traps after 10 s.
    group_pages: None scores every page's bounds (one level); ``G`` (a power of two >= 2)
        selects in two levels (``longquest.kernels.two_level``): groups of ``G`` pages of a
        rank scored from coarse bounds first, then the pages of the ``kept_groups`` best.
    group_margin: the kept groups hold ``group_margin`` (>= 1) page budgets.
    """

    page_size: int = 16
    token_budget: int | None = 4096
    dense_layers: int = 2
    spread_selection: bool = True
    group_pages: int | None = None
    group_margin: float = 2.0

    def __post_init__(self) -> None:
        plain_numbers(self)
        check_int(self.page_size, name="QuestConfig.page_size", accepts="a power of two (16)")
        if self.token_budget is not None:
            check_int(
                self.token_budget,
                name="QuestConfig.token_budget",
                accepts="an int (tokens attended per decode step) or None (dense)",
            )
        check_int(self.dense_layers, name="QuestConfig.dense_layers", accepts="an int >= 0")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(
                f"QuestConfig.page_size must be a power of two, got {self.page_size}; "
                "use 16 (the default) or another power of two."
            )
        if self.token_budget is not None and self.token_budget < self.page_size:
            raise ValueError(
                f"QuestConfig.token_budget={self.token_budget} is smaller than one page "
                f"(page_size={self.page_size}); use a budget >= page_size, or None for dense."
            )
        if self.dense_layers < 0:
            raise ValueError(f"QuestConfig.dense_layers must be >= 0, got {self.dense_layers}")
        if not isinstance(self.spread_selection, bool):
            raise ValueError(
                f"QuestConfig.spread_selection must be a bool, got {self.spread_selection!r}"
            )
        self._check_groups()

    def _check_groups(self) -> None:
        pages, accepts = self.group_pages, "None (one level) or a power of two >= 2 (pages a group)"
        if pages is not None:
            check_int(pages, name="QuestConfig.group_pages", minimum=2, accepts=accepts)
            if pages & (pages - 1):
                raise ValueError(f"QuestConfig.group_pages must be {accepts}, got {pages}")
        check_float(self.group_margin, name="QuestConfig.group_margin", minimum=1.0,
                    accepts="a finite number >= 1 (page budgets the kept groups hold)")  # fmt: skip

    @property
    def page_budget(self) -> int | None:
        """Pages attended per (sequence, KV head) in sparse layers, or None for dense."""
        return None if self.token_budget is None else self.token_budget // self.page_size

    @property
    def kept_groups(self) -> int | None:
        """Groups the two-level selection keeps a row: ``group_margin`` page budgets plus the
        newest page's group (a row of ``page_budget`` pages or more gets that many); None
        for one level or dense decoding."""
        budget = self.page_budget
        if self.group_pages is None or budget is None:
            return None
        return math.ceil(self.group_margin * budget / self.group_pages) + 1


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """KV cache capacity.

    num_pages: pages in the pool per layer; None derives it from free device
        memory (CUDA) — required on the CPU unless ``max_tokens`` is given.
    max_tokens: alternative to num_pages: the pool holds at least this many tokens.
    memory_fraction: fraction of free GPU memory (after weights) to give the cache.
    bounds_dtype: storage of Quest's per-page key bounds: None (the model dtype) or
        ``"float8_e4m3fn"``, which halves the bytes the decode score kernel reads. fp8
        bounds are rounded outward (min down, max up), so a page's score stays an upper
        bound of ``q . k``, but key elements beyond +-448 cannot be bounded: prefill
        raises ValueError on such keys (decode does not check). The Triton kernels need a
        GPU of compute capability >= 8.9. Its effect on retrieval accuracy is measured
        separately.
    """

    num_pages: int | None = None
    max_tokens: int | None = None
    memory_fraction: float = 0.9
    bounds_dtype: str | None = None

    def __post_init__(self) -> None:
        plain_numbers(self)
        for name in ("num_pages", "max_tokens"):
            if getattr(self, name) is not None:
                check_int(
                    getattr(self, name), name=f"CacheConfig.{name}", accepts="an int >= 1 or None"
                )
        check_float(
            self.memory_fraction,
            name="CacheConfig.memory_fraction",
            above=0.0,
            maximum=1.0,
            accepts="a number in (0, 1]",
        )
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"CacheConfig.num_pages must be >= 1, got {self.num_pages}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"CacheConfig.max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(
                f"CacheConfig.memory_fraction must be in (0, 1], got {self.memory_fraction}"
            )
        if self.bounds_dtype not in BOUNDS_DTYPE_NAMES:
            raise ValueError(
                f"CacheConfig.bounds_dtype must be None (the model dtype) or one of "
                f"{', '.join(repr(d) for d in BOUNDS_DTYPE_NAMES if d)}, got {self.bounds_dtype!r}"
            )


# Launchers that start an engine's ranks (longquest.launch): one device in this process,
# Ray actors, or processes torchrun started.
LAUNCHERS = ("local", "ray", "torchrun")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the ranks of one replica split the model and every sequence's KV pages, and
    how they are started.

    world_size: ranks (one GPU each) of one replica: ``tensor_parallel_size`` tensor
        ranks times ``sequence_parallel_size`` sequence ranks.
    tensor_parallel_size: T, the ways the weights are split (attention by KV-head groups,
        the MLP by its intermediate dimension, embedding and LM head by vocabulary). T
        divides ``world_size``, and the model's KV heads, query heads and intermediate
        size (checked when its config is read, before any weight). A tensor rank keeps
        the KV pages of its own KV heads only; T larger than the KV heads (Helix-style
        KV-head replication) is not supported.
    data_parallel_size: independent replicas of ``world_size`` ranks each, fed from one
        work queue (the Ray launcher only; every replica holds the whole model).
    launcher: ``"local"`` (one device, this process), ``"ray"`` or ``"torchrun"``.
    split_mlp: decode splits every MLP further over the sequence ranks (each reads
        ``1 / world_size`` of the MLP weights; one all-reduce over the replica's ranks
        sums the parts). At T = 1 the weights are replicated and this is the only split.
    peer_collectives: decode's collectives write straight into the other GPUs' memory
        where every rank can; else NCCL.
    """

    world_size: int = 1
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    launcher: str = "local"
    split_mlp: bool = True
    peer_collectives: bool = True

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"ParallelConfig.world_size must be >= 1, got {self.world_size}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(
                f"ParallelConfig.launcher must be one of {LAUNCHERS}, got {self.launcher!r}"
            )
        if self.launcher == "local" and self.world_size != 1:
            raise ValueError(
                "launcher='local' runs on one device; use launcher='ray' (or torchrun) "
                f"for world_size={self.world_size}"
            )
        check_int(self.tensor_parallel_size, name="ParallelConfig.tensor_parallel_size",
                  minimum=1, accepts="a whole number >= 1 that divides world_size")  # fmt: skip
        if self.world_size % self.tensor_parallel_size:
            raise ValueError(
                f"ParallelConfig.tensor_parallel_size={self.tensor_parallel_size} does not "
                f"divide world_size={self.world_size}: the ranks form tensor_parallel_size x "
                "sequence_parallel_size; use a divisor of world_size"
            )
        replicas = self.data_parallel_size
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(
                "ParallelConfig.data_parallel_size (replicas of the model, --data-parallel-size) "
                f"must be a whole number >= 1, got {replicas!r}"
            )
        if replicas > 1 and self.launcher != "ray":
            raise ValueError(
                f"data_parallel_size={replicas} runs replicas as Ray placement groups; use "
                f"launcher='ray' (longquest batch --launcher ray --data-parallel-size {replicas}), "
                f"not {self.launcher!r}"
            )

    @property
    def sequence_parallel_size(self) -> int:
        """S: the ranks that share the KV pages of one tensor rank's heads."""
        return self.world_size // self.tensor_parallel_size


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Per-request sampling, named as in vLLM.

    temperature 0 is greedy; top_k=-1 disables top-k; logprobs=n returns the
    top-n log-probabilities of every generated token.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        plain_numbers(self)
        check_int(self.max_tokens, name="SamplingParams.max_tokens", minimum=1,
                  accepts="a whole number >= 1 (tokens to generate)")  # fmt: skip
        check_float(self.temperature, name="SamplingParams.temperature", minimum=0.0,
                    accepts="a finite number >= 0 (0 is greedy)")  # fmt: skip
        check_float(self.top_p, name="SamplingParams.top_p", above=0.0, maximum=1.0,
                    accepts="a number in (0, 1]")  # fmt: skip
        check_int(self.top_k, name="SamplingParams.top_k", minimum=-1,
                  accepts="-1 (off) or a whole number >= 1")  # fmt: skip
        if self.top_k == 0:
            raise ValueError("SamplingParams.top_k must be -1 (off) or a whole number >= 1, got 0")
        if self.seed is not None:
            check_int(self.seed, name="SamplingParams.seed", minimum=0, maximum=2**64 - 1,
                      accepts="None or a whole number in [0, 2**64)")  # fmt: skip
        check_bool(self.ignore_eos, name="SamplingParams.ignore_eos")
        if self.logprobs is not None:
            check_int(self.logprobs, name="SamplingParams.logprobs", minimum=0,
                      accepts="None or a whole number >= 0 (top tokens to report)")  # fmt: skip
        object.__setattr__(self, "stop", stop_strings(self.stop, name="SamplingParams.stop"))


# EngineConfig.dtype values: "auto" is bf16 on CUDA and fp32 on the CPU.
DTYPE_NAMES = ("auto", "bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32", "float")
# EngineConfig.impl values: None picks Triton on CUDA and PyTorch on the CPU.
IMPLS = (None, "triton", "torch")
# EngineConfig.device values (None: CUDA when available, else the CPU).
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Everything that decides how an engine is built, from the API or the CLI to every rank.

    model: the Hugging Face model directory (config.json, tokenizer, safetensors).
    dtype: one of ``DTYPE_NAMES``; ``"auto"`` is bf16 on CUDA and fp32 on the CPU.
    device: "cuda", "cuda:N", "cpu" or None (CUDA when available, else the CPU). Ranks
        of a sequence-parallel group each take their own GPU.
    prefill_chunk_tokens: prompt tokens per prefill step (bounds activation memory).
    allow_long_context: serve requests whose prompt plus ``max_tokens`` runs past the
        context the model declares (``ModelConfig.context_length``); by default such a
        request is refused with a ValueError before any work.
    impl: kernels: None (Triton on CUDA, PyTorch on the CPU), "triton" or "torch".
    tuning: the kernels' launch sizes (block sizes, split caps, program counts); the
        defaults are the measured choices, a benchmark passes others.
    prefix_caching: keep full prompt pages cached after their request finishes; a prompt
        that starts with cached pages takes them and prefills only the rest (outputs are
        those of a full prefill, to floating-point rounding). Cached pages no request
        holds are evicted, least recently used first, when room is needed.

    Frozen and plain: launchers pass it on unchanged, and ``to_json`` / ``from_json``
    carry it to processes started elsewhere (torchrun).
    """

    model: str
    dtype: str = "auto"
    device: str | None = None
    quest: QuestConfig = field(default_factory=QuestConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    prefill_chunk_tokens: int = 8192
    impl: str | None = None
    tuning: KernelTuning = field(default_factory=KernelTuning)
    allow_long_context: bool = False
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(
                f"EngineConfig.model must be a model directory path as a str, got {self.model!r}"
            )
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(
                f"EngineConfig.dtype: unknown dtype {self.dtype!r}; use one of "
                f"{', '.join(DTYPE_NAMES)}"
            )
        if self.device is not None and not (
            isinstance(self.device, str) and DEVICE_PATTERN.fullmatch(self.device)
        ):
            raise ValueError(
                f"unknown device {self.device!r}; use 'cuda', 'cuda:N' or 'cpu' (or None: "
                "CUDA when available, else the CPU)"
            )
        if self.prefill_chunk_tokens < 1:
            raise ValueError(
                f"EngineConfig.prefill_chunk_tokens must be >= 1, got {self.prefill_chunk_tokens}"
            )
        if self.impl not in IMPLS:
            raise ValueError(f"EngineConfig.impl must be one of {IMPLS}, got {self.impl!r}")
        check_bool(self.allow_long_context, name="EngineConfig.allow_long_context")
        check_bool(self.prefix_caching, name="EngineConfig.prefix_caching")
        for name, kind in _nested_configs(type(self)).items():
            if not isinstance(getattr(self, name), kind):
                raise ValueError(
                    f"EngineConfig.{name} must be a {kind.__name__}, got {getattr(self, name)!r}"
                )

    def to_json(self) -> str:
        """The config as JSON text (``from_json`` reads it back equal)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EngineConfig:
        """The config ``to_json`` wrote; ValueError names a field it does not know."""
        fields = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(
                f"EngineConfig JSON has unknown fields {unknown}; known: {sorted(known)}"
            )
        for name, kind in _nested_configs(cls).items():
            if name in fields:
                fields[name] = kind(**fields[name])
        return cls(**fields)


def _nested_configs(cls: type) -> dict[str, type]:
    """The fields of ``cls`` that are configs themselves (dataclasses), by name: a config
    field added to EngineConfig is validated and read back from JSON with no more code."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    return {f.name: hints[f.name] for f in fields if dataclasses.is_dataclass(hints[f.name])}
