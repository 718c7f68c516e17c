"""Loading Hugging Face directories: shards, dtypes, tying, config styles, and every error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from longquest.engine.config import SUPPORTED_ARCHITECTURES
from longquest.engine.loader import load_model, model_config_from_hf
from longquest.kernels.ref import prefill_attention_ref
from tests.tiny_models import make_tiny_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("llama31"), architecture="llama3.1")


@pytest.fixture
def copy(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny model that a test may break."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    def attention(*, layer, query, key, value):
        return prefill_attention_ref(query=query, key=key, value=value, query_start=0)[0]

    with torch.inference_mode():
        positions = torch.arange(len(tokens))
        return model.compute_logits(
            model(input_ids=tokens, positions=positions, attention=attention)
        )


def test_sharded_checkpoint_loads_identically(tiny_dir, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    sharded, sharded_config = load_model(tmp_path, dtype=torch.float32, device="cpu")
    single, single_config = load_model(tiny_dir, dtype=torch.float32, device="cpu")
    assert sharded_config == single_config
    ours, theirs = sharded.state_dict(), single.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_bf16_load_gives_bf16_parameters_and_close_logits(tiny_dir):
    model, _ = load_model(tiny_dir, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32
    reference, config = load_model(tiny_dir, dtype=torch.float32, device="cpu")
    tokens = torch.randint(0, config.vocab_size, (20,), generator=torch.Generator().manual_seed(0))
    low, high = logits(model, tokens), logits(reference, tokens)
    assert low.dtype == torch.float32
    assert (low - high).norm() / high.norm() < 0.05


@pytest.mark.parametrize("variant", ["llama3.2-tied", "qwen3"])
def test_tied_head_is_the_embedding(variant, tmp_path):
    directory = make_tiny_model(tmp_path, architecture=variant)
    model, config = load_model(directory, dtype=torch.float32, device="cpu")
    assert config.tie_word_embeddings
    assert model.lm_head is model.embed_tokens


def test_config_fields(tiny_dir):
    _, config = load_model(tiny_dir, dtype=torch.float32, device="cpu")
    assert (config.architecture, config.num_layers, config.head_dim) == ("LlamaForCausalLM", 5, 32)
    assert (config.num_qo_heads, config.num_kv_heads, config.vocab_size) == (6, 3, 1003)
    assert config.eos_token_ids == (2, 7) and config.rope_theta == 1e5
    assert dict(config.rope_scaling)["rope_type"] == "llama3"
    hash(config)  # frozen and hashable, rope_scaling included


def test_transformers_4_style_config():
    legacy = SimpleNamespace(
        architectures=None,
        model_type="llama",
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=None,
        rms_norm_eps=1e-6,
        max_position_embeddings=1024,
        rope_theta=5e5,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        eos_token_id=3,
    )
    config = model_config_from_hf(legacy)
    assert config.architecture == "LlamaForCausalLM"
    assert (config.num_kv_heads, config.head_dim, config.rope_theta) == (4, 16, 5e5)
    assert config.eos_token_ids == (3,) and not config.tie_word_embeddings
    assert config.rope_scaling == (
        ("factor", 8.0),
        ("high_freq_factor", 4.0),
        ("low_freq_factor", 1.0),
        ("original_max_position_embeddings", 256),
        ("rope_type", "llama3"),
    )
    plain = model_config_from_hf(SimpleNamespace(**{**vars(legacy), "rope_scaling": None}))
    assert plain.rope_scaling is None and plain.rope_theta == 5e5


def test_inv_freq_tensor_in_checkpoint_is_ignored(copy):
    def add(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)

    edit_tensors(copy, add)
    load_model(copy, dtype=torch.float32, device="cpu")


def test_sliding_window_as_long_as_the_context_is_accepted(tmp_path):
    directory = make_tiny_model(tmp_path, architecture="mistral", sliding_window=512)
    load_model(directory, dtype=torch.float32, device="cpu")


# ----------------------------------------------------------------------------- errors


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere", dtype=torch.float32, device="cpu")


def test_missing_config(copy):
    (copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(copy, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("keep", [0.5, 0.999, 100])
def test_truncated_or_corrupt_weights_name_the_file(copy, keep):
    path = copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    with pytest.raises(
        ValueError, match=r"weights file .*model\.safetensors is truncated or corrupt"
    ):
        load_model(copy, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("text", ['{"model_type": "llama",', "[1, 2]", "\xff"])
def test_invalid_config_json_names_the_file(copy, text):
    (copy / "config.json").write_text(text, encoding="latin-1")
    with pytest.raises(
        ValueError, match=r"config\.json (is not valid JSON|must hold a JSON object)"
    ):
        load_model(copy, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("device", ["tpu", "tpu:0", "mps", "cuda:x"])
def test_unknown_device_lists_the_accepted_ones(tiny_dir, device):
    from longquest.engine.builder import resolve_device

    with pytest.raises(
        ValueError, match=f"unknown device '{device}'; use 'cuda', 'cuda:N' or 'cpu'"
    ):
        resolve_device(device)


def test_no_safetensors_never_falls_back_to_pickle(copy):
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(
        FileNotFoundError, match=r"pytorch_model\.bin.*only safetensors.*never pickle"
    ):
        load_model(copy, dtype=torch.float32, device="cpu")


def test_index_naming_an_absent_shard(copy):
    (copy / "model.safetensors").rename(copy / "model-00001-of-00002.safetensors")
    weight_map = {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
    }
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(copy, dtype=torch.float32, device="cpu")


def test_unsupported_architecture(copy):
    edit_config(copy, architectures=["GPT2LMHeadModel"])
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    with pytest.raises(
        ValueError, match=f"unsupported architecture 'GPT2LMHeadModel'.*{supported}"
    ):
        load_model(copy, dtype=torch.float32, device="cpu")


def test_missing_tensor_is_named(copy):
    edit_tensors(copy, lambda tensors: tensors.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"'model\.layers\.2\.mlp\.up_proj\.weight' is missing"):
        load_model(copy, dtype=torch.float32, device="cpu")


def test_missing_untied_head_suggests_tying(copy):
    edit_tensors(copy, lambda tensors: tensors.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="'lm_head.weight' is missing.*tie_word_embeddings"):
        load_model(copy, dtype=torch.float32, device="cpu")


def test_wrong_shape_is_named_with_both_shapes(copy):
    def shrink(tensors):
        name = "model.layers.1.self_attn.k_proj.weight"
        tensors[name] = tensors[name][:64].clone()

    edit_tensors(copy, shrink)
    with pytest.raises(
        ValueError,
        match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \(64, 192\).*\(96, 192\)",
    ):
        load_model(copy, dtype=torch.float32, device="cpu")


def test_unexpected_tensor_is_named(copy):
    def add(tensors):
        tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(192)

    edit_tensors(copy, add)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.o_proj"):
        load_model(copy, dtype=torch.float32, device="cpu")


def test_dtype_the_device_cannot_run(tiny_dir):
    # Float8 has storage on the CPU but no kernels for the model's ops: the probe finds out.
    with pytest.raises(ValueError, match="dtype torch.float8_e4m3fn cannot run the model on cpu"):
        load_model(tiny_dir, dtype=torch.float8_e4m3fn, device="cpu")
    with pytest.raises(ValueError, match="floating-point"):
        load_model(tiny_dir, dtype=torch.int32, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda(tiny_dir):
    with pytest.raises(ValueError, match="CUDA is not available; use 'cpu'"):
        load_model(tiny_dir, dtype=torch.float32, device="cuda")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}},
            "rope scaling type 'dynamic' is not supported; longquest supports default, llama3, "
            "linear, yarn",
        ),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ],
)
def test_unsupported_features(copy, changes, message):
    edit_config(copy, **changes)
    with pytest.raises(ValueError, match=message):
        load_model(copy, dtype=torch.float32, device="cpu")


def test_short_sliding_window_is_rejected(tmp_path):
    directory = make_tiny_model(tmp_path, architecture="mistral", sliding_window=64)
    with pytest.raises(ValueError, match="sliding-window attention.*set sliding_window to null"):
        load_model(directory, dtype=torch.float32, device="cpu")
