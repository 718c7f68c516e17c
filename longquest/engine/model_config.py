"""The architecture facts the engine's model needs (read from a Hugging Face config)."""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The architecture facts the engine's model needs, read from a HF config."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, object], ...] | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; longquest supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_qo_heads % self.num_kv_heads:
            raise ValueError(
                f"num_qo_heads={self.num_qo_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads

    @property
    def context_length(self) -> int:
        """The context the model declares usable: ``max_position_embeddings``, or a RoPE
        scaling's ``factor x original_max_position_embeddings`` when that is longer (YaRN
        and linear configs often keep the pre-scaling length in max_position_embeddings)."""
        scaling = dict(self.rope_scaling or ())
        if scaling.get("rope_type") in ("linear", "yarn") and "factor" in scaling:
            original = scaling.get("original_max_position_embeddings")
            scaled = float(scaling["factor"]) * int(original or self.max_position_embeddings)
            return max(self.max_position_embeddings, int(scaled))
        return self.max_position_embeddings
