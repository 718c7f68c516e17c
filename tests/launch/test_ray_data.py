"""The Ray Data predictor: a batch of prompts answered as the engine answers them, a
bad row its own error, and (where ray.data imports) ``map_batches`` with two replicas."""

from __future__ import annotations

import numpy as np
import pytest

from longquest.engine.config import (
    CacheConfig,
    EngineConfig,
    ParallelConfig,
    QuestConfig,
    SamplingParams,
)
from longquest.launch.api import LLM
from longquest.launch.ray_data import LongQuestPredictor
from tests.tiny_models import make_tiny_model, save_char_tokenizer


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    directory = make_tiny_model(tmp_path_factory.mktemp("ray-data"), architecture="llama2")
    return EngineConfig(
        model=str(save_char_tokenizer(directory)), dtype="float32", device="cpu", impl="torch",
        quest=QuestConfig(page_size=16, token_budget=32, dense_layers=1),
        cache=CacheConfig(max_tokens=1024),
    )  # fmt: skip


PROMPTS = ["the first question", "a second, longer question about it", "x" * 600, "third"]


def expected(config) -> list[str]:
    llm = LLM(config=config)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (4, 6, 1, 5)]
    served = (0, 1, 3)  # the third prompt is past the model's context
    outputs = llm.generate([PROMPTS[i] for i in served], [params[i] for i in served])
    return [o.text for o in outputs]


def test_the_predictor_answers_a_batch_row_by_row(config):
    predictor = LongQuestPredictor(config, sampling=SamplingParams(ignore_eos=True))
    batch = {"prompt": np.array(PROMPTS), "max_tokens": np.array([4, 6, 1, 5])}
    out = predictor(batch)
    assert list(out["prompt"]) == PROMPTS
    assert [out["text"][i] for i in (0, 1, 3)] == expected(config)
    assert list(out["completion_tokens"][[0, 1, 3]]) == [4, 6, 5]
    assert out["text"][2] is None and "past the model's context" in out["error"][2]
    assert out["error"][0] is None


def test_the_predictor_is_one_replica(config):
    import dataclasses

    two = dataclasses.replace(config, parallel=ParallelConfig(data_parallel_size=2, launcher="ray"))
    with pytest.raises(ValueError, match="concurrency=R"):
        LongQuestPredictor(two)


def test_map_batches_runs_one_predictor_a_replica(config):
    try:
        import ray.data  # noqa: F401
    except ImportError as error:
        pytest.skip(f"ray.data does not import here ({error}); pip install 'ray[data]'")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        rows = [{"prompt": p, "max_tokens": n} for p, n in zip(PROMPTS, (4, 6, 1, 5))]
        answers = (
            ray.data.from_items(rows)
            .map_batches(
                LongQuestPredictor,
                fn_constructor_kwargs={"config": config},
                concurrency=2,
                batch_size=2,
            )  # fmt: skip
            .take_all()
        )
    finally:
        ray.shutdown()
    by_prompt = {row["prompt"]: row for row in answers}
    texts = [by_prompt[PROMPTS[i]]["text"] for i in (0, 1, 3)]
    assert texts == expected(config)
    assert by_prompt[PROMPTS[2]]["error"]
