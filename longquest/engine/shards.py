"""Which part of every checkpoint tensor a model's parameters hold, so that a tensor rank
reads only its shard from the safetensors files (``safe_open(...).get_slice``).

At tensor-parallel size T, rank t holds KV heads ``[t Hkv/T, (t+1) Hkv/T)`` and the query
heads that attend to them (the same range of ``Hq/T`` heads: query head h uses KV head
``h // group_size``), so q/k/v (and their biases) are read by rows and o_proj by columns;
gate/up by rows and down_proj by columns of the intermediate dimension; the embedding and
LM head by vocabulary rows (``ceil(V/T)`` a rank, the last rank's shard short: its padding
rows stay zero). Norms are whole on every rank. At T = 1 every target is the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longquest.engine.model import Model


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where one checkpoint tensor goes.

    param: the part of a parameter it fills (a view).
    shape: the checkpoint tensor's whole shape, as config.json implies it.
    rows, cols: the ``(start, stop)`` range of its first / second dimension this rank
        reads, or None for all of it.
    """

    param: torch.Tensor
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None

    def read(self, tensor_slice) -> torch.Tensor:
        """This rank's part of a safetensors ``get_slice`` handle (only it is read)."""
        rows = slice(*self.rows) if self.rows else slice(None)
        if len(self.shape) == 1:
            return tensor_slice[rows]
        return tensor_slice[rows, slice(*self.cols) if self.cols else slice(None)]


def checkpoint_targets(model: Model) -> dict[str, Target]:
    """Hugging Face tensor name -> the :class:`Target` of ``model``'s parameters it fills."""
    config, tensor = model.config, model.tensor
    rank = 0 if tensor is None else tensor.rank
    head_dim, hidden = config.head_dim, config.hidden_size
    q_all, kv_all = config.num_qo_heads * head_dim, config.num_kv_heads * head_dim
    q_rows, kv_rows = model.num_qo_heads * head_dim, model.num_kv_heads * head_dim
    inter_all = config.intermediate_size
    inter = model.layers[0].down_proj.shape[1]

    def part(size: int, total: int) -> tuple[int, int] | None:
        """Rank ``rank``'s range of a dimension split in parts of ``size`` (None: whole)."""
        return None if size == total else (rank * size, (rank + 1) * size)

    targets = {"model.norm.weight": Target(param=model.norm, shape=(hidden,))}
    vocab_rows = part(model.vocab_shard, config.vocab_size)
    if vocab_rows is not None:  # the last rank's shard ends at the vocabulary's end
        vocab_rows = (vocab_rows[0], min(vocab_rows[1], config.vocab_size))
    stored = model.vocab_shard if vocab_rows is None else max(0, vocab_rows[1] - vocab_rows[0])
    heads = ["model.embed_tokens.weight"]
    heads += [] if config.tie_word_embeddings else ["lm_head.weight"]
    for name in heads:
        param = model.embed_tokens if name.startswith("model.") else model.lm_head
        with torch.no_grad():
            param[stored:].zero_()  # padding rows: zero embeddings and zero logits
        targets[name] = Target(
            param=param.narrow(0, 0, stored), shape=(config.vocab_size, hidden), rows=vocab_rows
        )
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        fused = [("q_proj", 0, q_rows, q_all), ("k_proj", q_rows, kv_rows, kv_all),
                 ("v_proj", q_rows + kv_rows, kv_rows, kv_all)]  # fmt: skip
        for name, start, rows, total in fused:
            attn = f"{prefix}self_attn.{name}"
            targets[f"{attn}.weight"] = Target(
                param=layer.qkv_proj.narrow(0, start, rows), shape=(total, hidden),
                rows=part(rows, total),
            )  # fmt: skip
            if layer.qkv_bias is not None:
                targets[f"{attn}.bias"] = Target(
                    param=layer.qkv_bias.narrow(0, start, rows), shape=(total,),
                    rows=part(rows, total),
                )  # fmt: skip
        if layer.q_norm is not None:
            for name in ("q_norm", "k_norm"):
                targets[f"{prefix}self_attn.{name}.weight"] = Target(
                    param=getattr(layer, name), shape=(head_dim,)
                )
        mlp_rows = part(inter, inter_all)
        targets.update(
            {
                f"{prefix}input_layernorm.weight": Target(param=layer.input_norm, shape=(hidden,)),
                f"{prefix}post_attention_layernorm.weight": Target(
                    param=layer.post_attention_norm, shape=(hidden,)
                ),
                f"{prefix}self_attn.o_proj.weight": Target(
                    param=layer.o_proj, shape=(hidden, q_all), cols=part(q_rows, q_all)
                ),
                f"{prefix}mlp.gate_proj.weight": Target(
                    param=layer.gate_up_proj.narrow(0, 0, inter), shape=(inter_all, hidden),
                    rows=mlp_rows,
                ),
                f"{prefix}mlp.up_proj.weight": Target(
                    param=layer.gate_up_proj.narrow(0, inter, inter), shape=(inter_all, hidden),
                    rows=mlp_rows,
                ),
                f"{prefix}mlp.down_proj.weight": Target(
                    param=layer.down_proj, shape=(hidden, inter_all), cols=mlp_rows
                ),
            }
        )  # fmt: skip
    return targets
