"""Hugging Face config + safetensors -> ``Model``.

The config is read with ``AutoConfig`` (never ``trust_remote_code``); weights
only from safetensors (``model.safetensors``, or the shards named by
``model.safetensors.index.json``), streamed one tensor at a time into the
model's preallocated parameters so peak host memory stays at one tensor.
Under tensor parallelism a rank reads only its part of each tensor
(``get_slice``; :mod:`longquest.engine.shards` says which part), so no process
ever holds the whole model. Pickle checkpoints (``*.bin``, ``*.pt``) are never opened.

Sliding-window attention (Mistral v0.1, Qwen2 with ``use_sliding_window``) is
not implemented: a window smaller than the model's context is rejected, and a
window at least as long as the context is full attention and so accepted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig

from longquest.engine.config import SUPPORTED_ARCHITECTURES, ModelConfig
from longquest.engine.model import Model, TensorParallel, check_tensor_parallel
from longquest.engine.rope import ROPE_KEYS, check_rope_scaling, rope_type_of
from longquest.engine.shards import Target, checkpoint_targets

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def model_config_from_hf(hf_config: object) -> ModelConfig:
    """Translate a transformers config (4.x or 5.x style) into a ``ModelConfig``.

    Raises ValueError for architectures or features the model does not
    implement (other rope scalings, sliding windows, o_proj/MLP biases,
    activations other than SiLU).
    """
    architecture = _architecture(hf_config)
    num_qo_heads = int(hf_config.num_attention_heads)
    num_kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or num_qo_heads)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_qo_heads
    max_positions = int(getattr(hf_config, "max_position_embeddings", 8192))
    rope_theta, rope_scaling = _rope(hf_config, max_positions)

    activation = getattr(hf_config, "hidden_act", "silu")
    if activation != "silu":
        raise ValueError(f"hidden_act={activation!r} is not supported; the MLP implements SiLU")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported; the MLP has no biases")
    # Qwen2 always has q/k/v biases; elsewhere attention_bias also adds an o_proj bias.
    if architecture != "Qwen2ForCausalLM" and getattr(hf_config, "attention_bias", False):
        raise ValueError(
            "attention_bias=True (q/k/v/o biases) is not supported for " + architecture
        )
    if getattr(hf_config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ValueError("partial_rotary_factor != 1 is not supported; RoPE covers whole heads")
    _reject_sliding_window(hf_config, max_positions)

    eos = getattr(hf_config, "eos_token_id", None)
    eos_ids = () if eos is None else (int(eos),) if isinstance(eos, int) else tuple(map(int, eos))
    return ModelConfig(
        architecture=architecture,
        vocab_size=int(hf_config.vocab_size),
        hidden_size=int(hf_config.hidden_size),
        intermediate_size=int(hf_config.intermediate_size),
        num_layers=int(hf_config.num_hidden_layers),
        num_qo_heads=num_qo_heads,
        num_kv_heads=num_kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(hf_config.rms_norm_eps),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=architecture == "Qwen2ForCausalLM",
        qk_norm=architecture == "Qwen3ForCausalLM",
        eos_token_ids=eos_ids,
    )


def _architecture(hf_config: object) -> str:
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        model_type = getattr(hf_config, "model_type", None)
        architectures = [_MODEL_TYPES.get(model_type, f"model_type={model_type!r}")]
    architecture = architectures[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {architecture!r}; longquest supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return architecture


def _rope(hf_config: object, max_positions: int) -> tuple[float, tuple | None]:
    """``(rope_theta, rope_scaling items or None)`` from either config style.

    transformers 5 keeps everything in ``rope_parameters`` (with ``rope_theta``
    and ``rope_type`` inside); 4.x has ``rope_theta`` and a ``rope_scaling``
    dict whose kind is under ``rope_type`` or, older, ``type``.
    """
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # Per-layer-type parameters; all our layers are full attention.
        if set(params) != {"full_attention"}:
            raise ValueError(f"per-layer rope_parameters {sorted(params)} are not supported")
        params = params["full_attention"]
    if isinstance(params, dict) and params:
        params = dict(params)
        theta = params.pop("rope_theta", getattr(hf_config, "rope_theta", None))
    else:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        raise ValueError("the config has no rope_theta (nor rope_parameters['rope_theta'])")
    kind = rope_type_of(params)
    if kind == "default":
        return float(theta), None
    params.pop("type", None)
    params["rope_type"] = kind
    if kind == "llama3":
        params.setdefault("original_max_position_embeddings", max_positions)
    check_rope_scaling(params)
    required, optional = ROPE_KEYS[kind]
    if float(params.get("partial_rotary_factor") or 1.0) != 1.0:
        raise ValueError("rope partial_rotary_factor != 1 is not supported")
    keys = ("rope_type", *required, *(key for key in optional if params.get(key) is not None))
    return float(theta), tuple(sorted((key, params[key]) for key in keys))


def _reject_sliding_window(hf_config: object, max_positions: int) -> None:
    layer_types = getattr(hf_config, "layer_types", None) or []
    window = getattr(hf_config, "sliding_window", None)
    uses_window = "sliding_attention" in layer_types or (
        window is not None and getattr(hf_config, "use_sliding_window", True)
    )
    if uses_window and (window is None or window < max_positions):
        raise ValueError(
            f"sliding-window attention (sliding_window={window}) is not supported: longquest "
            "attends to the whole context. To run the model with full attention anyway (its "
            "outputs then differ from the original past the window), set sliding_window to "
            "null (and use_sliding_window to false) in config.json."
        )


def load_model(
    model_dir: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    tensor: TensorParallel | None = None,
) -> tuple[Model, ModelConfig]:
    """Build the model of a Hugging Face directory and load its safetensors weights.

    model_dir: holds ``config.json`` and ``model.safetensors`` or
        ``model.safetensors.index.json`` with its shards.
    dtype: the parameters' dtype (checkpoint tensors are cast); checked by
        running the model's ops on ``device`` first.
    tensor: the tensor-parallel group: the model holds, and this process reads, only
        this rank's share of the weights. Its size must divide the model's heads and
        intermediate size: ValueError, before any weight is read, when it does not.
    Returns ``(model, config)``, the model in eval mode on ``device``.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {str(path)!r} does not exist; pass a Hugging Face model "
            "directory holding config.json and safetensors weights"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {str(path)!r}; is it a Hugging Face model?")
    weight_files = _weight_files(path)
    device = torch.device(device)
    hf_config = read_hf_config(path)
    config = model_config_from_hf(hf_config)
    check_tensor_parallel(config, tensor_parallel_size=1 if tensor is None else tensor.world_size)
    check_dtype_runs(dtype=dtype, device=device)

    model = Model(config, dtype=dtype, device=device, tensor=tensor).eval()
    targets = checkpoint_targets(model)
    loaded: set[str] = set()

    def pick(name: str, shape: tuple[int, ...]) -> Target | None:
        """The target of checkpoint tensor ``name``, None to skip it."""
        if name.endswith("rotary_emb.inv_freq") or name in loaded:
            return None  # computed from the config instead; duplicates across shards
        if name == "lm_head.weight" and config.tie_word_embeddings:
            return None  # tied: the head is the embedding
        target = targets.get(name)
        if target is None:
            raise ValueError(
                f"unexpected tensor {name!r} in the checkpoint of {str(path)!r}: the "
                f"{config.architecture} model has no such weight (an unsupported variant?)"
            )
        if shape != target.shape:
            raise ValueError(
                f"tensor {name!r} has shape {shape} but config.json implies "
                f"{target.shape}; the checkpoint and config.json do not match"
            )
        loaded.add(name)
        return target

    with torch.no_grad():
        for target, part in _stream(weight_files, pick=pick):
            target.param.copy_(part)
    missing = sorted(set(targets) - loaded)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        hint = (
            "; if the head is tied to the embedding set tie_word_embeddings to true"
            if "lm_head.weight" in missing
            else ""
        )
        raise ValueError(
            f"tensor {missing[0]!r} is missing from the checkpoint in {str(path)!r} "
            f"(missing: {', '.join(missing[:5])}{more}){hint}"
        )
    return model, config


def check_dtype_runs(*, dtype: torch.dtype, device: torch.device) -> None:
    """Raise ValueError unless the model's ops run in ``dtype`` on ``device``.

    Tries a tiny embedding, matmul, SiLU and norm rather than guessing from
    the device name (CPU support for fp16/bf16 depends on the build and chip).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available; use 'cpu'")
    try:
        weight = torch.ones(4, 8, dtype=dtype, device=device)
        x = F.embedding(torch.tensor([0, 3], device=device), weight)  # [2, 8]
        y = F.silu(F.linear(x, weight)) * F.linear(x, weight)  # [2, 4]
        z = y.float() * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        (weight[:, :4] * z.to(dtype)[:1]).float().sum().item()
    except (RuntimeError, NotImplementedError, TypeError) as error:
        raise ValueError(
            f"dtype {dtype} cannot run the model on {device} ({error}); "
            "use torch.float32 (or bfloat16/float16 where the device supports them)"
        ) from error


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files to read, from the index when the checkpoint is sharded."""
    index = path / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [shard for shard in shards if not (path / shard).is_file()]
        if absent:
            raise FileNotFoundError(
                f"{INDEX_FILE} in {str(path)!r} names shards that are not there: "
                f"{', '.join(absent)}; download the complete checkpoint"
            )
        return [path / shard for shard in shards]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    found = f" (found {', '.join(others)})" if others else ""
    raise FileNotFoundError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {str(path)!r}{found}; longquest loads only "
        "safetensors weights, never pickle checkpoints: convert them, e.g. load with "
        "transformers and call save_pretrained(..., safe_serialization=True)"
    )


def read_hf_config(path: Path) -> object:
    """``config.json`` through AutoConfig; a file that is not a JSON object, or that
    transformers cannot read, is a ValueError naming the file and the fault."""
    file = path / "config.json"
    try:
        parsed = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{file} is not valid JSON ({error}); fix the file or download it again"
        ) from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(parsed).__name__}")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"transformers cannot read {file} ({type(error).__name__}: {error}); is it the "
            "config.json of a supported model?"
        ) from error


def _stream(
    files: list[Path], *, pick: Callable[[str, tuple[int, ...]], Target | None]
) -> Iterator[tuple[Target, torch.Tensor]]:
    """``(target, its part of the checkpoint tensor)`` for every tensor of the files that
    ``pick(name, shape)`` gives a target, read one at a time onto the CPU: only the part
    the target takes is read from disk (``get_slice``).

    Raises ValueError naming the file when it is truncated or corrupt.
    """
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as tensors:
                for name in tensors.keys():
                    handle = tensors.get_slice(name)
                    target = pick(name, tuple(handle.get_shape()))
                    if target is not None:
                        yield target, target.read(handle)
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"weights file {file} is truncated or corrupt ({error}); download it again"
            ) from error
