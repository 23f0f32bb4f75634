"""The engine's quantized KV blocks (EngineConfig.kv_cache_dtype, kvlab/quant/paged_kv.py)."""

import pytest
import torch
from conftest import load_tiny

import kvlab
from kvlab.attention.backends.reference import ReferenceBackend
from kvlab.engine.compression import RequestPress
from kvlab.engine.config import EngineConfig
from kvlab.engine.llm_engine import LLMEngine
from kvlab.engine.request import SamplingParams
from kvlab.errors import ConfigError
from kvlab.quant.kv_quant import KVQuantSpec
from kvlab.quant.paged_kv import QuantizedPagedBackend, decode, encode, row_parts


@pytest.fixture(scope="module")
def tiny_llama():
    return load_tiny("tiny-llama")


@pytest.mark.parametrize("bits", [8, 4])
def test_backend_attends_over_the_dequantized_blocks(paged_case, bits):
    spec = KVQuantSpec(bits=bits, group_size=8, residual_length=8)
    query, new_k, new_v, key_cache, value_cache, metadata = paged_case([(5, 3), (0, 6), (9, 1)])
    backend = QuantizedPagedBackend(ReferenceBackend(), spec, head_dim=16)
    key_rows, value_rows = encode(key_cache, spec), encode(value_cache, spec)
    backend.write_kv(new_k, new_v, key_rows, value_rows, metadata.slot_mapping)
    out = backend.forward(query, key_rows, value_rows, metadata, 0.25)
    # The same attention over float caches holding what the rows decode to (tables not renumbered).
    reference = ReferenceBackend()
    dense_k, dense_v = decode(key_rows, spec, 16, torch.float32), decode(value_rows, spec, 16, torch.float32)
    assert torch.allclose(out, reference.forward(query, dense_k, dense_v, metadata, 0.25), atol=1e-6)
    exact_k, exact_v = key_cache.clone(), value_cache.clone()
    reference.write_kv(new_k, new_v, exact_k, exact_v, metadata.slot_mapping)
    exact = reference.forward(query, exact_k, exact_v, metadata, 0.25)
    assert (out - exact).norm() / exact.norm() < (0.01 if bits == 8 else 0.15)
    _, scale, zero = row_parts(key_rows, spec, 16)
    assert scale.shape == zero.shape == (*key_cache.shape[:3], 2) and scale.dtype == torch.float16


def test_int8_blocks_decode_the_same_greedy_tokens_with_smaller_blocks(tiny_llama):
    prompt = torch.randint(10, 49000, (80,), generator=torch.Generator().manual_seed(0)).tolist()
    reference = kvlab.generate(tiny_llama.model, torch.tensor([prompt]), 12, path="hf")
    engines = {
        dtype: LLMEngine.from_model(tiny_llama, block_size=4, num_blocks=64, kv_cache_dtype=dtype)
        for dtype in ("auto", "int8")
    }
    (output,) = engines["int8"].generate([prompt], SamplingParams(max_tokens=12))
    assert output.output_token_ids == reference.tokens[0].tolist()
    per_block = {dtype: engine.runner.kv_cache_bytes / 64 for dtype, engine in engines.items()}
    # head_dim 16 in one group: 16 code bytes + 4 B of scale and zero against 64 B of float32
    assert per_block["int8"] == per_block["auto"] * 20 / 64
    budget = {"kv_cache_memory_bytes": 1 << 20, "block_size": 4}
    blocks = {
        dtype: LLMEngine.from_model(tiny_llama, kv_cache_dtype=dtype, **budget).scheduler.kv.pool.num_blocks
        for dtype in ("auto", "int4")
    }
    assert (
        blocks["int4"] == (1 << 20) // (per_block["auto"] * 12 / 64) and blocks["int4"] > 5 * blocks["auto"]
    )


def test_bad_kv_cache_options_raise_config_error(tiny_llama):
    with pytest.raises(ConfigError, match="kv_cache_dtype.*auto, int8, int4"):
        EngineConfig(kv_cache_dtype="fp8")
    with pytest.raises(ConfigError, match="kv_cache_group_size"):
        EngineConfig(kv_cache_dtype="int8", kv_cache_group_size=0)
    with pytest.raises(ConfigError, match="head_dim 16 is not a multiple"):
        LLMEngine.from_model(tiny_llama, num_blocks=8, kv_cache_dtype="int8", kv_cache_group_size=12)
    engine = LLMEngine.from_model(tiny_llama, num_blocks=8, kv_cache_dtype="int8")
    with pytest.raises(ConfigError, match="press"):
        engine.add_request([1, 2, 3], press=RequestPress(kvlab.get_press("knorm"), max_cache_tokens=2))
