"""Single-process execution: configs, model, paged KV cache, attention, sampler, loop."""

from longquest.engine.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    QuestConfig,
    SamplingParams,
)

__all__ = [
    "CacheConfig",
    "EngineConfig",
    "ModelConfig",
    "ParallelConfig",
    "QuestConfig",
    "SamplingParams",
]
