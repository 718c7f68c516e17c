"""A compact Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3).

Tokens of several sequences arrive packed flat, ``[num_tokens]``; the model
knows nothing about sequences, pages or caches. Attention is injected: every
layer hands its post-RoPE query, key and value to a ``LayerAttention``, which
owns the cache and decides what each token attends to. The same forward
serves chunked prefill (thousands of tokens of one sequence) and batched
decode (one token per sequence). Shapes depend only on ``num_tokens``, so a
decode step can be captured in a CUDA graph.

Weights are created uninitialised; ``longquest.engine.loader.load_model``
fills them from a checkpoint. q/k/v and gate/up projections are fused into
one matrix each (one matmul instead of three / two).

Tensor parallelism (Megatron's layout) is given from outside as a
``TensorParallel`` object: built with one, the model holds only its tensor rank's
share of the weights — whole KV heads with their query heads (q/k/v by rows, o by
columns), a slice of the MLP's intermediate dimension (gate/up by rows, down by
columns), a slice of the vocabulary (embedding and LM head by rows) — and calls its
``all_reduce`` (row-parallel sums) and ``all_gather`` (logits) where the math needs
them. Without one (T = 1) the model is whole and makes no collective call.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longquest.engine.config import ModelConfig
from longquest.engine.rope import rope_attention_factor, rope_cos_sin, rope_inv_freq
from longquest.kernels import INDEX_DTYPES, add_rms_norm, check_tensor, rotate_query_key, silu_mul
from longquest.kernels import rms_norm as fused_rms_norm


class LayerAttention(Protocol):
    """What a decoder layer calls to attend; the engine supplies it per step.

    query: ``[num_tokens, num_qo_heads, head_dim]`` and key: ``[num_tokens,
    num_kv_heads, head_dim]``, contiguous, after q/k norm and RoPE; value: of key's
    shape, a view of the fused projection (last dimension contiguous); all in the model
    dtype. Returns ``[num_tokens, num_qo_heads,
    head_dim]`` in the model dtype.
    """

    def __call__(self, *, layer: int, query: Tensor, key: Tensor, value: Tensor) -> Tensor: ...


class MlpSplit(Protocol):
    """How a decode step splits every MLP over the sequence ranks.

    Rank ``rank`` of ``world_size`` multiplies by its slice of the gate/up rows and
    of the down-projection columns it holds, and ``all_reduce`` sums the partial outputs
    (``[num_tokens, hidden_size]``, in place, returned) over every rank that holds a
    part: the sequence ranks of replicated weights (T = 1), or all T x S ranks when
    the MLP is tensor-parallel too (the sum then replaces the tensor group's). The
    ranks of one split must hold the same weights, laid out by ``Model.split_mlp``.
    """

    rank: int
    world_size: int

    def all_reduce(self, tensor: Tensor) -> Tensor: ...


class TensorParallel(Protocol):
    """The tensor-parallel group a model's weights are split over (T ranks).

    rank, world_size: this tensor rank and T. Every rank of the group runs the same
    tokens; ``all_reduce`` sums ``tensor`` over the group in place (returned, identical
    on every rank) and ``all_gather`` returns ``[world_size, *tensor.shape]``, rank order.
    """

    rank: int
    world_size: int

    def all_reduce(self, tensor: Tensor) -> Tensor: ...

    def all_gather(self, tensor: Tensor) -> Tensor: ...


def check_tensor_parallel(config: ModelConfig, *, tensor_parallel_size: int) -> None:
    """Raise ValueError unless ``tensor_parallel_size`` divides the model's KV heads, query
    heads and intermediate size (each tensor rank takes whole KV heads with their query
    heads, and an equal slice of the MLP). Vocabularies of any size are split (the last
    shard padded)."""
    size = tensor_parallel_size
    if size == 1:
        return
    sizes = {
        "num_key_value_heads": config.num_kv_heads,
        "num_attention_heads": config.num_qo_heads,
        "intermediate_size": config.intermediate_size,
    }
    wrong = [f"{name}={value}" for name, value in sizes.items() if value % size]
    if wrong:
        fits = [d for d in range(1, config.num_kv_heads + 1)
                if all(value % d == 0 for value in sizes.values())]  # fmt: skip
        raise ValueError(
            f"tensor_parallel_size={size} does not divide the model's {', '.join(wrong)}: "
            "every tensor rank takes whole KV heads (with their query heads) and an equal "
            f"share of the MLP; use a tensor_parallel_size in {fits} (T above the KV heads, "
            "Helix-style, is not supported) and more sequence ranks instead"
        )


def vocab_shard_size(vocab_size: int, world_size: int) -> int:
    """Rows of the embedding and LM head a tensor rank holds: ``ceil(vocab / T)`` (the
    last rank's shard is zero-padded past the vocabulary)."""
    return -(-vocab_size // world_size)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dimension, as Hugging Face computes it.

    Normalises in fp32, casts back to ``x``'s dtype, then scales by ``weight``
    (``[x.shape[-1]]``, model dtype).
    """
    return fused_rms_norm(x=x, weight=weight, eps=eps)


def _weight(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class DecoderLayer(nn.Module):
    """Pre-norm attention block and SwiGLU MLP block, each with a residual."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: torch.dtype,
        device: torch.device,
        tensor: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        shards = 1 if tensor is None else tensor.world_size
        # This tensor rank's heads and MLP width (all of them at T = 1).
        self.num_qo_heads = config.num_qo_heads // shards
        self.num_kv_heads = config.num_kv_heads // shards
        intermediate = config.intermediate_size // shards
        self.tensor = tensor
        self.head_dim, self.eps = head_dim, config.rms_norm_eps
        q_size, kv_size = self.num_qo_heads * head_dim, self.num_kv_heads * head_dim
        self.split_sizes = [q_size, kv_size, kv_size]

        def weight(*shape: int) -> nn.Parameter:
            return _weight(*shape, dtype=dtype, device=device)

        self.input_norm = weight(hidden)
        self.qkv_proj = weight(q_size + 2 * kv_size, hidden)  # rows: q | k | v
        self.qkv_bias = weight(q_size + 2 * kv_size) if config.qkv_bias else None
        self.q_norm = weight(head_dim) if config.qk_norm else None
        self.k_norm = weight(head_dim) if config.qk_norm else None
        self.o_proj = weight(hidden, q_size)
        self.post_attention_norm = weight(hidden)
        self.gate_up_proj = weight(2 * intermediate, hidden)  # rows: gate | up
        self.down_proj = weight(hidden, intermediate)
        # gate_up_proj holds mlp_blocks blocks [gate_b | up_b] (see Model.split_mlp).
        self.mlp_blocks = 1

    def forward(
        self,
        x: Tensor,
        residual: Tensor | None,
        *,
        layer: int,
        cos: Tensor,
        sin: Tensor,
        attention: LayerAttention,
        mlp_split: MlpSplit | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One layer on ``x + residual`` (``residual`` None: x is the embedding).

        Returns ``(mlp_out, residual)``: the stream after this layer is their sum, added
        by the next layer's input norm (one fused kernel instead of an add and a norm).
        ``mlp_split``: split the MLP over ranks (see ``MlpSplit``); None runs it whole.
        """
        num_tokens = x.shape[0]
        if residual is None:
            residual, h = x, rms_norm(x, self.input_norm, self.eps)  # [num_tokens, hidden]
        else:
            residual, h = add_rms_norm(x=x, residual=residual, weight=self.input_norm, eps=self.eps)
        qkv = F.linear(h, self.qkv_proj, self.qkv_bias)  # [num_tokens, (Hq + 2 Hkv) D]
        q, k, v = qkv.split(self.split_sizes, dim=-1)
        q = q.view(num_tokens, self.num_qo_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # a view: the cache copies it
        if self.q_norm is not None:
            # Qwen3 normalises every head's query and key before RoPE.
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
        q, k = rotate_query_key(query=q, key=k, cos=cos, sin=sin)
        o = attention(layer=layer, query=q, key=k, value=v)  # [num_tokens, Hq, D]
        o = F.linear(o.reshape(num_tokens, -1), self.o_proj)
        if self.tensor is not None:
            o = self.tensor.all_reduce(o)  # row-parallel: the heads' parts summed
        residual, h = add_rms_norm(
            x=o, residual=residual, weight=self.post_attention_norm, eps=self.eps
        )
        return self._mlp(h, mlp_split), residual

    def _mlp(self, h: Tensor, split: MlpSplit | None) -> Tensor:
        blocks = self.mlp_blocks
        if split is None or split.world_size == 1:
            gate_up = F.linear(h, self.gate_up_proj)  # [num_tokens, 2 I]
            # Each block is [gate_b | up_b]: silu_mul per block, in the gate's order.
            act = silu_mul(gate_up=gate_up.view(-1, gate_up.shape[1] // blocks))
            out = F.linear(act.view(h.shape[0], -1), self.down_proj)
            # Row-parallel: the intermediate slices' parts summed over the tensor ranks.
            return out if self.tensor is None else self.tensor.all_reduce(out)
        if blocks != split.world_size:
            raise ValueError(
                f"the MLP is laid out in {blocks} blocks but split over {split.world_size} "
                f"ranks; call Model.split_mlp(blocks={split.world_size}) first"
            )
        rows, cols = self.gate_up_proj.shape[0] // blocks, self.down_proj.shape[1] // blocks
        start = split.rank
        # Slices of the replicated weights: only this rank's share is read.
        act = silu_mul(gate_up=F.linear(h, self.gate_up_proj[start * rows : (start + 1) * rows]))
        partial = F.linear(act, self.down_proj[:, start * cols : (start + 1) * cols])
        return split.all_reduce(partial)  # [num_tokens, hidden]


class Model(nn.Module):
    """Embedding, decoder layers, final norm and LM head of a Llama-family model.

    Build it with the dtype and device it will run on (its parameters are
    uninitialised until loaded). Do not ``.to(dtype)`` it afterwards: the
    rotary ``inv_freq`` buffer must stay fp32.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        tensor: TensorParallel | None = None,
    ) -> None:
        """tensor: the tensor-parallel group the weights are split over (its world size
        must divide the heads and the intermediate size, see ``check_tensor_parallel``);
        None holds the whole model."""
        super().__init__()
        device = torch.device(device)
        self.config = config
        self.tensor = tensor
        shards = 1 if tensor is None else tensor.world_size
        check_tensor_parallel(config, tensor_parallel_size=shards)
        # This rank's heads (the KV cache holds these) and vocabulary rows.
        self.num_qo_heads = config.num_qo_heads // shards
        self.num_kv_heads = config.num_kv_heads // shards
        self.vocab_shard = vocab_shard_size(config.vocab_size, shards)
        self.vocab_start = 0 if tensor is None else tensor.rank * self.vocab_shard
        self.embed_tokens = _weight(
            self.vocab_shard, config.hidden_size, dtype=dtype, device=device
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, dtype=dtype, device=device, tensor=tensor)
            for _ in range(config.num_layers)
        )
        self.norm = _weight(config.hidden_size, dtype=dtype, device=device)
        if config.tie_word_embeddings:
            self.lm_head = self.embed_tokens  # one tensor, registered under both names
        else:
            self.lm_head = _weight(self.vocab_shard, config.hidden_size, dtype=dtype, device=device)
        inv_freq = rope_inv_freq(
            head_dim=config.head_dim,
            rope_theta=config.rope_theta,
            rope_scaling=config.rope_scaling,
        )
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.rope_attention = rope_attention_factor(config.rope_scaling)  # YaRN's cos/sin scale

    def split_mlp(self, *, blocks: int) -> None:
        """Lay out every layer's gate/up rows as ``blocks`` blocks ``[gate_b | up_b]``.

        Then rank ``b`` of a ``blocks``-rank ``MlpSplit`` reads one contiguous slice of
        ``gate_up_proj`` (and of ``down_proj``'s columns). The unsplit forward gives the
        same result in either layout. Call it after loading the weights; a second call
        with the same ``blocks`` does nothing. A tensor-parallel model splits its own
        slice of the intermediate dimension.
        """
        size = self.layers[0].down_proj.shape[1]  # this tensor rank's intermediate size
        if blocks < 1 or size % blocks:
            raise ValueError(
                f"cannot split the MLP (intermediate_size {size}) into {blocks} blocks: "
                "blocks must be >= 1 and divide it"
            )
        with torch.no_grad():
            for layer in self.layers:
                if layer.mlp_blocks == blocks:
                    continue
                weight = layer.gate_up_proj  # [2 I, hidden]
                hidden = weight.shape[1]
                # Back to [gate | up], then into blocks.
                plain = weight.view(layer.mlp_blocks, 2, -1, hidden).transpose(0, 1)
                plain = plain.reshape(2, blocks, size // blocks, hidden)
                weight.copy_(plain.transpose(0, 1).reshape(2 * size, hidden))
                layer.mlp_blocks = blocks

    def forward(
        self,
        *,
        input_ids: Tensor,
        positions: Tensor,
        attention: LayerAttention,
        mlp_split: MlpSplit | None = None,
    ) -> Tensor:
        """Hidden states of packed tokens after the final norm.

        input_ids: ``[num_tokens]`` int64 (or int32) token ids.
        positions: ``[num_tokens]`` int64 (or int32) position of each token in its
            own sequence (restarting at 0 for every packed sequence).
        attention: called once per layer (see ``LayerAttention``).
        mlp_split: split every MLP over ranks (decode under sequence parallelism, where
            every rank runs the same tokens); None runs it whole.
        Returns ``[num_tokens, hidden_size]`` in the model dtype.
        """
        device = self.embed_tokens.device
        check_tensor("input_ids", input_ids, ndim=1, dtypes=INDEX_DTYPES, device=device)
        check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES, device=device)
        if positions.shape != input_ids.shape:
            raise ValueError(
                f"positions must match input_ids' shape {tuple(input_ids.shape)}, "
                f"got {tuple(positions.shape)}"
            )
        cos, sin = rope_cos_sin(
            positions=positions, inv_freq=self.inv_freq, attention_factor=self.rope_attention
        )  # [T, 1, D/2] each
        cos, sin = cos[:, 0], sin[:, 0]  # [T, D/2]
        x = self._embed(input_ids)  # [num_tokens, hidden]
        residual = None
        for index, layer in enumerate(self.layers):
            x, residual = layer(
                x, residual, layer=index, cos=cos, sin=sin, attention=attention, mlp_split=mlp_split
            )
        _, h = add_rms_norm(x=x, residual=residual, weight=self.norm, eps=self.config.rms_norm_eps)
        return h

    def _embed(self, input_ids: Tensor) -> Tensor:
        """``[num_tokens, hidden_size]`` embeddings; vocabulary-parallel under tensor
        parallelism: each rank looks up the ids in its rows, zeros elsewhere, summed."""
        if self.tensor is None:
            return F.embedding(input_ids, self.embed_tokens)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_shard)  # [num_tokens]
        x = F.embedding(local.masked_fill(outside, 0), self.embed_tokens)
        # Exactly one rank holds each id: the sum adds zeros only, so it is exact.
        return self.tensor.all_reduce(x.masked_fill(outside[:, None], 0))

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits: hidden ``[n, hidden_size]`` -> ``[n, vocab_size]`` fp32.

        Under tensor parallelism every rank computes its vocabulary slice and the
        slices are gathered (one collective of the tensor group), so every rank returns
        the whole logits.
        """
        logits = F.linear(hidden, self.lm_head)  # [n, vocab_shard]
        if self.tensor is not None:
            parts = self.tensor.all_gather(logits)  # [T, n, vocab_shard]
            logits = parts.transpose(0, 1).reshape(hidden.shape[0], -1)
            logits = logits[:, : self.config.vocab_size].contiguous()
        return logits.float()

    def greedy_tokens(self, hidden: Tensor) -> Tensor:
        """The argmax of ``compute_logits(hidden)``: ``[n]`` int64 (the first of equal
        maxima), on the device with no host sync.

        Under tensor parallelism each rank takes the maximum of its vocabulary slice and
        only those ``[n, 2]`` (value, token) pairs are gathered, not the logits.
        """
        if self.tensor is None:
            return self.compute_logits(hidden).argmax(dim=-1)
        logits = F.linear(hidden, self.lm_head).float()  # [n, vocab_shard]
        real = self.config.vocab_size - self.vocab_start  # the last shard's padding: never
        if real < self.vocab_shard:
            logits[:, real:] = -torch.inf
        value, index = logits.max(dim=-1)  # [n] each, the first maximum of the slice
        # The token id travels as the bits of an fp32 word beside its value (a copy, exact).
        token = (index + self.vocab_start).to(torch.int32).view(torch.float32)
        best = self.tensor.all_gather(torch.stack((value, token), dim=-1))  # [T, n, 2]
        # argmax returns the first maximum: the lowest tensor rank, so the lowest token.
        shard = best[..., 0].argmax(dim=0, keepdim=True)  # [1, n]
        return best[..., 1].gather(0, shard)[0].view(torch.int32).long()
