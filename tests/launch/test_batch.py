"""The JSONL batch runner: error rows, resume after a crash, no duplicates."""

from __future__ import annotations

import json

import pytest

from longquest.engine.sequence import RequestOutput
from longquest.launch.batch import read_done_ids, run_batch


class FakeTokenizer:
    def encode(self, prompt, *, index=0):
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("empty prompt")
            return [len(w) for w in prompt.split()]
        return [len(m["content"]) for m in prompt]


class FakeEngine:
    """Echoes; refuses prompts longer than 5 tokens like a full cache; can crash."""

    def __init__(self, crash_after: int | None = None):
        self.served = []
        self.crash_after = crash_after

    def __call__(self, prompts, params):
        if any(len(p) > 5 for p in prompts):
            raise ValueError("needs more KV cache than the cache holds")
        outs = []
        for p, sp in zip(prompts, params):
            if self.crash_after is not None and len(self.served) >= self.crash_after:
                raise KeyboardInterrupt  # the process dies mid-job
            self.served.append(p)
            outs.append(
                RequestOutput(
                    request_id=0,
                    prompt_token_ids=p,
                    text=f"echo {p} t={sp.temperature}",
                    token_ids=[1] * sp.max_tokens,
                    logprobs=None,
                    finish_reason="length",
                    prefill_seconds=0.1,
                    decode_seconds=0.1,
                    pages_attended=1,
                    pages_total=2,
                    cached_prompt_tokens=len(p) - 1,
                )
            )
        return outs


def write_input(path, lines):
    path.write_text("\n".join(lines) + "\n")


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


GOOD = [json.dumps({"id": i, "prompt": f"hello world {i}", "max_tokens": 3}) for i in range(10)]


def test_errors_become_rows_and_the_job_goes_on(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    bad = [
        "{not json",
        json.dumps({"prompt": "no id"}),
        json.dumps({"id": "both", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}),
        json.dumps({"id": "neither"}),
        json.dumps({"id": "badparam", "prompt": "a", "temperature": -1}),
        json.dumps({"id": "unknown", "prompt": "a", "colour": "red"}),
        json.dumps({"id": "empty", "prompt": ""}),
        json.dumps({"id": "toolong", "prompt": "a b c d e f g h"}),
        json.dumps({"id": "chat", "messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"id": 3, "prompt": "duplicate id"}),
    ]
    write_input(src, GOOD[:5] + bad + GOOD[5:])
    summary = run_batch(
        input_path=src,
        output_path=dst,
        generate=FakeEngine(),
        tokenizer=FakeTokenizer(),
        group_size=4,
        progress=False,
    )
    out = rows(dst)
    assert len(out) == len(GOOD) + len(bad)
    by_id = {r["id"]: r for r in out}
    assert len(by_id) == len(out)  # every row has its own id
    for name in ("both", "neither", "badparam", "unknown", "empty", "toolong", "line-6", "line-7"):
        assert "error" in by_id[name], name
    assert "cache" in by_id["toolong"]["error"]
    assert "text" in by_id["chat"] and "text" in by_id[9]
    assert by_id[9]["completion_tokens"] == 3 and by_id[9]["cached_prompt_tokens"] == 2
    assert summary["errors"] == 9


def test_resume_after_crash_is_complete_and_duplicate_free(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, GOOD)
    with pytest.raises(KeyboardInterrupt):
        run_batch(
            input_path=src,
            output_path=dst,
            generate=FakeEngine(crash_after=6),
            tokenizer=FakeTokenizer(),
            group_size=2,
            progress=False,
        )
    # A torn last line, as a crash in the middle of a write leaves it.
    with open(dst, "a") as handle:
        handle.write('{"id": "7", "te')
    assert read_done_ids(dst) == {str(i) for i in range(6)}
    engine = FakeEngine()
    summary = run_batch(
        input_path=src,
        output_path=dst,
        generate=engine,
        tokenizer=FakeTokenizer(),
        group_size=2,
        progress=False,
    )
    assert summary["skipped"] == 6 and len(engine.served) == 4
    ids = [r["id"] for r in rows(dst)]
    assert sorted(ids) == list(range(10))
    # A third run has nothing left to do.
    again = FakeEngine()
    run_batch(
        input_path=src,
        output_path=dst,
        generate=again,
        tokenizer=FakeTokenizer(),
        progress=False,
    )
    assert again.served == [] and len(rows(dst)) == 10


def test_missing_input_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        run_batch(
            input_path=tmp_path / "nope.jsonl",
            output_path=tmp_path / "o.jsonl",
            generate=FakeEngine(),
            tokenizer=FakeTokenizer(),
            progress=False,
        )
