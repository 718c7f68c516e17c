"""Hugging Face transformers as the baseline: the engine's own weights in a transformers model.

:func:`transformers_twin` builds a transformers model (SDPA attention) of the same config whose
parameters are views of the engine model's tensors, so the two models are identical and the
twin costs no weight memory. The timers run transformers the way a user would: ``generate``
one prompt at a time with the default (dynamic) cache, or one forward over a whole prompt.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from longquest.engine.config import ModelConfig
from longquest.engine.loader import model_config_from_hf
from longquest.engine.model import Model


def hf_config_of(config: ModelConfig) -> object:
    """The transformers config (Llama) of a ``ModelConfig``, as a config.json would give it."""
    from transformers import AutoConfig

    if config.architecture != "LlamaForCausalLM":
        raise ValueError(f"hf_config_of builds Llama configs only, got {config.architecture}")
    return AutoConfig.for_model(
        "llama", architectures=["LlamaForCausalLM"], vocab_size=config.vocab_size,
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_qo_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        rope_scaling=dict(config.rope_scaling) if config.rope_scaling else None,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, eos_token_id=list(config.eos_token_ids),
    )  # fmt: skip


def hf_state_dict(model: Model) -> dict[str, torch.Tensor]:
    """Transformers tensor name -> a view of ``model``'s parameter holding it (no copies)."""
    config = model.config
    q_rows = config.num_qo_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    inter = config.intermediate_size
    state = {"model.embed_tokens.weight": model.embed_tokens, "model.norm.weight": model.norm}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = model.lm_head
    for i, layer in enumerate(model.layers):
        at = f"model.layers.{i}."
        rows = {"q_proj": (0, q_rows), "k_proj": (q_rows, kv_rows),
                "v_proj": (q_rows + kv_rows, kv_rows)}  # fmt: skip
        for name, (start, count) in rows.items():
            state[f"{at}self_attn.{name}.weight"] = layer.qkv_proj.narrow(0, start, count)
            if layer.qkv_bias is not None:
                state[f"{at}self_attn.{name}.bias"] = layer.qkv_bias.narrow(0, start, count)
        if layer.q_norm is not None:
            state[f"{at}self_attn.q_norm.weight"] = layer.q_norm
            state[f"{at}self_attn.k_norm.weight"] = layer.k_norm
        state.update({
            f"{at}input_layernorm.weight": layer.input_norm,
            f"{at}self_attn.o_proj.weight": layer.o_proj,
            f"{at}post_attention_layernorm.weight": layer.post_attention_norm,
            f"{at}mlp.gate_proj.weight": layer.gate_up_proj.narrow(0, 0, inter),
            f"{at}mlp.up_proj.weight": layer.gate_up_proj.narrow(0, inter, inter),
            f"{at}mlp.down_proj.weight": layer.down_proj,
        })  # fmt: skip
    return state


def transformers_twin(model: Model, *, hf_config: object | None = None) -> torch.nn.Module:
    """A transformers causal LM (SDPA) running ``model``'s weights, shared, not copied.

    hf_config: the model directory's transformers config; None builds it from
        ``model.config`` (the random-weight models). Either way it must describe
        ``model.config`` (checked through the engine's own config reader).
    """
    from transformers import AutoModelForCausalLM

    hf_config = hf_config if hf_config is not None else hf_config_of(model.config)
    read = replace(model_config_from_hf(hf_config), eos_token_ids=())
    if read != replace(model.config, eos_token_ids=()):
        raise ValueError(f"the transformers config reads as {read}, not the engine's model")
    device, dtype = model.embed_tokens.device, model.embed_tokens.dtype
    with torch.device("meta"):  # no weight memory: the engine's tensors are assigned below
        twin = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    missing, unexpected = twin.load_state_dict(hf_state_dict(model), strict=False, assign=True)
    if unexpected or [name for name in missing if name != "lm_head.weight"]:
        raise ValueError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    if model.config.tie_word_embeddings:
        twin.lm_head.weight = twin.model.embed_tokens.weight
    # The rotary frequencies are buffers computed at construction: rebuild them off meta.
    twin.model.rotary_emb = type(twin.model.rotary_emb)(config=twin.config).to(device)
    twin.generation_config.eos_token_id = None  # every answer runs to max_new_tokens
    twin.generation_config.pad_token_id = 0
    return twin.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_generate(twin: torch.nn.Module, prompt: list[int], *, max_new_tokens: int) -> tuple:
    """``(seconds, generated token ids)`` of one greedy ``generate`` call (dynamic cache)."""
    device = twin.model.embed_tokens.weight.device
    ids = torch.tensor([prompt], device=device)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = twin.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, out[0, len(prompt) :].tolist()


def hf_prefill_seconds(twin: torch.nn.Module, prompt: list[int]) -> float:
    """Seconds of one forward over ``prompt`` as ``generate``'s prefill runs it: the KV
    cache filled, logits of the last position only."""
    device = twin.model.embed_tokens.weight.device
    ids = torch.tensor([prompt], device=device)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = twin(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    seconds = time.perf_counter() - start
    del out
    return seconds


def hf_logprobs(twin: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    """Log-probabilities (fp32, ``[vocab_size]``) of the token after ``prompt``."""
    device = twin.model.embed_tokens.weight.device
    with torch.inference_mode():
        logits = twin(input_ids=torch.tensor([prompt], device=device), logits_to_keep=1).logits
    return torch.log_softmax(logits[0, -1].float(), dim=-1)
