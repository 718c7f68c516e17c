"""Ray Data: a callable class that answers a batch of prompts, one model replica each.

Ray's batch-inference convention: a class built once per actor (the model loads once)
and called on each batch of a dataset, with ``concurrency=R`` actors::

    import ray
    from longquest.engine.config import EngineConfig
    from longquest.launch.ray_data import LongQuestPredictor

    config = EngineConfig(model="/models/Llama-3.1-8B-Instruct")
    answers = ray.data.read_json("questions.jsonl").map_batches(
        LongQuestPredictor,
        fn_constructor_kwargs={"config": config},
        concurrency=4,       # replicas
        num_gpus=1,          # each replica's engine runs in its Data actor
        batch_size=16,
    )
    answers.write_json("answers/")

A replica of ``world_size > 1`` ranks: give ``ParallelConfig(world_size=W,
launcher="ray")`` and ``num_gpus=0``: each Data actor then starts its own placement group
of W rank actors (one node) and drives it. Replicas come from ``concurrency``, so
``data_parallel_size`` stays 1.
"""

from __future__ import annotations

import dataclasses
from array import array

import numpy as np

from longquest.engine.config import EngineConfig, SamplingParams
from longquest.launch.api import LLM
from longquest.launch.batch import SAMPLING_FIELDS, result_row
from longquest.launch.stream import BatchItem, Feeder

# The columns __call__ adds (from the batch runner's result rows), plus ``error``.
OUTPUT_COLUMNS = ("text", "finish_reason", "prompt_tokens", "cached_prompt_tokens",
                  "completion_tokens")  # fmt: skip


class LongQuestPredictor:
    """One model replica answering ``{"prompt": [...], ...}`` batches.

    config: the engine's config, ``data_parallel_size=1`` (``concurrency`` gives the
        replicas); ``launcher="local"`` runs the engine in this actor, ``"ray"`` starts
        ``world_size`` rank actors.
    sampling: the sampling of every row; a batch column named as a SamplingParams field
        (``max_tokens``, ``temperature``, ...) overrides it row by row.
    group_size: requests in the engine at once.
    """

    def __init__(
        self, config: EngineConfig, *, sampling: SamplingParams | None = None, group_size: int = 8
    ) -> None:
        if config.parallel.data_parallel_size != 1:
            raise ValueError(
                "LongQuestPredictor is one replica: set data_parallel_size=1 and give "
                "map_batches(..., concurrency=R) for R replicas"
            )
        self.llm = LLM(config=config)
        self.sampling = sampling or SamplingParams()
        self.group_size = group_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch's columns plus ``OUTPUT_COLUMNS`` and ``error`` (None, or why the
        row could not be served; the other new columns are then None)."""
        prompts = batch["prompt"]
        rows: dict[int, dict] = {}
        items = []
        for index, prompt in enumerate(prompts):
            try:
                overrides = {k: _plain(batch[k][index]) for k in SAMPLING_FIELDS if k in batch}
                params = dataclasses.replace(self.sampling, **overrides)
                token_ids = self.llm.tokenizer.encode(str(prompt), index=index)
            except (TypeError, ValueError) as error:
                rows[index] = {"id": index, "error": str(error)}
                continue
            items.append(BatchItem(
                id=index, line=index + 1, token_ids=array("i", token_ids), params=params
            ))  # fmt: skip
        source = iter(items)
        Feeder(
            step=self.llm.step, pick=lambda: next(source, None), row_of=result_row,
            write=lambda row: rows.__setitem__(row["id"], row), limit=self.group_size,
        ).run()  # fmt: skip
        out = dict(batch)
        for column in (*OUTPUT_COLUMNS, "error"):
            out[column] = np.array([rows[i].get(column) for i in range(len(prompts))], dtype=object)
        return out

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()


def _plain(value: object) -> object:
    """A numpy scalar as the Python value SamplingParams checks for."""
    return value.item() if isinstance(value, np.generic) else value
