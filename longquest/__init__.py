"""longquest: Quest query-aware sparse decoding for million-token contexts across GPUs.

from longquest import LLM, SamplingParams, QuestConfig
llm = LLM(model_dir, quest=QuestConfig(token_budget=4096))
outputs = llm.generate(["..."], SamplingParams(max_tokens=64))
"""

from longquest.engine.config import (
    CacheConfig,
    EngineConfig,
    ParallelConfig,
    QuestConfig,
    SamplingParams,
)

__all__ = ["LLM", "CacheConfig", "EngineConfig", "ParallelConfig", "QuestConfig", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM lives in launch/ (it may start Ray); import it only when asked for.
    if name == "LLM":
        from longquest.launch.api import LLM

        return LLM
    raise AttributeError(f"module 'longquest' has no attribute {name!r}")
