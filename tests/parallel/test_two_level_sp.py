"""Two-level page selection under sequence parallelism (gloo ranks): groups are a rank's
own pages, the global top-k stays exact over every rank's fine candidates."""

from __future__ import annotations

import pytest

import longquest.engine.attention as attention_module
from longquest.engine.config import QuestConfig, SamplingParams
from tests.engine.test_two_level_engine import reference_selection
from tests.parallel.dist import run_distributed
from tests.parallel.test_worker import PAGE, _engine, _prompts, _ranks
from tests.tiny_models import make_tiny_model

QUESTS = {
    # 4 pages of budget, 3 kept groups of 2 pages a rank, over 2-13 pages a rank.
    "two_level": QuestConfig(
        page_size=PAGE, token_budget=4 * PAGE, dense_layers=1, group_pages=2, group_margin=1.0
    ),  # fmt: skip
    "every_group": QuestConfig(
        page_size=PAGE, token_budget=4 * PAGE, dense_layers=1, group_pages=2, group_margin=50.0
    ),  # fmt: skip
    "single": QuestConfig(page_size=PAGE, token_budget=4 * PAGE, dense_layers=1),
}
STEPS = 10


def _run(model_dir, quest_name, reference, steps_per_launch, *, rank, world_size, group):
    calls: list[int] = []
    if reference:  # this process's module: the patch stays in the spawned rank
        attention_module.select_pages_two_level = reference_selection(calls)
    cls, kwargs = _engine(model_dir, QUESTS[quest_name],
                          ranks=_ranks(group=group, rank=rank, world_size=world_size),
                          steps_per_launch=steps_per_launch)  # fmt: skip
    engine = cls(**kwargs)
    prompts = _prompts(engine.config.vocab_size)
    outs = engine.generate(prompts, [SamplingParams(max_tokens=STEPS)] * len(prompts))
    assert calls or not reference
    return [o.token_ids for o in outs]


def _tokens(model_dir, quest_name, world_size, *, reference=False, steps_per_launch=1):
    results = run_distributed(
        _run, world_size=world_size, args=(model_dir, quest_name, reference, steps_per_launch),
        timeout_s=300,
    )  # fmt: skip
    assert all(r == results[0] for r in results)  # every rank decodes the same tokens
    return results[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("sp_two_level"), architecture="qwen2")


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_decode_the_reference_selection(model_dir, world_size):
    got = _tokens(model_dir, "two_level", world_size)
    assert got == _tokens(model_dir, "two_level", world_size, reference=True)
    assert got == _tokens(model_dir, "two_level", world_size, steps_per_launch=4)


def test_every_group_kept_matches_one_level_on_one_device(model_dir):
    cls, kwargs = _engine(model_dir, QUESTS["single"])
    single = cls(**kwargs)
    prompts = _prompts(single.config.vocab_size)
    want = single.generate(prompts, [SamplingParams(max_tokens=STEPS)] * len(prompts))
    assert _tokens(model_dir, "every_group", 2) == [o.token_ids for o in want]
