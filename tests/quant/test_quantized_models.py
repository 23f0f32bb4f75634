"""Quantized models run everywhere a float one does: HF's forward, the engine-native twin, kvlab.generate
and the paged engine give the same tokens on the same quantized weights; the float16 scales survive a
change of the model's dtype; weight bytes count the codes; bad options are refused."""

import pytest
import torch
from conftest import load_tiny

from kvlab.bench.core.floor import decode_weight_bytes
from kvlab.engine.config import EngineConfig
from kvlab.engine.request import SamplingParams
from kvlab.errors import ConfigError
from kvlab.generate import generate
from kvlab.kernels import cpu as cpu_kernels
from kvlab.llm import LLM
from kvlab.models.native import build_engine_model
from kvlab.quant import QuantSpec, quantize_model
from kvlab.quant.methods import quantize_loaded
from kvlab.quant.modules import QuantizedEmbedding, QuantizedLinear

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="needs kvlab's CPU kernels")
SPECS = ["int8", "int4-g32", "int4-g64-asym"]


def quantized(name: str, spec: str):
    loaded = load_tiny(name)
    quantize_model(loaded.model, QuantSpec.parse(spec))
    return loaded


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt-neox"])
@pytest.mark.parametrize("spec", SPECS)
def test_greedy_tokens_of_kvlab_generate_equal_hf_generate_on_the_quantized_model(name, spec):
    loaded = quantized(name, spec)
    ids = torch.randint(0, 200, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = loaded.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False
        )
    result = generate(loaded.model, ids, 10)
    assert result.path == "native"
    assert torch.equal(result.tokens, expected[:, 17:])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt-neox"])
def test_the_native_twin_holds_the_quantized_weights_and_its_logits_match_hf(name):
    loaded = quantized(name, "int4-g32")
    twin = build_engine_model(loaded.model)
    assert twin.is_quantized
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = loaded.model(ids).logits[0]
    result = generate(loaded.model, ids, 1)  # the prefill's logits pick the first token
    assert result.tokens[0, 0].item() == expected[-1].argmax().item()


@pytest.mark.parametrize("spec", SPECS)
def test_the_paged_engine_decodes_what_kvlab_generate_decodes(spec):
    loaded = quantized("tiny-gpt-neox", spec)
    prompts = [list(range(5, 30)), list(range(40, 52))]
    llm = LLM(loaded)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    for prompt, output in zip(prompts, outputs, strict=True):
        direct = generate(loaded.model, torch.tensor([prompt]), 8).tokens[0].tolist()
        assert output.output_token_ids == direct


def test_llm_quantization_option_quantizes_the_model():
    llm = LLM("tiny-llama", quantization="int8")
    assert llm.engine.runner.model.is_quantized


@pytest.mark.parametrize("value", ["kv-int8", "float32", "int3"])
def test_engine_quantization_must_be_a_weight_method(value):
    with pytest.raises(ConfigError):
        EngineConfig(quantization=value)


def test_a_dtype_change_keeps_the_scales_in_float16():
    loaded = quantized("tiny-llama", "int4-g32-asym")
    loaded.model.to(torch.bfloat16)
    modules = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear | QuantizedEmbedding)]
    assert modules and all(m.qweight.scales.dtype == torch.float16 for m in modules)
    ids = torch.randint(0, 200, (1, 12))
    assert generate(loaded.model, ids, 4).tokens.shape == (1, 4)


def test_a_dtype_change_reaches_the_quantized_embeddings_rows():
    # Its rows stayed float32, so every layer after it computed in float32 on the HF path.
    model = quantize_model(load_tiny("tiny-llama").model, QuantSpec.parse("int8")).to(torch.bfloat16)
    ids = torch.randint(10, 49000, (1, 12), generator=torch.Generator().manual_seed(0))
    assert model.get_input_embeddings()(ids).dtype == torch.bfloat16
    assert model(ids).logits.dtype == torch.bfloat16


def test_a_quantized_model_is_not_quantized_again():
    model = quantize_model(load_tiny("tiny-llama").model, QuantSpec.parse("int8"))
    for include_embeddings in (False, True):
        with pytest.raises(ConfigError, match="already quantized"):
            quantize_model(model, QuantSpec.parse("int4-g32"), include_embeddings=include_embeddings)


def test_a_float64_input_takes_the_dequantizing_path():
    model = quantize_model(load_tiny("tiny-llama").model, QuantSpec.parse("int4-g32"))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    expected = x @ layer.qweight.dequantize().double().T
    assert torch.allclose(layer(x), expected, atol=1e-9)


def test_weight_bytes_count_the_codes_and_the_tied_table_once():
    float_bytes = decode_weight_bytes(load_tiny("tiny-llama").model)
    int8 = decode_weight_bytes(quantized("tiny-llama", "int8").model)
    model = quantized("tiny-llama", "int4-g32").model
    int4 = decode_weight_bytes(model)
    assert int4 < int8 < 0.3 * float_bytes
    # the engine's twin reads the same bytes (tied table once, codes + scales + offsets)
    assert build_engine_model(model, fuse_projections=False).weight_bytes == int4


def test_int4_models_keep_the_embedding_and_head_at_int8():
    loaded = quantized("tiny-llama", "int4-g32")
    assert loaded.model.get_input_embeddings().qweight.bits == 8
    assert loaded.model.get_output_embeddings().qweight.bits == 8
    assert loaded.model.model.layers[0].mlp.down_proj.qweight.bits == 4


def test_quantize_loaded_refuses_what_is_not_a_weight_method():
    with pytest.raises(ConfigError):
        quantize_loaded(load_tiny("tiny-llama"), "kv-int8")
