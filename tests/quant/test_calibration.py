"""Calibration data and the layer-by-layer pass: samples are seeded windows of WikiText-2's validation
text (never the test text the perplexity is measured on), input statistics are what GPTQ and AWQ
define, and each layer sees the outputs of the layers before it as the caller left them."""

import pytest
import torch

from kvlab.quant import calibration
from kvlab.quant.calibration import InputStats, calibration_samples, layer_by_layer, validation_tokens


@pytest.fixture
def tokenizer(pristine_tiny_llama):
    return pristine_tiny_llama.tokenizer


def test_samples_are_windows_of_the_validation_text(tokenizer, monkeypatch):
    requested = []
    original = calibration.load_text

    def spy(name, split=None, data_dir=None):
        requested.append((name, split))
        return original(name, split, data_dir)

    monkeypatch.setattr(calibration, "load_text", spy)
    validation_tokens.cache_clear()
    samples = calibration_samples(tokenizer, 4, seq_len=32, seed=0)
    assert requested == [("wikitext2", "validation")]
    assert samples.shape == (4, 32) and samples.dtype == torch.long
    windows = validation_tokens(tokenizer).unfold(0, 32, 1)
    for row in samples:
        assert (windows == row).all(dim=1).any(), "a sample is not a window of the validation tokens"


def test_samples_are_reproducible_and_seeded(tokenizer):
    first = calibration_samples(tokenizer, 8, seq_len=16, seed=0)
    assert torch.equal(first, calibration_samples(tokenizer, 8, seq_len=16, seed=0))
    assert not torch.equal(first, calibration_samples(tokenizer, 8, seq_len=16, seed=1))


def test_input_stats_are_the_gptq_hessian_and_awq_magnitudes():
    x = torch.randn(3, 5, 4)
    stats = InputStats.empty(4)
    stats.add(x[:2])
    stats.add(x[2:])
    rows = x.reshape(-1, 4).double()
    torch.testing.assert_close(stats.hessian, 2 * rows.T @ rows / 15)
    torch.testing.assert_close(stats.mean_abs, rows.abs().mean(dim=0))


def test_each_layer_sees_the_previous_layer_as_the_caller_left_it(tiny_llama, tokenizer):
    model = tiny_llama.model
    samples = calibration_samples(tokenizer, 3, seq_len=16, seed=0)
    seen = []
    for index, layer, inputs in layer_by_layer(model, samples, batch_size=2):
        assert [h.shape for h in inputs.hidden] == [(2, 16, 64), (1, 16, 64)]
        seen.append(torch.cat(inputs.hidden))
        if index == 0:
            # Zeroing the residual branches' output projections makes layer 0 the identity.
            layer.self_attn.o_proj.weight.data.zero_()
            layer.mlp.down_proj.weight.data.zero_()
    with torch.no_grad():
        embedded = model.get_input_embeddings()(samples)
    torch.testing.assert_close(seen[0], embedded)
    torch.testing.assert_close(seen[1], seen[0])


def test_linear_stats_hook_every_linear_of_the_layer(tiny_llama, tokenizer):
    model = tiny_llama.model
    samples = calibration_samples(tokenizer, 2, seq_len=8, seed=0)
    _, layer, inputs = next(layer_by_layer(model, samples))
    stats = inputs.linear_stats(layer)
    assert set(stats) == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }
    assert all(s.count == 16 for s in stats.values())
    # q, k and v read the same normalised input.
    torch.testing.assert_close(stats["self_attn.q_proj"].gram, stats["self_attn.v_proj"].gram)
    assert stats["mlp.down_proj"].gram.shape == (128, 128)
