"""GPTQ: on inputs with correlated channels its output error ||X W^T - X Q^T|| is below
round-to-nearest's for every int4 layout, with and without act-order; with uncorrelated inputs
there is nothing to compensate and it is round-to-nearest exactly; its codes are valid codes of our
format whatever the shape; and a whole model quantizes layer by layer."""

import pytest
import torch

from kvlab.quant.calibration import InputStats, calibration_samples
from kvlab.quant.formats import QuantSpec
from kvlab.quant.gptq import gptq_quantize_model, gptq_quantize_weight
from kvlab.quant.modules import QuantizedEmbedding, QuantizedLinear
from kvlab.quant.rtn import quantize_weight

# Every int4 layout, each once with K a multiple of the group and once not (576 = 4.5 groups of 128).
CASES = [
    ("int4-g32", 100),
    ("int4-g128", 576),
    ("int4-g32-asym", 576),
    ("int4-g128-asym", 100),
    ("int4", 100),
    ("int8", 576),
]


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Activations with mixed channels and unequal magnitudes, as real layers' inputs have."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    magnitudes = torch.linspace(0.2, 3.0, features)
    return torch.randn(tokens, features, generator=generator) @ mixing * magnitudes


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    stats = InputStats.empty(x.shape[1])
    stats.add(x)
    return stats.hessian


def output_error(x: torch.Tensor, weight: torch.Tensor, dequantized: torch.Tensor) -> float:
    return torch.linalg.norm(x @ (weight - dequantized).T).item()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("spec", "features"), CASES)
def test_gptq_beats_round_to_nearest_on_correlated_inputs(spec, features, act_order):
    spec = QuantSpec.parse(spec)
    weight = torch.randn(16, features) * 0.05
    x = correlated_inputs(512, features)
    q = gptq_quantize_weight(weight, hessian_of(x), spec, act_order=act_order)
    rtn = quantize_weight(weight, spec)
    assert output_error(x, weight, q.dequantize()) < 0.9 * output_error(x, weight, rtn.dequantize())


@pytest.mark.parametrize("spec", ["int4-g32", "int4-g128-asym", "int8"])
def test_uncorrelated_inputs_give_round_to_nearest_exactly(spec):
    """With H = c * I every column is independent: no error to feed forward, the same codes as RTN."""
    spec = QuantSpec.parse(spec)
    weight = torch.randn(16, 100)
    q = gptq_quantize_weight(weight, 2 * torch.eye(100, dtype=torch.float64), spec)
    rtn = quantize_weight(weight, spec)
    assert torch.equal(q.codes(), rtn.codes()) and torch.equal(q.scales, rtn.scales)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", ["int4-g32", "int4-g128", "int4-g32-asym", "int8-g32"])
@pytest.mark.parametrize("shape", [(4, 100), (3, 33)])
def test_codes_are_in_the_formats_range_for_awkward_shapes(spec, act_order, shape):
    spec = QuantSpec.parse(spec)
    weight = torch.randn(shape)
    q = gptq_quantize_weight(weight, hessian_of(correlated_inputs(256, shape[1])), spec, act_order=act_order)
    codes = q.codes()
    assert q.shape == shape and q.scales.shape == (shape[0], -(-shape[1] // spec.groups_along(shape[1])))
    low, high = (0, 15) if spec.bits == 4 else (-127, 127)
    assert codes.min() >= low and codes.max() <= high
    assert torch.isfinite(q.dequantize()).all()


def test_act_order_groups_are_the_original_contiguous_columns():
    """With act-order the loop visits columns by decreasing activation, yet each stored scale must be
    the scale of columns [g * 32, (g + 1) * 32): scaling one group's weights scales only its scale."""
    spec = QuantSpec.parse("int4-g32")
    weight = torch.randn(4, 128)
    weight[:, 64:96] *= 100
    q = gptq_quantize_weight(weight, hessian_of(correlated_inputs(512, 128)), spec, act_order=True)
    big, small = q.scales[:, 2].float(), torch.cat([q.scales[:, :2], q.scales[:, 3:]], dim=1).float()
    assert (big > 20 * small.max(dim=1).values).all()


def test_an_input_channel_that_is_always_zero_is_handled():
    x = correlated_inputs(256, 64)
    x[:, 5] = 0
    weight = torch.randn(8, 64)
    q = gptq_quantize_weight(weight, hessian_of(x), QuantSpec.parse("int4-g32"))
    assert torch.isfinite(q.dequantize()).all()


def test_gptq_quantizes_every_decoder_linear_and_keeps_the_head_tied(tiny_llama):
    loaded = tiny_llama
    model = gptq_quantize_model(
        loaded.model, loaded.tokenizer, QuantSpec.parse("int4-g32"), num_samples=4, seq_len=32
    )
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == []
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 2 * 7 + 1
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, QuantizedEmbedding)
    assert model.get_output_embeddings().qweight is embedding.qweight
    ids = calibration_samples(loaded.tokenizer, 1, seq_len=16, seed=3)
    assert torch.isfinite(model(ids).logits).all()
