"""Wrong types and values are refused where they enter: configs at construction, prompts
where they are encoded, each with a message naming what was wrong and what is accepted."""

from __future__ import annotations

import math

import pytest

from longquest.engine.config import CacheConfig, QuestConfig, SamplingParams
from tests.tiny_models import make_tiny_model, save_char_tokenizer


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(max_tokens="10"), "SamplingParams.max_tokens must be a whole number >= 1"),
        (dict(max_tokens=10.7), "SamplingParams.max_tokens must be a whole number"),
        (dict(max_tokens=True), "SamplingParams.max_tokens must be a whole number"),
        (dict(max_tokens=0), r"SamplingParams.max_tokens must be .* >= 1 .*, got 0"),
        (dict(temperature="0.5"), "SamplingParams.temperature must be a finite number >= 0"),
        (dict(temperature=math.nan), "SamplingParams.temperature must be a finite number"),
        (dict(temperature=math.inf), "SamplingParams.temperature must be a finite number"),
        (dict(temperature=-1), "SamplingParams.temperature must be a finite number >= 0"),
        (dict(top_p=0), r"SamplingParams.top_p must be a number in \(0, 1\]"),
        (dict(top_p="1"), r"SamplingParams.top_p must be a number in \(0, 1\]"),
        (dict(top_k=0), "SamplingParams.top_k must be -1 .off. or a whole number >= 1"),
        (dict(top_k=2.5), "SamplingParams.top_k must be -1"),
        (dict(seed="abc"), r"SamplingParams.seed must be None or a whole number in \[0, 2\*\*64\)"),
        (dict(seed=2**70), r"SamplingParams.seed must be None or a whole number in \[0, 2\*\*64\)"),
        (dict(seed=-1), "SamplingParams.seed must be None or a whole number"),
        (dict(stop=5), "SamplingParams.stop must be a string or a list of strings"),
        (dict(stop=[""]), "SamplingParams.stop must hold non-empty strings"),
        (dict(stop=["a", 3]), "SamplingParams.stop must hold non-empty strings"),
        (dict(ignore_eos="yes"), "SamplingParams.ignore_eos must be True or False"),
        (dict(logprobs="5"), "SamplingParams.logprobs must be None or a whole number >= 0"),
        (dict(logprobs=1.5), "SamplingParams.logprobs must be None or a whole number >= 0"),
        (dict(logprobs=-1), "SamplingParams.logprobs must be None or a whole number >= 0"),
    ],
)
def test_sampling_params_types(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_sampling_params_accepts_json_numbers_and_normalises_stop():
    params = SamplingParams(temperature=1, top_p=1, seed=2**64 - 1, stop=["a", "b"], logprobs=0)
    assert params.stop == ("a", "b")
    assert SamplingParams(stop="x").stop == ("x",)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: QuestConfig(token_budget="4096"), "QuestConfig.token_budget must be an int"),
        (lambda: QuestConfig(page_size=16.0), "QuestConfig.page_size must be a power of two"),
        (lambda: QuestConfig(dense_layers="2"), "QuestConfig.dense_layers must be an int"),
        (lambda: CacheConfig(max_tokens="4096"), "CacheConfig.max_tokens must be an int >= 1"),
        (lambda: CacheConfig(num_pages=1.5), "CacheConfig.num_pages must be an int >= 1"),
        (lambda: CacheConfig(memory_fraction="0.9"), "CacheConfig.memory_fraction must be"),
        (lambda: CacheConfig(memory_fraction=math.nan), "CacheConfig.memory_fraction must be"),
    ],
)
def test_config_types(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _model_config(**fields):
    from longquest.engine.config import ModelConfig

    shape = dict(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=8,
                 intermediate_size=8, num_layers=1, num_qo_heads=2, num_kv_heads=1,
                 head_dim=4, rms_norm_eps=1e-5, rope_theta=1e4)  # fmt: skip
    return ModelConfig(**shape, **fields)


def test_context_length_is_the_longest_the_config_declares():
    """YaRN and linear scalings often keep the unscaled length in max_position_embeddings
    (Qwen2.5 with YaRN x4: 32768); llama3 configs state the scaled one (Llama 3.1: 131072)."""
    from longquest.engine.loader import model_config_from_hf

    assert _model_config(max_position_embeddings=4096).context_length == 4096
    yarn = (("factor", 4.0), ("original_max_position_embeddings", 32768), ("rope_type", "yarn"))
    assert _model_config(max_position_embeddings=32768, rope_scaling=yarn).context_length == 131072
    linear = (("factor", 2.0), ("rope_type", "linear"))
    assert _model_config(max_position_embeddings=2048, rope_scaling=linear).context_length == 4096
    llama3 = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
              ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))  # fmt: skip
    config = _model_config(max_position_embeddings=131072, rope_scaling=llama3)
    assert config.context_length == 131072
    from transformers import AutoConfig

    hf = AutoConfig.for_model(
        "qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, num_hidden_layers=1, vocab_size=100, use_sliding_window=False,
        max_position_embeddings=32768, rope_theta=1e6,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    )  # fmt: skip
    assert model_config_from_hf(hf).context_length == 131072


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "mps", "cpu0", ""])
def test_engine_config_refuses_unknown_devices(device):
    from longquest.engine.config import EngineConfig

    with pytest.raises(ValueError, match=f"unknown device '{device}'; use 'cuda', 'cuda:N'"):
        EngineConfig(model="m", device=device)
    for good in ("cpu", "cuda", "cuda:3", None):
        assert EngineConfig(model="m", device=good).device == good
    with pytest.raises(ValueError, match="allow_long_context must be True or False"):
        EngineConfig(model="m", allow_long_context="yes")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from longquest.launch.api import LLM

    directory = make_tiny_model(tmp_path_factory.mktemp("tiny"), architecture="llama2")
    save_char_tokenizer(directory)
    return LLM(directory, launcher="local", dtype="float32", device="cpu",
               cache=CacheConfig(max_tokens=256))  # fmt: skip


@pytest.mark.parametrize(
    "prompts, message",
    [
        (None, "prompts must be a string or a list of prompts, got None"),
        ([1.5], r"prompt 0 is a list of token ids but holds 1.5 \(float\) at position 0"),
        ([[1, "a"]], r"holds 'a' \(str\) at position 1; token ids are ints"),
        ([[5, 1000]], r"prompt 0 has token id 1000 at position 1; the vocabulary is 0..999"),
        ([[-1]], "prompt 0 has token id -1 at position 0"),
        ([[{"role": "user"}]], "prompt 0 message 0 has no 'content'"),
        ([[{"content": "hi"}]], "prompt 0 message 0 must be a dict with a string 'role'"),
        ([{}], "prompt 0 message 0 must be a dict with a string 'role'"),
    ],
)
def test_generate_refuses_bad_prompts(llm, prompts, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts, use_tqdm=False)


def test_generate_refuses_sampling_params_that_are_not_sampling_params(llm):
    with pytest.raises(ValueError, match=r"for a dict write SamplingParams\(\*\*d\)"):
        llm.generate("hi", {"max_tokens": 2}, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams"):
        llm.generate(["hi"], [{"max_tokens": 2}], use_tqdm=False)
    (out,) = llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out.token_ids) == 2


def test_engine_refuses_ids_and_logprobs_beyond_the_vocabulary(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match="prompt 1 has token id 1000; the vocabulary is 0..999"):
        engine.generate([[5], [5, 1000]], [SamplingParams(max_tokens=1)] * 2)
    with pytest.raises(ValueError, match="logprobs=1001, more than the model's vocabulary"):
        engine.generate([[5]], [SamplingParams(max_tokens=1, logprobs=1001)])
    (out,) = engine.generate([[5]], [SamplingParams(max_tokens=1, logprobs=1000)])
    assert len(out.logprobs[0]) == 1000


def test_numpy_numbers_are_stored_as_python_numbers():
    """Values from numpy (a dataframe's column, say) are accepted and stored as int/float,
    which JSON and the kernels expect; numpy's bool is still not a number."""
    import numpy as np

    from longquest.engine.config import CacheConfig, QuestConfig, SamplingParams

    params = SamplingParams(max_tokens=np.int64(5), temperature=np.float32(0.5), seed=np.uint64(3))
    assert (params.max_tokens, params.temperature, params.seed) == (5, 0.5, 3)
    assert type(params.max_tokens) is int and type(params.temperature) is float
    assert type(QuestConfig(token_budget=np.int32(512)).token_budget) is int
    assert type(CacheConfig(max_tokens=np.int64(4096)).max_tokens) is int
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=np.bool_(True))
