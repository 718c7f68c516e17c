"""What a batch job guarantees: it never changes a file that is not its results file,
never dies on one request, locks its output, resumes and retries by id (the id's JSON
value), and names the file and line of anything it cannot read. The Ray launcher's
cases are in test_batch_ray.py."""

from __future__ import annotations

import json
import os

import pytest

from longquest.engine.config import CacheConfig, QuestConfig
from longquest.launch.batch import read_done_ids, run_batch
from longquest.launch.results import read_results
from tests.launch.test_batch import FakeEngine, FakeTokenizer, rows, write_input
from tests.tiny_models import make_tiny_model, save_char_tokenizer

# FakeTokenizer's tokens are word lengths: g<i>'s prompt is [5, 5, i + 1].
GOOD = [
    json.dumps({"id": f"g{i}", "prompt": "hello world " + "x" * (i + 1), "max_tokens": 2})
    for i in range(4)
]


def batch(src, dst, generate=None, **options):
    options.setdefault("progress", False)
    if "step" not in options:
        options["generate"] = generate or FakeEngine()
    return run_batch(
        input_path=src,
        output_path=dst,
        tokenizer=options.pop("tokenizer", FakeTokenizer()),
        **options,
    )


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "in.jsonl"
    write_input(path, GOOD)
    return path


# 1 ------------------------------------------------------------------ data loss
def test_output_that_is_the_input_is_refused_untouched(src, tmp_path):
    before = src.read_bytes()
    link, hard = tmp_path / "link.jsonl", tmp_path / "hard.jsonl"
    link.symlink_to(src)
    os.link(src, hard)
    for output in (src, link, hard):
        with pytest.raises(ValueError, match="is the input file"):
            batch(src, output)
    assert src.read_bytes() == before


@pytest.mark.parametrize(
    "content",
    [
        b"my notes\nlast line without newline",
        b"just one line",
        b'{"id": 1, "prompt": "a request, not a result"}\n{"id": 2, "pro',
        b'{"id": 1, "text": "ok"}\nnot json\n{"id": 2, "te',
    ],
)
def test_output_that_is_not_a_results_file_is_refused_untouched(src, tmp_path, content):
    dst = tmp_path / "notes.txt"
    dst.write_bytes(content)
    with pytest.raises(ValueError, match="notes.txt line"):
        batch(src, dst)
    assert dst.read_bytes() == content


def test_only_a_torn_last_row_is_dropped(src, tmp_path):
    dst = tmp_path / "out.jsonl"
    whole = json.dumps({"id": "g0", "text": "kept"}) + "\n"
    dst.write_text(whole + '{"id": "g1", "te')
    summary = batch(src, dst)
    assert summary == {"served": 3, "errors": 0, "skipped": 1, "tokens": 6}
    assert dst.read_text().startswith(whole)
    # A whole last row without its newline is kept, and the next row starts a new line.
    dst.write_text(whole.rstrip("\n"))
    batch(src, dst)
    assert [r["id"] for r in rows(dst)] == ["g0", "g1", "g2", "g3"]
    # A crash can cut the last row inside a multi-byte character.
    dst.write_bytes(whole.encode() + '{"id": "g1", "text": "日'.encode()[:-1])
    assert batch(src, dst)["skipped"] == 1
    assert dst.read_text().startswith(whole)


def test_an_output_that_is_a_directory_is_refused_with_a_message(src, tmp_path, capsys):
    from longquest.launch.cli import main

    assert main(["batch", "--model", str(tmp_path), "--input", str(src), "--output",
                 str(tmp_path)]) == 2  # fmt: skip
    assert "is not a file" in capsys.readouterr().err


# 2 --------------------------------------------------------- one request, one row
class FailsOn(FakeEngine):
    """Raises ``error`` whenever a prompt equal to ``bad`` is in the call; ``broken``
    makes every later call fail too (a dead worker)."""

    def __init__(self, bad, error, *, broken=False):
        super().__init__()
        self.bad, self.error, self.broken, self.failed = bad, error, broken, False

    def __call__(self, prompts, params):
        if (self.broken and self.failed) or self.bad in prompts:
            self.failed = True
            raise self.error
        return super().__call__(prompts, params)


def test_a_request_that_breaks_the_engine_gets_an_error_row_alone(src, tmp_path):
    dst = tmp_path / "out.jsonl"
    bad = [5, 5, 4]  # g3
    summary = batch(src, dst, FailsOn(bad, RuntimeError("index out of range")), group_size=4)
    by_id = {r["id"]: r for r in rows(dst)}
    assert "internal error" in by_id["g3"]["error"] and "index out of range" in by_id["g3"]["error"]
    assert all("text" in by_id[f"g{i}"] for i in range(3))
    assert summary["served"] == 3 and summary["errors"] == 1


def test_a_broken_engine_stops_the_job_without_an_error_row(src, tmp_path):
    dst = tmp_path / "out.jsonl"
    engine = FailsOn([5, 5, 2], RuntimeError("worker rank 1 died"), broken=True)
    with pytest.raises(RuntimeError, match="worker rank 1 died"):
        batch(src, dst, engine, group_size=1)
    assert [r["id"] for r in rows(dst)] == ["g0"]  # g1 gets no row: a rerun serves it


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from longquest.launch.api import LLM

    directory = make_tiny_model(tmp_path_factory.mktemp("tiny"), architecture="llama2")
    save_char_tokenizer(directory)
    return LLM(
        directory, launcher="local", dtype="float32", device="cpu",
        quest=QuestConfig(page_size=16, token_budget=32, dense_layers=1),
        cache=CacheConfig(max_tokens=256), prefill_chunk_tokens=64,
    )  # fmt: skip


def llm_batch(llm, src, dst, *, seam="generate", **options):
    if seam == "step":
        return batch(src, dst, step=llm.step, tokenizer=llm.tokenizer, **options)
    return batch(
        src,
        dst,
        lambda ids, params: llm.generate(ids, params, use_tqdm=False),
        tokenizer=llm.tokenizer,
        **options,
    )


@pytest.mark.parametrize("seam", ["step", "generate"])
def test_local_engine_logprobs_beyond_the_vocabulary_is_an_error_row(tiny_llm, tmp_path, seam):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        {"id": "a", "prompt": "one", "max_tokens": 2},
        {"id": "lp", "prompt": "x", "logprobs": 100000, "max_tokens": 2},
        {"id": "big", "prompt": "y" * 400, "max_tokens": 2},
        {"id": "b", "prompt": "two", "max_tokens": 2, "logprobs": 3},
    ]
    write_input(src, [json.dumps(line) for line in lines])
    summary = llm_batch(tiny_llm, src, dst, seam=seam, group_size=4)
    by_id = {r["id"]: r for r in rows(dst)}
    assert "logprobs=100000" in by_id["lp"]["error"] and "vocabulary" in by_id["lp"]["error"]
    # 14: a capacity error names the request by its id and line, not "prompt 0".
    assert by_id["big"]["error"].startswith('request id="big" (input line 3) has 400 tokens')
    assert "text" in by_id["a"] and "text" in by_id["b"]
    assert summary["served"] == 2 and summary["errors"] == 2


def test_a_prompt_past_the_models_context_is_its_error_row(tiny_llm, tmp_path):
    """The tiny model declares 512 positions: the long line gets a row that names both
    lengths and the option, and the lines around it are served."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        {"id": "a", "prompt": "one", "max_tokens": 2},
        {"id": "long", "prompt": "z" * 600, "max_tokens": 2},
        {"id": "b", "prompt": "two", "max_tokens": 2},
    ]
    write_input(src, [json.dumps(line) for line in lines])
    summary = llm_batch(tiny_llm, src, dst, group_size=4)
    by_id = {r["id"]: r for r in rows(dst)}
    assert by_id["long"]["error"].startswith('request id="long" (input line 2) has 600 tokens')
    assert "past the model's context of 512 tokens" in by_id["long"]["error"]
    assert "--allow-long-context" in by_id["long"]["error"]
    assert summary["served"] == 2 and summary["errors"] == 1


# 3 ----------------------------------------------------------------- group size
@pytest.mark.parametrize("group_size", [-1, 0, True, 2.0, "8"])
def test_group_size_must_be_a_positive_int(src, tmp_path, group_size):
    dst = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="--group-size"):
        batch(src, dst, group_size=group_size)
    assert not dst.exists()


# 4 ----------------------------------------------------------------------- lock
def test_a_second_job_on_the_same_output_fails_at_once(src, tmp_path):
    dst = tmp_path / "out.jsonl"
    refusals = []

    def generate(prompts, params):
        if not refusals:  # while the first job runs, a second one starts
            with pytest.raises(ValueError, match="locked: another batch job") as info:
                batch(src, dst)
            refusals.append(str(info.value))
        return FakeEngine()(prompts, params)

    batch(src, dst, generate, group_size=2)
    assert refusals and str(dst) in refusals[0]
    assert sorted(r["id"] for r in rows(dst)) == ["g0", "g1", "g2", "g3"]


# 5 -------------------------------------------------------------------- encoding
def test_a_line_that_is_not_utf8_is_an_error_row(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = b'{"id": "a", "prompt": "x y"}\n'
    src.write_bytes(good + b'{"id": "b", "prompt": "caf\xe9"}\n' + good.replace(b'"a"', b'"c"'))
    summary = batch(src, dst)
    by_id = {r["id"]: r for r in rows(dst)}
    assert "line 2 is not UTF-8" in by_id["line-2"]["error"] and by_id["line-2"]["line"] == 2
    assert "text" in by_id["a"] and "text" in by_id["c"]
    assert summary["served"] == 2 and summary["errors"] == 1


# 8 ------------------------------------------------------------ unreadable results
@pytest.mark.parametrize(
    "bad_line, says",
    [('{"id": "g1", "te', "not valid JSON"), ('{"text": "no id"}', "not a result row")],
)
def test_a_bad_row_in_the_output_names_file_and_line(src, tmp_path, bad_line, says):
    dst = tmp_path / "out.jsonl"
    good = json.dumps({"id": "g0", "text": "x"})
    content = f"{good}\n{bad_line}\n{good}\n".encode()
    dst.write_bytes(content)
    with pytest.raises(ValueError, match=f"{dst} line 2 is {says}") as info:
        batch(src, dst)
    assert "delete that line" in str(info.value)
    assert dst.read_bytes() == content
    with pytest.raises(ValueError, match="line 2"):
        read_done_ids(dst)


# 9 ---------------------------------------------------------------- retry errors
def test_retry_errors_serves_failed_ids_again_and_the_last_row_wins(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    long = json.dumps({"id": "long", "prompt": "a b c d e f g"})
    write_input(src, GOOD[:2] + [long])
    first = batch(src, dst)  # FakeEngine refuses prompts over 5 tokens
    assert first == {"served": 2, "errors": 1, "skipped": 0, "tokens": 4}
    assert batch(src, dst)["skipped"] == 3  # without the flag an error row is final

    class Bigger(FakeEngine):
        def __call__(self, prompts, params):
            return super().__call__([p[:5] for p in prompts], params)

    engine = Bigger()
    second = batch(src, dst, engine, retry_errors=True)
    assert second == {"served": 1, "errors": 0, "skipped": 2, "tokens": 64}
    assert len(engine.served) == 1
    assert [r["id"] for r in rows(dst)] == ["g0", "g1", "long", "long"]
    assert "text" in read_results(dst)['"long"']
    assert read_done_ids(dst, retry_errors=True) == {'"g0"', '"g1"', '"long"'}


# 10 ------------------------------------------------------------------------- ids
def test_ids_keep_their_json_value_and_duplicates_get_error_rows(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = [7, "7", True, "true", 1.5]
    write_input(
        src, [json.dumps({"id": i, "prompt": "a b"}) for i in ids] + ['{"id": 7, "prompt": "c"}']
    )
    summary = batch(src, dst)
    out = rows(dst)
    assert [r["id"] for r in out if "text" in r] == ids
    assert [type(r["id"]) for r in out if "text" in r] == [int, str, bool, str, float]
    (dup,) = [r for r in out if "error" in r]
    assert dup["id"] == "7#line-6" and "duplicate id 7 (first on line 1)" in dup["error"]
    assert summary["served"] == 5 and summary["errors"] == 1
    assert batch(src, dst)["skipped"] == 6  # resume matches every id, duplicate included


def test_retry_errors_flag_reaches_every_launcher(tmp_path, monkeypatch, capsys):
    import longquest.launch.api as api
    from longquest.launch import cli
    from longquest.launch.cli import main
    from longquest.launch.stream import steps_from_generate

    class FakeLLM:
        def __init__(self, model=None, **options):
            self.tokenizer = FakeTokenizer()

        def generate(self, ids, params, use_tqdm=True):
            return FakeEngine()([p[:5] for p in ids], params)

        def step(self, new):
            return steps_from_generate(self.generate)(new)

        def shutdown(self):
            pass

    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, GOOD[:1])
    dst.write_text(json.dumps({"id": "g0", "error": "an earlier failure"}) + "\n")
    monkeypatch.setattr(api, "LLM", FakeLLM)
    args = ["batch", "--model", str(tmp_path), "--input", str(src), "--output", str(dst)]
    assert main(args) == 0
    assert '"served": 0, "errors": 0, "skipped": 1' in capsys.readouterr().err
    assert main([*args, "--retry-errors"]) == 0
    assert '"served": 1, "errors": 0, "skipped": 0' in capsys.readouterr().err
    assert "text" in read_results(dst)['"g0"']
    commands = []
    monkeypatch.setattr(cli, "run_quietly_on_interrupt", lambda c: commands.append(c) or 0)
    assert main([*args, "--launcher", "torchrun", "--retry-errors"]) == 0
    assert "--retry-errors" in commands[0]


@pytest.mark.parametrize("launcher", ["local", "ray", "torchrun"])
def test_the_cli_refuses_bad_files_before_it_loads_the_model(src, tmp_path, monkeypatch, launcher):
    import longquest.launch.api as api
    from longquest.launch import cli
    from longquest.launch.cli import main

    def never(*args, **kwargs):
        raise AssertionError("started work despite bad files")

    monkeypatch.setattr(api, "LLM", never)
    monkeypatch.setattr(cli, "run_quietly_on_interrupt", never)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    common = ["batch", "--model", str(tmp_path), "--launcher", launcher, "--input", str(src)]
    assert main([*common, "--output", str(notes)]) == 2
    assert main([*common, "--output", str(src)]) == 2
    assert main([*common, "--output", str(tmp_path / "o.jsonl"), "--group-size", "0"]) == 2
    assert notes.read_text() == "my notes" and not (tmp_path / "o.jsonl").exists()
