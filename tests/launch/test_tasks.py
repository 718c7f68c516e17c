"""Passkey tasks: sized with the real tokenizer, needle where asked, reproducible, scored fairly."""

import re

import pytest
from transformers import AutoTokenizer

from longquest.launch import assets
from longquest.launch.tasks import (
    INSTRUCTION,
    LENGTH_TOLERANCE,
    NEEDLE,
    QUESTION,
    PasskeyTask,
    make_passkey_task,
    passkey_prompt_ids,
    score_passkey,
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(assets.ensure_demo_model())


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return list(assets.ensure_texts().values())


def _task(tokenizer, texts, **overrides) -> PasskeyTask:
    args = {"context_tokens": 1000, "depth": 0.5, "seed": 0} | overrides
    return make_passkey_task(tokenizer=tokenizer, texts=texts, **args)


@pytest.mark.parametrize("context_tokens", [150, 600, 2000, 7500])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_prompt_length_is_close_to_the_request(tokenizer, texts, context_tokens, depth):
    seed = context_tokens + int(depth * 100)
    task = _task(tokenizer, texts, context_tokens=context_tokens, depth=depth, seed=seed)
    length = len(passkey_prompt_ids(tokenizer=tokenizer, messages=task.prompt_messages))
    assert abs(length - context_tokens) <= LENGTH_TOLERANCE * context_tokens
    assert (task.context_tokens, task.depth) == (context_tokens, depth)


def _needle_fraction(tokenizer, task: PasskeyTask) -> float:
    """Filler tokens before the needle over all filler tokens."""
    content = task.prompt_messages[-1]["content"]
    needle = NEEDLE.format(passkey=task.passkey)

    def tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    filler_start = content.index(INSTRUCTION) + len(INSTRUCTION)
    needle_start = content.index(needle)
    filler_end = content.rindex(QUESTION)
    before = tokens(content[filler_start:needle_start])
    after = tokens(content[needle_start + len(needle) : filler_end])
    return before / (before + after)


@pytest.mark.parametrize("context_tokens", [500, 3000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.83, 1.0])
def test_needle_sits_at_the_requested_depth(tokenizer, texts, context_tokens, depth):
    task = _task(tokenizer, texts, context_tokens=context_tokens, depth=depth, seed=7)
    assert _needle_fraction(tokenizer, task) == pytest.approx(depth, abs=0.03)
    if context_tokens >= 3000:
        # Relative to the whole prompt too: instructions and question are a small part.
        ids = passkey_prompt_ids(tokenizer=tokenizer, messages=task.prompt_messages)
        digits = tokenizer.encode(task.passkey, add_special_tokens=False)
        first = next(i for i in range(len(ids)) if ids[i : i + len(digits)] == digits)
        assert first / len(ids) == pytest.approx(depth, abs=0.06)


def test_prompt_holds_the_needle_and_no_other_number(tokenizer, texts):
    task = _task(tokenizer, texts, seed=3)
    assert re.fullmatch(r"[1-9]\d{4}", task.passkey)
    content = task.prompt_messages[-1]["content"]
    assert content.count(NEEDLE.format(passkey=task.passkey)) == 1
    assert re.findall(r"\d+", content) == [task.passkey, task.passkey]
    assert all(set(m) == {"role", "content"} for m in task.prompt_messages)
    assert task.prompt_messages[-1]["role"] == "user"


def test_same_seed_same_task_other_seed_other_task(tokenizer, texts):
    first = _task(tokenizer, texts, seed=11)
    assert _task(tokenizer, texts, seed=11) == first
    others = [_task(tokenizer, texts, seed=s) for s in (12, 13)]
    assert all(o.passkey != first.passkey for o in others)
    assert all(o.prompt_messages != first.prompt_messages for o in others)


def test_filler_comes_from_the_texts(tokenizer, texts):
    task = _task(tokenizer, texts, context_tokens=800, depth=0.0, seed=5)
    content = task.prompt_messages[-1]["content"]
    filler = content[len(INSTRUCTION) : content.rindex(QUESTION)]
    longest = max(filler.splitlines(), key=len)
    words = re.sub(r"[^A-Za-z]+", " ", longest).split()
    assert len(words) >= 3
    assert any(" ".join(words) in re.sub(r"[^A-Za-z]+", " ", t) for t in texts)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("48213", True),
        ("The pass key is 48213.", True),
        ("48213 is the pass key", True),
        ("4821", False),
        ("482134", False),
        ("148213", False),
        ("4 8 2 1 3", False),
        ("", False),
        ("The pass key is a secret.", False),
    ],
)
def test_score_passkey(answer, expected):
    assert score_passkey(answer, "48213") is expected


@pytest.mark.parametrize("depth", [-0.01, 1.5, float("nan")])
def test_depth_outside_unit_interval_is_rejected(tokenizer, texts, depth):
    with pytest.raises(ValueError, match="depth"):
        _task(tokenizer, texts, depth=depth)


def test_context_too_small_for_the_needle_is_rejected(tokenizer, texts):
    with pytest.raises(ValueError, match="context_tokens"):
        _task(tokenizer, texts, context_tokens=60)


def test_missing_filler_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="texts"):
        _task(tokenizer, ["", "too short"])
