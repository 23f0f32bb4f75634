"""KV-cache quantization: the arithmetic, KIVI's cache layout, generate and PressCache with kv_quant."""

import pytest
import torch
from conftest import load_tiny

import kvlab
from kvlab.cache import kv_cache_bytes
from kvlab.errors import ConfigError
from kvlab.press.budget import Budget
from kvlab.press.hf import PressCache
from kvlab.press.wrappers import KeyRerotationPress
from kvlab.quant.kv_cache import QuantizedCache, QuantizedKVLayer
from kvlab.quant.kv_quant import KVQuantSpec, dequantize, pack, quantize, unpack
from kvlab.quant.paged_kv import decode, encode


@pytest.fixture(scope="module")
def tiny_llama():
    return load_tiny("tiny-llama")


def outlier_keys(batch=1, heads=2, tokens=96, head_dim=32, seed=0) -> torch.Tensor:
    """Keys with a few large fixed channels, the structure KIVI quantizes per channel for."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, tokens, head_dim, generator=generator)
    keys[..., :3] *= 5
    return keys


@pytest.mark.parametrize("bits, group_size", [(8, 32), (4, 32), (4, 8)])
def test_round_trip_is_within_half_a_step(bits, group_size):
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 6, 64, generator=generator, dtype=torch.float64) * 3 + 1).float().double()
    x[0, 0, :32] = 5.0  # a constant group: zero range
    codes, scale, zero = quantize(x.float(), bits, group_size)
    assert codes.max() <= (1 << bits) - 1 and scale.dtype == zero.dtype == torch.float16
    assert torch.equal(unpack(pack(codes, bits), bits), codes)
    restored = dequantize(codes, scale, zero, torch.float64)
    half_step = scale.double().repeat_interleave(group_size, dim=-1) / 2
    assert ((restored - x).abs() <= half_step * (1 + 1e-5) + 1e-6).all()


def test_spec_validation():
    assert KVQuantSpec.parse("auto") is None and KVQuantSpec.parse("int4").bits == 4
    with pytest.raises(ConfigError, match="int8 or int4"):
        KVQuantSpec.parse("fp8")
    with pytest.raises(ConfigError, match="multiple of group_size"):
        KVQuantSpec(group_size=32, residual_length=48)
    with pytest.raises(ConfigError, match="bits"):
        KVQuantSpec(bits=2)


@pytest.mark.parametrize("bits", [8, 4])
def test_kivi_layout_and_exact_bytes(bits):
    spec = KVQuantSpec(bits=bits, group_size=16, residual_length=32)
    layer = QuantizedKVLayer(spec)
    keys = outlier_keys(tokens=70)
    values = torch.randn_like(keys)
    for start in (0, 50, 64, 69):  # a prefill, then chunks and single tokens
        end = {0: 50, 50: 64, 64: 69, 69: 70}[start]
        seen_k, seen_v = layer.update(keys[:, :, start:end], values[:, :, start:end])
        assert seen_k.shape[-2] == end and torch.equal(seen_k[:, :, start:end], keys[:, :, start:end])
    # Keys: whole groups of R = 32 tokens quantized (64), 6 in the residual; values: the last 32 exact.
    assert layer.key_codes.shape == (1, 2, 64, 32 * bits // 8) and layer.key_scale.shape == (1, 2, 4, 32)
    assert torch.equal(layer.key_residual, keys[:, :, 64:])
    assert layer.value_codes.shape[-2] == 38 and torch.equal(layer.value_residual, values[:, :, 38:])
    quantized = 2 * 64 * 32 * bits // 8 + 2 * 38 * 32 * bits // 8  # codes, 2 heads
    stats = 2 * (4 * 32 + 38 * 2) * 2 * 2  # (key groups + value groups) * 2 heads * (scale, zero) * 2 B
    residual = (6 + 32) * 2 * 32 * 4
    assert layer.kv_bytes() == quantized + stats + residual
    # The stored past reads back within half a step per channel group of 16 tokens.
    stored_k, _ = layer.update(keys[:, :, :0], values[:, :, :0])
    step = layer.key_scale.float().repeat_interleave(16, dim=-2)
    assert ((stored_k[:, :, :64] - keys[:, :, :64]).abs() <= step / 2 + 1e-5).all()


def attention(query, keys, values):
    return torch.softmax(query @ keys.transpose(-1, -2) / keys.shape[-1] ** 0.5, dim=-1) @ values


@pytest.mark.parametrize("spec, tolerance", [("int8", 0.02), ("int4", 0.25)])
def test_attention_over_the_quantized_cache_is_close_to_full_precision(spec, tolerance):
    keys = outlier_keys(tokens=200)
    values = torch.randn_like(keys)
    layer = QuantizedKVLayer(KVQuantSpec.parse(spec))
    for start in range(0, 200, 40):
        layer.update(keys[:, :, start : start + 40], values[:, :, start : start + 40])
    query = torch.randn(1, 2, 1, 32)
    stored_k, stored_v = layer.update(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))
    exact = attention(query, keys, values)
    approx = attention(query, stored_k[:, :, :200], stored_v[:, :, :200])
    error = (approx - exact).norm() / exact.norm()
    assert 0 < error < tolerance


def test_per_channel_keys_beat_per_token_keys_on_outlier_channels():
    """KIVI's observation, the reason for the cache layout: fixed outlier channels spoil per-token groups."""
    keys = outlier_keys(tokens=64)
    keys[..., :3] *= 4
    spec = KVQuantSpec(bits=4, group_size=32, residual_length=32)
    layer = QuantizedKVLayer(spec)
    layer.update(keys, torch.zeros_like(keys))
    per_channel, _ = layer.update(keys[:, :, :0], keys[:, :, :0])
    per_token = decode(encode(keys, spec), spec, 32, torch.float32)
    # The ordinary channels keep their own small steps per channel; per token they share the outliers'.
    ordinary = slice(3, None)
    assert (per_channel - keys)[..., ordinary].norm() < 0.2 * (per_token - keys)[..., ordinary].norm()
    assert (per_channel - keys).norm() < 0.8 * (per_token - keys).norm()


def test_generate_with_int8_kv_matches_float_greedy_and_holds_fewer_bytes(tiny_llama):
    ids = torch.randint(10, 49000, (1, 80), generator=torch.Generator().manual_seed(0))
    reference = kvlab.generate(tiny_llama.model, ids, 12, path="hf")  # float PreallocatedCache
    result = kvlab.generate(tiny_llama.model, ids, 12, kv_quant="int8")
    assert result.path == "hf"
    assert torch.equal(result.tokens, reference.tokens)
    assert result.cache_bytes < 0.6 * reference.cache_bytes


def test_generate_refuses_kv_quant_on_the_native_path_or_with_a_cache(tiny_llama):
    ids = torch.randint(10, 49000, (1, 8))
    with pytest.raises(ConfigError, match="HF modules"):
        kvlab.generate(tiny_llama.model, ids, 2, kv_quant="int8", path="native")
    with pytest.raises(ConfigError, match="not both"):
        kvlab.generate(tiny_llama.model, ids, 2, kv_quant="int8", cache=QuantizedCache(2))
    with pytest.raises(ConfigError, match="KV cache dtype"):
        kvlab.generate(tiny_llama.model, ids, 2, kv_quant="fp8")


def test_press_cache_with_int8_keeps_the_press_positions_and_stores_codes(tiny_llama):
    model = tiny_llama.model
    ids = torch.randint(10, 49000, (1, 90), generator=torch.Generator().manual_seed(0))
    press = kvlab.get_press("streaming_llm")
    exact = PressCache(press, model, max_cache_tokens=48)
    stored = PressCache(press, model, max_cache_tokens=48, kv_quant="int8")
    rows_of_position_5 = []
    with torch.inference_mode():
        for start, end in [(0, 80), *((i, i + 1) for i in range(80, 90))]:
            positions = torch.arange(start, end)[None]
            for cache in (exact, stored):
                model(input_ids=ids[:, start:end], position_ids=positions, cache=cache, use_cache=True)
            for float_layer, layer in zip(exact.layers, stored.layers, strict=True):
                n = float_layer.length
                assert torch.equal(layer.stored_positions, float_layer.positions[..., :n])
                assert layer.key_rows.dtype == torch.uint8 and layer.keys is None
            # Layer 0's keys depend only on the tokens: the stored codes read back within a step.
            float_layer, layer = exact.layers[0], stored.layers[0]
            keys = decode(layer.key_rows, stored.kv_quant, 16, torch.float32)
            assert (keys - float_layer.keys[:, :, : float_layer.length]).abs().max() < 0.05
            slot = (layer.stored_positions[0, 0] == 5).nonzero()  # a sink token, kept throughout
            rows_of_position_5.append(layer.key_rows[0, 0, slot].clone())
    assert all(torch.equal(rows, rows_of_position_5[0]) for rows in rows_of_position_5)  # never requantized
    assert kv_cache_bytes(stored) < 0.35 * kv_cache_bytes(exact)


def test_press_cache_refuses_quantized_keys_that_the_press_rewrites(tiny_llama):
    with pytest.raises(ConfigError, match="rewrites kept keys"):
        PressCache(
            KeyRerotationPress(kvlab.get_press("streaming_llm")),
            tiny_llama.model,
            budget=Budget(48),
            kv_quant="int8",
        )


def test_generate_composes_a_press_with_kv_quant(tiny_llama):
    ids = torch.randint(10, 49000, (1, 80), generator=torch.Generator().manual_seed(0))
    press, budget = kvlab.get_press("h2o"), Budget(max_cache_tokens=48)
    exact = kvlab.generate(tiny_llama.model, ids, 6, press=press, budget=budget, path="hf")
    result = kvlab.generate(tiny_llama.model, ids, 6, press=press, budget=budget, kv_quant="int8")
    assert result.path == "hf" and result.tokens.shape == exact.tokens.shape
    assert result.cache_bytes < 0.35 * exact.cache_bytes
