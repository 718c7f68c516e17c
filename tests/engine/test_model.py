"""The model equals transformers' implementation, variant by variant, in fp32 on the CPU."""

from __future__ import annotations

import pytest
import torch

from longquest.engine.loader import load_model
from longquest.engine.model import Model
from longquest.engine.rope import apply_rope, rope_inv_freq
from longquest.kernels.ref import prefill_attention_ref
from tests.tiny_models import ARCHITECTURES, make_tiny_model

transformers = pytest.importorskip("transformers")


class DenseCausalAttention:
    """Stand-in for the paged cache: each packed sequence attends causally to itself."""

    def __init__(self, seq_lens: list[int]) -> None:
        self.seq_lens = seq_lens
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, *, layer, query, key, value):
        self.calls.append((layer, query, key, value))
        outputs, start = [], 0
        for length in self.seq_lens:
            rows = slice(start, start + length)
            out, _ = prefill_attention_ref(
                query=query[rows], key=key[rows], value=value[rows], query_start=0
            )
            outputs.append(out)
            start += length
        return torch.cat(outputs)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def models(request, tmp_path_factory):
    """(ours, config, transformers') for one tiny variant, both fp32 on the CPU."""
    directory = make_tiny_model(tmp_path_factory.mktemp(request.param), architecture=request.param)
    ours, config = load_model(directory, dtype=torch.float32, device="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return ours, config, theirs


def run(model: Model, token_lists: list[list[int]]) -> torch.Tensor:
    """Logits ``[total_tokens, vocab]`` of sequences packed into one forward."""
    ids = torch.tensor([t for tokens in token_lists for t in tokens], dtype=torch.int64)
    positions = torch.cat([torch.arange(len(tokens)) for tokens in token_lists])
    attention = DenseCausalAttention([len(tokens) for tokens in token_lists])
    with torch.inference_mode():
        hidden = model(input_ids=ids, positions=positions, attention=attention)
        return model.compute_logits(hidden)


def random_tokens(length: int, vocab_size: int, seed: int) -> list[int]:
    return torch.randint(
        0, vocab_size, (length,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def test_logits_match_transformers(models):
    ours, config, theirs = models
    prompt = random_tokens(50, config.vocab_size, seed=1)
    logits = run(ours, [prompt])
    with torch.inference_mode():
        expected = theirs(torch.tensor([prompt])).logits[0].float()
    assert logits.shape == (50, config.vocab_size) and logits.dtype == torch.float32
    error = (logits - expected).norm() / expected.norm()
    assert error < 1e-4, f"relative error {error:.2e}"


def test_packed_batch_equals_separate_runs(models):
    ours, config, _ = models
    first = random_tokens(23, config.vocab_size, seed=2)
    second = random_tokens(37, config.vocab_size, seed=3)
    packed = run(ours, [first, second])
    separate = torch.cat([run(ours, [first]), run(ours, [second])])
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-4)


def transformers_greedy(theirs, prompt: list[int], new_tokens: int) -> list[int]:
    generation = transformers.GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with torch.inference_mode():
        return theirs.generate(torch.tensor([prompt]), generation_config=generation)[0].tolist()


def test_greedy_choices_match_transformers_generate(models):
    """Every greedy choice along transformers' 32-token generation is ours too.

    By causality the logits at position ``i`` of one forward over the whole
    generated sequence are those a recompute-from-scratch step sees, so this
    one forward checks all 32 steps of our greedy generation.
    """
    ours, config, theirs = models
    prompt = random_tokens(10, config.vocab_size, seed=4)
    expected = transformers_greedy(theirs, prompt, 32)
    choices = run(ours, [expected[:-1]])[len(prompt) - 1 :].argmax(-1).tolist()
    assert choices == expected[len(prompt) :]


@pytest.mark.parametrize("models", ["qwen3"], indirect=True)
def test_greedy_generation_by_recomputation_matches_transformers(models):
    ours, config, theirs = models
    prompt = random_tokens(10, config.vocab_size, seed=4)
    tokens = list(prompt)
    for _ in range(32):  # no cache: recompute the whole sequence each step
        tokens.append(int(run(ours, [tokens])[-1].argmax()))
    assert tokens == transformers_greedy(theirs, prompt, 32)


def test_attention_sees_every_layer_in_order_with_documented_shapes(models):
    ours, config, _ = models
    prompt = random_tokens(7, config.vocab_size, seed=5)
    attention = DenseCausalAttention([7])
    with torch.inference_mode():
        hidden = ours(
            input_ids=torch.tensor(prompt), positions=torch.arange(7), attention=attention
        )
    assert hidden.shape == (7, config.hidden_size)
    assert [call[0] for call in attention.calls] == list(range(config.num_layers))
    for _, query, key, value in attention.calls:
        assert query.shape == (7, config.num_qo_heads, config.head_dim)
        assert key.shape == value.shape == (7, config.num_kv_heads, config.head_dim)
        assert query.is_contiguous() and key.is_contiguous() and value.stride(-1) == 1


def test_forward_rejects_bad_inputs(models):
    ours, _, _ = models
    attention = DenseCausalAttention([4])
    with pytest.raises(ValueError, match="positions must match input_ids"):
        ours(
            input_ids=torch.zeros(4, dtype=torch.int64),
            positions=torch.arange(3),
            attention=attention,
        )
    with pytest.raises(ValueError, match="input_ids must have 1 dimensions"):
        ours(
            input_ids=torch.zeros(1, 4, dtype=torch.int64),
            positions=torch.arange(4),
            attention=attention,
        )
    with pytest.raises(ValueError, match="positions must have dtype"):
        ours(
            input_ids=torch.zeros(4, dtype=torch.int64),
            positions=torch.zeros(4),
            attention=attention,
        )


@pytest.mark.parametrize("variant", ["llama2", "llama3.1", "llama3.2-tied"])
def test_inv_freq_matches_transformers(variant, tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    directory = make_tiny_model(tmp_path, architecture=variant, max_position_embeddings=4096)
    hf_config = transformers.AutoConfig.from_pretrained(directory)
    _, config = load_model(directory, dtype=torch.float32, device="cpu")
    ours = rope_inv_freq(
        head_dim=config.head_dim, rope_theta=config.rope_theta, rope_scaling=config.rope_scaling
    )
    if config.rope_scaling is None:
        default = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2) / config.head_dim)
        torch.testing.assert_close(ours, default.float())
    else:
        theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, torch.device("cpu"))
        torch.testing.assert_close(ours, theirs.float())
        # The variant must exercise all three bands, or the comparison proves little.
        plain = rope_inv_freq(
            head_dim=config.head_dim, rope_theta=config.rope_theta, rope_scaling=None
        )
        factor = dict(config.rope_scaling)["factor"]
        assert (ours == plain).any() and torch.isclose(ours, plain / factor).any()
        assert ((ours < plain) & ~torch.isclose(ours, plain / factor)).any()


def test_rope_scores_depend_only_on_relative_position():
    generator = torch.Generator().manual_seed(6)
    head_dim = 64
    inv_freq = rope_inv_freq(head_dim=head_dim, rope_theta=1e6, rope_scaling=None)
    query = torch.randn(1, 2, head_dim, generator=generator)
    key = torch.randn(1, 1, head_dim, generator=generator)
    scores = []
    for shift in (0, 1000, 900_000):  # far past any table a fixed context would build
        q, _ = apply_rope(
            query=query, key=key, positions=torch.tensor([shift + 5]), inv_freq=inv_freq
        )
        _, k = apply_rope(query=query, key=key, positions=torch.tensor([shift]), inv_freq=inv_freq)
        scores.append((q[0] * k[0]).sum(-1))
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-4, atol=1e-4)
    # fp32 angles at ~1e6 carry ~0.06 rad of rounding (as in transformers).
    torch.testing.assert_close(scores[2], scores[0], rtol=0.1, atol=0.5)
    rotated, _ = apply_rope(query=query, key=key, positions=torch.tensor([123]), inv_freq=inv_freq)
    torch.testing.assert_close(rotated.norm(dim=-1), query.norm(dim=-1))


class SplitWithoutPeers:
    """``MlpSplit`` for one rank of a pretend group: ``all_reduce`` leaves the partial."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


@pytest.mark.parametrize("blocks", [2, 4])
def test_split_mlp_keeps_the_whole_forward_and_its_parts_sum_to_it(tmp_path, blocks):
    directory = make_tiny_model(tmp_path, architecture="llama3.1")
    model, config = load_model(directory, dtype=torch.float32, device="cpu")
    tokens = [random_tokens(9, config.vocab_size, seed=1), random_tokens(4, config.vocab_size, 2)]
    want = run(model, tokens)
    layer = model.layers[1]
    h = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(0))
    whole = layer._mlp(h, None)
    model.split_mlp(blocks=blocks)
    assert layer.mlp_blocks == blocks
    torch.testing.assert_close(run(model, tokens), want, rtol=1e-5, atol=1e-5)
    parts = [layer._mlp(h, SplitWithoutPeers(rank, blocks)) for rank in range(blocks)]
    torch.testing.assert_close(sum(parts), whole, rtol=1e-5, atol=1e-5)
    model.split_mlp(blocks=1)  # and back
    torch.testing.assert_close(run(model, tokens), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="split_mlp\\(blocks=3\\)"):
        layer._mlp(h, SplitWithoutPeers(0, 3))
    with pytest.raises(ValueError, match="divide"):
        model.split_mlp(blocks=7)


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
         "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.8, "mscale_all_dim": 0.4},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
         "attention_factor": 1.3, "truncate": False},
    ],
    ids=["linear", "yarn", "yarn-mscale", "yarn-attention-factor"],
)  # fmt: skip
def test_scaled_rope_matches_transformers(scaling, tmp_path):
    """Linear and YaRN scaling: the frequencies, YaRN's cos/sin factor and the logits."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from longquest.engine.rope import rope_attention_factor

    directory = make_tiny_model(tmp_path, architecture="qwen2",
                                rope_parameters={**scaling, "rope_theta": 1e4})  # fmt: skip
    hf_config = transformers.AutoConfig.from_pretrained(directory)
    ours, config = load_model(directory, dtype=torch.float32, device="cpu")
    assert dict(config.rope_scaling)["rope_type"] == scaling["rope_type"]
    theirs_freq, theirs_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config, None)
    torch.testing.assert_close(ours.inv_freq, theirs_freq.float(), rtol=1e-6, atol=0)
    assert rope_attention_factor(config.rope_scaling) == pytest.approx(theirs_factor, rel=1e-9)
    plain = rope_inv_freq(head_dim=config.head_dim, rope_theta=1e4, rope_scaling=None)
    assert not torch.allclose(ours.inv_freq, plain)  # the scaling did something
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    prompt = random_tokens(300, config.vocab_size, seed=9)  # past the original context
    logits = run(ours, [prompt])
    with torch.inference_mode():
        expected = theirs(torch.tensor([prompt])).logits[0].float()
    error = (logits - expected).norm() / expected.norm()
    assert error < 1e-4, f"relative error {error:.2e}"


def test_scaled_rope_needs_its_keys():
    with pytest.raises(ValueError, match="yarn rope scaling needs original_max_position"):
        rope_inv_freq(head_dim=8, rope_theta=1e4, rope_scaling={"rope_type": "yarn", "factor": 2})
    with pytest.raises(ValueError, match="linear rope scaling needs factor"):
        rope_inv_freq(head_dim=8, rope_theta=1e4, rope_scaling={"rope_type": "linear"})
    with pytest.raises(ValueError, match="factor must be positive"):
        rope_inv_freq(head_dim=8, rope_theta=1e4, rope_scaling={"type": "linear", "factor": 0})
