"""The real model (SmolLM2-135M-Instruct) finds a pass key hidden in ~2K and ~4K tokens of
real text, densely and with Quest at budgets of 256 and 512 tokens.

With 4-token pages Quest answers at least 9 of 10 at both budgets and both lengths (dense:
9-10 of 10; the model itself sometimes goes on with the filler instead of answering).
With the default 16-token pages this 135M model loses the key more often at 4K (measured
4/10 and 7/10 at 256 and 512): a page's min/max bound is too loose for its 3 KV heads of
64 dims, so the needle's page ranks below filler pages. Those runs are held to what was
measured, as a guard against regressions. benchmarks/passkey.py reports the full table."""

from __future__ import annotations

import pytest

from longquest.engine.config import CacheConfig, QuestConfig, SamplingParams

TRIALS = 10
# (budget, page size); None: dense.
CONFIGS = [(None, 16), (256, 4), (512, 4), (256, 16), (512, 16)]


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoTokenizer

    from longquest.launch.assets import ensure_demo_model, ensure_texts

    model_dir = ensure_demo_model()
    return model_dir, AutoTokenizer.from_pretrained(model_dir), list(ensure_texts().values())


def tasks_for(demo, context_tokens: int):
    from longquest.launch.tasks import make_passkey_task, passkey_prompt_ids

    _, tokenizer, texts = demo
    tasks = [
        make_passkey_task(
            tokenizer=tokenizer,
            texts=texts,
            context_tokens=context_tokens,
            depth=i / (TRIALS - 1),  # the needle from the very start to the very end
            seed=context_tokens + i,
        )
        for i in range(TRIALS)
    ]
    prompts = [passkey_prompt_ids(tokenizer=tokenizer, messages=t.prompt_messages) for t in tasks]
    return tasks, prompts


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 2 page sizes x 10 prefills of 4K tokens, then 5 x 10 decodes
@pytest.mark.parametrize("context_tokens", [2000, 4000])
def test_passkey_retrieval_dense_and_quest(demo, context_tokens):
    from longquest.launch.api import LLM
    from longquest.launch.tasks import score_passkey

    model_dir = demo[0]
    tasks, prompts = tasks_for(demo, context_tokens)
    cache = CacheConfig(max_tokens=TRIALS * (context_tokens + 200))
    report = {}
    for page in sorted({page for _, page in CONFIGS}):
        llm = LLM(
            model_dir,
            dtype="float32",
            device="cpu",
            quest=QuestConfig(page_size=page),
            cache=cache,
            prefill_chunk_tokens=2048,
        )
        # One engine per page size: the budgets after the first take the prompts from
        # the prefix cache (the cache holds all of them), so each prompt is prefilled once.
        for turn, budget in enumerate(budget for budget, p in CONFIGS if p == page):
            llm.engine.quest = QuestConfig(token_budget=budget, page_size=page)
            llm.engine.drop_decode_batch()
            outputs = llm.generate(prompts, SamplingParams(max_tokens=10), use_tqdm=False)
            right = sum(score_passkey(o.text, t.passkey) for o, t in zip(outputs, tasks))
            report[(budget, page)] = right
            if budget is not None:
                pages = max(o.pages_total for o in outputs)
                assert all(o.pages_attended <= budget // page for o in outputs)
                assert pages > budget // page  # selection really happened
            if turn > 0:  # every full page of the prompt came from the cache
                assert all(
                    o.cached_prompt_tokens == (len(o.prompt_token_ids) - 1) // page * page
                    for o in outputs
                )
    print(f"passkey at {context_tokens} tokens, right of {TRIALS} by (budget, page): {report}")
    assert report[(None, 16)] >= TRIALS - 1, report
    assert report[(256, 4)] >= TRIALS - 1, report
    assert report[(512, 4)] >= TRIALS - 1, report
    if context_tokens <= 2000:
        assert report[(512, 16)] >= report[(None, 16)] - 1, report
        assert report[(256, 16)] >= report[(None, 16)] - 2, report
    else:
        assert report[(512, 16)] >= 6, report
        assert report[(256, 16)] >= 3, report
