"""AWQ: folding the scales into the RMSNorm weights and up_proj's rows leaves the float model's
output unchanged; with salient (large) activation channels, as real LLMs have, the scaled and
quantized linears' outputs are closer to the float outputs than round-to-nearest's on data the
search never saw; clipping never increases a group's error; and only Llama models are accepted."""

import pytest
import torch

from kvlab.errors import ConfigError
from kvlab.models.loader import load_model
from kvlab.quant.awq import awq_quantize_model, clip_layer, scale_layer, search_clip
from kvlab.quant.calibration import InputStats, calibration_samples, layer_by_layer
from kvlab.quant.formats import QuantSpec
from kvlab.quant.modules import QuantizedLinear
from kvlab.quant.rtn import quantize_weight

SPEC = QuantSpec.parse("int4-g32")
SALIENT = [3, 17, 40]


@pytest.fixture
def salient_tiny_llama(tiny_llama):
    """tiny-llama whose norms amplify a few channels thirtyfold: the activation outliers AWQ is for."""
    loaded = tiny_llama
    with torch.no_grad():
        for layer in loaded.model.model.layers:
            layer.input_layernorm.weight[SALIENT] *= 30
            layer.post_attention_layernorm.weight[SALIENT] *= 30
    return loaded


def test_folding_the_scales_leaves_the_float_output_unchanged(salient_tiny_llama):
    loaded = salient_tiny_llama
    model = loaded.model
    ids = calibration_samples(loaded.tokenizer, 2, seq_len=24, seed=5)
    with torch.no_grad():
        before = model(ids).logits
    samples = calibration_samples(loaded.tokenizer, 4, seq_len=32, seed=0)
    for _index, layer, inputs in layer_by_layer(model, samples):
        stats = inputs.linear_stats(layer)
        scales = scale_layer(layer, stats, SPEC)
        assert any((s - 1).abs().max() > 0.1 for s in scales.values()), (
            "no scale to fold: the test is vacuous"
        )
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_scaled_quantization_beats_round_to_nearest_on_held_out_inputs(salient_tiny_llama):
    loaded = salient_tiny_llama
    model = loaded.model
    layer = model.model.layers[0]
    names = ("q_proj", "k_proj", "v_proj")
    weights = [getattr(layer.self_attn, n).weight.detach().clone() for n in names]
    held_out = calibration_samples(loaded.tokenizer, 4, seq_len=32, seed=1)
    with torch.no_grad():
        embedded = model.get_input_embeddings()(held_out)
        x = layer.input_layernorm(embedded)
        rtn_error = sum(torch.linalg.norm(x @ (w - quantize_weight(w, SPEC).dequantize()).T) for w in weights)

        samples = calibration_samples(loaded.tokenizer, 8, seq_len=32, seed=0)
        _, first, inputs = next(layer_by_layer(model, samples))
        scale_layer(first, inputs.linear_stats(first), SPEC)
        x_scaled = layer.input_layernorm(embedded)
        awq_error = 0
        for name, w in zip(names, weights, strict=True):
            scaled = quantize_weight(getattr(layer.self_attn, name).weight, SPEC).dequantize()
            awq_error += torch.linalg.norm(x @ w.T - x_scaled @ scaled.T)
    assert awq_error < 0.8 * rtn_error


def test_clipping_never_increases_a_groups_output_error():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=generator)
    weight = torch.randn(8, 64, generator=generator)
    weight[:, 7] *= 8  # an outlier weight: clipping it trades its error for the rest of its group's
    stats = InputStats.empty(64)
    stats.add(x)
    clipped = search_clip(weight, stats, SPEC)
    for candidate in (weight, clipped):
        assert candidate.shape == weight.shape

    def group_errors(w):
        error = (quantize_weight(w, SPEC).dequantize() - weight).view(8, 2, 32)
        return torch.stack([(x[:, g * 32 : (g + 1) * 32] @ error[:, g].T).pow(2).sum(0) for g in range(2)], 1)

    assert (group_errors(clipped) <= group_errors(weight) * (1 + 1e-5)).all()
    assert (group_errors(clipped) < group_errors(weight)).any()


def test_awq_quantizes_every_linear_and_changes_the_norms(salient_tiny_llama):
    loaded = salient_tiny_llama
    norm = loaded.model.model.layers[0].input_layernorm.weight.detach().clone()
    model = awq_quantize_model(loaded.model, loaded.tokenizer, SPEC, num_samples=4, seq_len=32)
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len([m for m in model.modules() if isinstance(m, QuantizedLinear)]) == 2 * 7 + 1
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm)
    ids = calibration_samples(loaded.tokenizer, 1, seq_len=16, seed=3)
    assert torch.isfinite(model(ids).logits).all()


def test_clip_layer_leaves_q_and_k_alone(salient_tiny_llama):
    loaded = salient_tiny_llama
    samples = calibration_samples(loaded.tokenizer, 2, seq_len=16, seed=0)
    _, layer, inputs = next(layer_by_layer(loaded.model, samples))
    q, v = layer.self_attn.q_proj.weight.detach().clone(), layer.self_attn.v_proj.weight.detach().clone()
    clip_layer(layer, inputs.linear_stats(layer), SPEC)
    assert torch.equal(layer.self_attn.q_proj.weight, q)
    assert (layer.self_attn.v_proj.weight.abs() <= v.abs()).all()


def test_awq_refuses_a_model_that_is_not_llama():
    loaded = load_model("tiny-gpt-neox")
    with pytest.raises(ConfigError, match="Llama"):
        awq_quantize_model(loaded.model, loaded.tokenizer, SPEC, num_samples=1, seq_len=8)
