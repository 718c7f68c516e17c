"""Tiny random-weight Hugging Face models of every supported variant, for tests.

Sizes are deliberately odd (3 KV heads, vocab and MLP widths that are not
powers of two) so shape mix-ups show. Every weight is redrawn with a scale
that keeps activations O(1) — attention is far from uniform — and norm
weights and biases are randomised so a loader that skipped them would fail. The tied
variants' final norm is scaled down by sqrt(hidden) so their logits, read through the
N(0, 1) embedding, are O(1) like a real model's rather than near 100.
:func:`make_tiny_model` saves no tokenizer (only token ids are needed);
:func:`save_char_tokenizer` adds one, one token a character, for tests that send text.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHITECTURES = ["llama2", "llama3.1", "llama3.2-tied", "mistral", "qwen2", "qwen3"]

_COMMON = dict(
    num_hidden_layers=5,
    num_key_value_heads=3,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    max_position_embeddings=512,
)

_VARIANTS: dict[str, tuple[str, dict]] = {
    # Llama 2: multi-head attention (as many KV heads as query heads).
    "llama2": (
        "llama",
        dict(
            hidden_size=96,
            num_attention_heads=3,
            intermediate_size=200,
            vocab_size=1000,
            rope_theta=1e4,
        ),
    ),
    # Llama 3.1: GQA, list of EOS ids, "llama3" scaling whose bands all fall
    # inside head_dim 32 (original context 64 -> wavelengths 16..64 are blended).
    "llama3.1": (
        "llama",
        dict(
            hidden_size=192,
            num_attention_heads=6,
            intermediate_size=328,
            vocab_size=1003,
            rope_theta=1e5,
            eos_token_id=[2, 7],
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "llama3.2-tied": (
        "llama",
        dict(
            hidden_size=192,
            num_attention_heads=6,
            intermediate_size=328,
            vocab_size=1003,
            rope_theta=5e5,
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=128,
            ),
        ),
    ),
    # Mistral with an explicit head_dim: 9 x 32 query width != hidden 96.
    "mistral": (
        "mistral",
        dict(
            hidden_size=96,
            num_attention_heads=9,
            head_dim=32,
            intermediate_size=200,
            vocab_size=997,
            rope_theta=1e6,
            sliding_window=None,
        ),
    ),
    "qwen2": (
        "qwen2",
        dict(
            hidden_size=192,
            num_attention_heads=6,
            intermediate_size=328,
            vocab_size=1001,
            rope_theta=1e6,
            use_sliding_window=False,
        ),
    ),
    # Qwen3: per-head q/k norm, head_dim 64 explicit (6 x 64 != hidden 96), tied.
    "qwen3": (
        "qwen3",
        dict(
            hidden_size=96,
            num_attention_heads=6,
            head_dim=64,
            intermediate_size=200,
            vocab_size=1001,
            rope_theta=1e6,
            tie_word_embeddings=True,
            use_sliding_window=False,
        ),
    ),
}


def make_tiny_model(directory: Path, *, architecture: str, seed: int = 0, **overrides) -> Path:
    """Save a tiny fp32 random model of variant ``architecture`` into ``directory``.

    architecture: one of ``ARCHITECTURES``. overrides: config fields to replace.
    Writes ``config.json`` and ``model.safetensors`` (``save_pretrained``);
    returns ``directory``. Does not touch the global RNG.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if architecture not in _VARIANTS:
        raise ValueError(f"unknown tiny architecture {architecture!r}; use one of {ARCHITECTURES}")
    model_type, fields = _VARIANTS[architecture]
    config = AutoConfig.for_model(model_type, **{**_COMMON, **fields, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        _randomise(model, generator)
    directory = Path(directory)
    model.save_pretrained(directory)
    return directory


def _randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    config = model.config
    head_scale = config.hidden_size**-0.5 if config.tie_word_embeddings else 1.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "model.norm.weight":  # feeds the LM head
                param.normal_(1.0, 0.2, generator=generator).mul_(head_scale)
            elif name.endswith("norm.weight"):
                param.normal_(1.0, 0.2, generator=generator)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.2, generator=generator)
            elif "embed_tokens" in name:
                param.normal_(0.0, 1.0, generator=generator)
            else:  # [out, in] projections: unit-variance outputs for unit inputs
                param.normal_(0.0, param.shape[1] ** -0.5, generator=generator)


def save_char_tokenizer(directory: Path) -> Path:
    """Save a character-level tokenizer (one token per printable ASCII character and
    newline; ids 0..98, ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2) with a chat template into
    ``directory``, so a tiny model there takes text and chat prompts. Returns ``directory``.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    )
    fast.save_pretrained(directory)
    return Path(directory)
