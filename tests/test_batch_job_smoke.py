"""benchmarks/batch_job.py end to end on the CPU with the real demo model (``--smoke`` at
small sizes): every case runs each of its modes and writes the JSON the README rows come from."""

import json

import pytest
import torch

from benchmarks.batch_job import HF, OFF, ON, main

pytestmark = pytest.mark.slow

SMALL = ["--smoke", "--max-tokens", "4"]


def _record(tmp_path, pattern: str) -> dict:
    (path,) = tmp_path.glob(pattern)
    record = json.loads(path.read_text())
    assert {"device", "torch", "transformers", "git_commit", "date"} <= set(record["environment"])
    assert record["model"] == "SmolLM2-135M-Instruct-fp32" and record["dtype"] == "float32"
    return record


def test_job_runs_every_mode_on_the_same_prompts(tmp_path):
    main([*SMALL, "--questions", "2", "--context", "256", "--hf-prompts", "1",
          "--out-dir", str(tmp_path)])  # fmt: skip
    record = _record(tmp_path, "batch-job-cpu-*.json")
    assert (record["case"], record["documents"], record["questions"]) == ("job", 2, 2)
    modes = record["modes"]
    engines = [ON, OFF]
    assert set(modes) == {*engines, HF}
    for name in engines:
        assert modes[name]["prompt_tokens"] == 4 * (256 + 32)
        assert modes[name]["output_tokens"] == 4 * 4
        assert modes[name]["same_answers_as_caching_off"] == 4
    # One model in two frameworks: the same next token, the same log-probability.
    check = record["model_check"]
    assert check["same_next_token"] and check["logprob_abs_diff"] < 1e-3
    hf = modes[HF]
    assert record["hf_prompts_timed"] == hf["prompts_timed"] == 1 and hf["extrapolated"]
    assert hf["same_answers_as_caching_off"] == 1
    # Both are rounded to milliseconds.
    assert hf["wall_seconds"] == pytest.approx(4 * hf["seconds_per_prompt"], abs=0.003)
    target = record["prefill_target"]
    assert modes[ON]["cached_prompt_tokens"] > 0 and target["met"] is True
    assert record["ratios"]["on_over_off"] > 0 and record["ratios"]["on_over_hf"] > 0


def test_distinct_prompts_alternate_modes(tmp_path):
    main([*SMALL, "--distinct", "2", "--context", "128", "--out-dir", str(tmp_path)])
    record = _record(tmp_path, "batch-job-distinct-cpu-*.json")
    names = [run["mode"] for run in record["runs"]]
    assert names == [ON, OFF, OFF, ON] and record["on_over_off"] > 0
    assert all(run["cached_prompt_tokens"] == 0 for run in record["runs"])


def test_prefill_compares_chunks_and_transformers(tmp_path):
    main([*SMALL, "--prefill-only", "--contexts", "256", "--chunks", "64", "--chunk", "128",
          "--out-dir", str(tmp_path)])  # fmt: skip
    record = _record(tmp_path, "batch-job-prefill-cpu-*.json")
    runners = [(row["runner"], row["chunk"]) for row in record["rows"]]
    assert runners == [("engine", 64), ("engine", 128), (HF, None)]
    assert all(row["seconds"] > 0 and row["mfu"] > 0 for row in record["rows"])
    targets = record["targets"]
    assert set(targets["engine_not_slower_than_hf"]) == {"256"} and targets["mfu_at_256"] > 0


def test_transformers_twin_of_random_weights_is_the_engine_model():
    """The GPU path's twin (config built from a ModelConfig, Llama 3.1 RoPE scaling): the
    engine's tensors, not copies, and the same next-token log-probabilities."""
    from dataclasses import replace

    from benchmarks.batch_job import model_check
    from benchmarks.hf_reference import transformers_twin
    from benchmarks.job_engine import Setup, make_engine
    from benchmarks.synthetic import llama31_8b_config, random_model

    config = replace(llama31_8b_config(), vocab_size=512, hidden_size=64, intermediate_size=96,
                     num_layers=2, num_qo_heads=4, num_kv_heads=2, head_dim=16)  # fmt: skip
    model = random_model(config, dtype=torch.float32, device="cpu")
    setup = Setup(model=model, config=config, hf_config=None, device=torch.device("cpu"),
                  dtype=torch.float32, impl="torch", description="tiny")  # fmt: skip
    twin = transformers_twin(model)
    up = twin.model.layers[1].mlp.up_proj.weight
    assert up.data_ptr() == model.layers[1].gate_up_proj[96:].data_ptr()
    engine = make_engine(setup, pages=32, chunk=64, prefix_caching=None)
    check = model_check(engine, twin, setup, tokens=200)
    assert check["same_next_token"] and check["logprob_abs_diff"] < 1e-4
