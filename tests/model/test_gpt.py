"""EndPromptGPTModel, build_model, SDPA core attention and config validation (CPU, tiny)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from model_fixtures import endprompt_positions_bs, tiny_model_config

from megatron_endprompt.config import ModelConfig, ParallelConfig, RopeScalingConfig
from megatron_endprompt.model.attention import SDPACoreAttention
from megatron_endprompt.model.gpt import build_model, transformer_config
from megatron_endprompt.model.specs import get_layer_spec
from megatron_endprompt.training.loss import masked_loss_sum

pytestmark = pytest.mark.usefixtures("single_process_parallel_state")


@pytest.fixture(scope="module")
def model():
    # std 0.2 (not 0.02) so attention is far from uniform and positions visibly matter.
    return build_model(tiny_model_config(init_method_std=0.2)).eval()


def _ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (b, s), generator=torch.Generator().manual_seed(seed))


def test_shapes_logits_loss_and_hidden_states(model):
    ids = _ids(3, 16)
    with torch.no_grad():
        logits = model(ids, torch.arange(16).expand(3, 16))
        loss = model(ids, labels=torch.roll(ids, -1, 1))
    assert logits.shape == (3, 16, 128) and logits.dtype == torch.float32
    assert loss.shape == (3, 16) and loss.dtype == torch.float32
    # Per-token loss is the cross entropy of the logits (padded vocabulary included).
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 128), torch.roll(ids, -1, 1).reshape(-1), reduction="none"
    )
    torch.testing.assert_close(loss.reshape(-1), expected, atol=1e-5, rtol=1e-5)


def test_intermediate_stage_returns_hidden_states():
    stage = build_model(tiny_model_config(), post_process=False).eval()
    with torch.no_grad():
        hidden = stage(_ids(2, 8), torch.arange(8).expand(2, 8))
    assert hidden.shape == (8, 2, 64)  # [s, b, h], megatron's inter-stage layout
    assert not hasattr(stage, "output_layer")


def test_position_ids_none_is_arange(model):
    ids = _ids(2, 16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids, torch.arange(16).expand(2, 16)))


def test_per_row_layout_equals_batch_shared_rows(model):
    """Row i of a mixed batch equals the same row run alone (batch-shared rotary tensor)."""
    ids = _ids(2, 16, seed=2)
    pos = torch.cat([torch.arange(16)[None], endprompt_positions_bs(1, 10, 6, 65536)])
    with torch.no_grad():
        mixed = model(ids, pos)  # rotary [s, b, 1, d]
        alone = [model(ids[i : i + 1], pos[i : i + 1]) for i in range(2)]  # [s, 1, 1, d]
        shared = model(ids[1:].expand(2, 16), pos[1:].expand(2, 16))
    for i in range(2):
        torch.testing.assert_close(mixed[i], alone[i][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[0], alone[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[1], alone[1][0], atol=1e-5, rtol=1e-5)


def test_endprompt_positions_change_the_output_only_after_the_jump(model):
    ids = _ids(1, 16, seed=3)
    with torch.no_grad():
        contiguous = model(ids)
        endprompt = model(ids, endprompt_positions_bs(1, 10, 6, 65536))
    # Causal + relative positions: the first 10 tokens see identical relative distances.
    torch.testing.assert_close(endprompt[:, :10], contiguous[:, :10], atol=1e-5, rtol=1e-5)
    assert (endprompt[:, 10:] - contiguous[:, 10:]).abs().max() > 1e-2


def test_backward_reaches_every_parameter():
    m = build_model(tiny_model_config(hidden_dropout=0.1, attention_dropout=0.1)).train()
    ids = _ids(2, 16, seed=4)
    loss = m(ids, endprompt_positions_bs(2, 12, 4, 65536), labels=ids)
    loss.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_build_is_deterministic_and_seeded():
    a = build_model(tiny_model_config(), seed=7).state_dict()
    b = build_model(tiny_model_config(), seed=7).state_dict()
    c = build_model(tiny_model_config(), seed=8).state_dict()
    key = "decoder.layers.0.self_attention.linear_qkv.weight"
    torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert not torch.equal(a[key], c[key])
    assert abs(a[key].std().item() - 0.02) < 0.005  # init_method_std


def test_yarn_temperature_is_folded_into_softmax_scale():
    scaling = RopeScalingConfig("yarn", factor=16.0, original_max_position_embeddings=4096)
    config = transformer_config(tiny_model_config(rope_scaling=scaling))
    m = 0.1 * math.log(16.0) + 1.0
    assert config.softmax_scale == pytest.approx(m**2 / math.sqrt(16))
    assert transformer_config(tiny_model_config()).softmax_scale == pytest.approx(0.25)


def test_masked_loss_sum_hand_worked():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 0.1, 0.0], [1.0, 1.0, 0.5]])
    num, den = masked_loss_sum(loss, mask)
    assert num.item() == pytest.approx(1 + 0.2 + 4 + 5 + 3)
    assert den.item() == pytest.approx(3.6)
    with pytest.raises(ValueError, match="loss_mask shape"):
        masked_loss_sum(loss, mask[:, :2])


def _reference_attention(q, k, v, scale, mask_bool):
    """Naive attention over [s, b, h, d] with GQA by repeat_interleave; mask True = masked out."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * scale
    scores = scores.masked_fill(mask_bool, float("-inf"))
    return torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v).flatten(2)


def test_sdpa_core_attention_matches_reference_with_gqa_mask_and_scale():
    config = transformer_config(tiny_model_config(num_query_groups=2))
    attn = SDPACoreAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=0.7).eval()
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(6, 2, n, 16, generator=g) for n in (4, 2, 2))
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    out = attn(q, k, v, None)
    assert out.shape == (6, 2, 64)
    torch.testing.assert_close(out, _reference_attention(q, k, v, 0.7, causal))
    # Explicit megatron mask (True = masked out) is combined with the causal mask.
    extra = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    extra[1, :, :, 0] = True
    extra[1, :, 0, 0] = False  # keep one visible key for the first query
    out = attn(q, k, v, extra)
    torch.testing.assert_close(out, _reference_attention(q, k, v, 0.7, causal | extra))
    full = attn(q, k, v, None, attn_mask_type=AttnMaskType.no_mask)
    torch.testing.assert_close(full, _reference_attention(q, k, v, 0.7, torch.zeros_like(causal)))


def test_sdpa_core_attention_dropout_only_in_training():
    config = transformer_config(tiny_model_config(num_query_groups=4, attention_dropout=0.5))
    attn = SDPACoreAttention(config, 1, AttnMaskType.causal, "self")
    q = torch.randn(6, 1, 4, 16)
    attn.eval()
    torch.testing.assert_close(attn(q, q, q, None), attn(q, q, q, None), atol=0, rtol=0)
    attn.train()
    torch.manual_seed(0)
    assert not torch.equal(attn(q, q, q, None), attn(q, q, q, None))


def test_local_spec_uses_sdpa_attention():
    spec = get_layer_spec("local")
    assert spec.submodules.self_attention.submodules.core_attention is SDPACoreAttention
    with pytest.raises(ValueError, match="--transformer-impl='bogus'"):
        get_layer_spec("bogus")


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is not None, reason="TE is installed"
)
def test_te_spec_without_transformer_engine_says_how_to_install():
    with pytest.raises(ImportError, match=r"pip install megatron_endprompt\[te\]"):
        get_layer_spec("te")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_attention_heads=4, num_query_groups=3), "--num-attention-heads=4"),
        (dict(hidden_size=66), "--hidden-size=66"),
        (dict(normalization="BatchNorm"), "--normalization='BatchNorm'"),
        (dict(transformer_impl="cuda"), "--transformer-impl='cuda'"),
        (dict(params_dtype="fp8"), "--params-dtype='fp8'"),
        (dict(seq_length=4096, max_position_embeddings=2048), "--seq-length=4096"),
        (dict(rotary_percent=1.5), "--rotary-percent=1.5"),
        (dict(num_layers=0), "--num-layers=0"),
        (dict(attention_dropout=1.0), "--attention-dropout=1.0"),
    ],
)
def test_invalid_model_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_invalid_parallel_layouts():
    twelve = ModelConfig(hidden_size=768, num_attention_heads=12, num_query_groups=None)
    with pytest.raises(ValueError, match="--num-attention-heads=12: is not divisible by "
                       "--tensor-model-parallel-size=8"):  # fmt: skip
        twelve.validate_against(ParallelConfig(tensor_model_parallel_size=8))
    with pytest.raises(ValueError, match="--num-query-groups=2: is not divisible"):
        ModelConfig().validate_against(ParallelConfig(tensor_model_parallel_size=4))
    with pytest.raises(ValueError, match="--num-layers=4: is not divisible by --pipeline"):
        ModelConfig().validate_against(ParallelConfig(pipeline_model_parallel_size=3))
    with pytest.raises(ValueError, match="--sequence-parallel=True"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ValueError, match="--virtual-pipeline-model-parallel-size=2"):
        ParallelConfig(virtual_pipeline_model_parallel_size=2)
    with pytest.raises(ValueError, match="--tensor-model-parallel-size=0"):
        ParallelConfig(tensor_model_parallel_size=0)
    with pytest.raises(ValueError, match="--sequence-parallel needs --transformer-impl te"):
        transformer_config(
            tiny_model_config(),
            ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
        )
    with pytest.raises(ValueError, match="megatron parallel state has"):
        build_model(tiny_model_config(), ParallelConfig(tensor_model_parallel_size=2))


def test_padded_vocab_size_like_megatron():
    assert ModelConfig(vocab_size=32000).padded_vocab_size(1) == 32000
    assert ModelConfig(vocab_size=32001).padded_vocab_size(1) == 32128
    assert ModelConfig(vocab_size=32001).padded_vocab_size(8) == 32768
    assert ModelConfig(vocab_size=128256).padded_vocab_size(8) == 129024


def _param_count(c: ModelConfig) -> int:
    """Llama parameter count from the shape (untied embeddings, no biases)."""
    h, kv = c.hidden_size, c.num_query_groups * c.kv_channels
    attn = h * (c.num_attention_heads * c.kv_channels) * 2 + h * kv * 2
    layer = attn + 3 * h * c.ffn_hidden_size + 2 * h
    return 2 * c.vocab_size * h + c.num_layers * layer + h


@pytest.mark.parametrize(
    ("name", "published"),
    [  # parameter counts of the Hugging Face checkpoints
        ("llama2-7b", 6_738_415_616),
        ("llama3-8b", 8_030_261_248),
        ("llama3-70b", 70_553_706_496),
        ("mistral-7b", 7_241_732_096),
    ],
)
def test_recipes_have_the_published_sizes(name, published):
    from megatron_endprompt.recipes import get_recipe

    assert _param_count(get_recipe(name)) == published


def test_recipes_are_fresh_copies_and_unknown_names_list_choices():
    from megatron_endprompt.recipes import get_recipe

    a = get_recipe("llama3-8b")
    a.rope_scaling.factor = 8.0
    assert get_recipe("llama3-8b").rope_scaling.factor == 1.0
    assert get_recipe("llama3-8b").rotary_base == 500000.0
    assert get_recipe("tiny").num_query_groups == 2
    with pytest.raises(ValueError, match="tiny, llama2-7b, llama3-8b, llama3-70b, mistral-7b"):
        get_recipe("gpt5")


def test_tiny_recipe_builds_and_runs():
    from megatron_endprompt.recipes import get_recipe

    model = build_model(get_recipe("tiny")).eval()
    with torch.no_grad():
        assert model(_ids(1, 8)).shape == (1, 8, 512)
