"""GGUF Q4_0 / Q4_1 / Q8_0 blocks loaded natively: each converted weight dequantizes exactly as gguf
does, the Llama q / k row order matches transformers', and the embedded SmolLM2 run at its shipped
precision gives the dequantized float model's logits and greedy tokens."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from transformers import DynamicCache
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from kvlab.errors import ConfigError
from kvlab.kernels import cpu as cpu_kernels
from kvlab.models.loader import load_model
from kvlab.quant.gguf import NATIVE, load_gguf_quantized, native_weight, unpermute_rotary_rows
from kvlab.quant.modules import QuantizedEmbedding, QuantizedLinear

Q = GGMLQuantizationType
TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0]
SHAPES = [(1, 32), (3, 64), (5, 96), (7, 576)]  # K = 576 is SmolLM2's 18 blocks


def random_blocks(rows: int, columns: int, qtype: GGMLQuantizationType, seed: int) -> np.ndarray:
    """Raw bytes with every code value possible (Q8_0's -128 included) and finite float16 scales
    and offsets of both signs: what a converter could write, not only what gguf's quantizer does."""
    rng = np.random.default_rng(seed)
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, columns // block_size, block_bytes), dtype=np.uint8)
    header = 4 if qtype == Q.Q4_1 else 2
    halves = (rng.standard_normal((rows, columns // block_size, header // 2)) * 0.1).astype(np.float16)
    blocks[..., :header] = halves.view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("source", ["gguf_quantize", "random_bytes"])
def test_native_weight_dequantizes_as_gguf_does(qtype, shape, source):
    if source == "gguf_quantize":
        values = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        raw = gguf_quantize(values, qtype)
    else:
        raw = random_blocks(*shape, qtype, seed=2)
    expected = torch.from_numpy(gguf_dequantize(raw, qtype))
    weight = native_weight(raw, qtype)
    assert weight.shape == shape and weight.group_size == 32
    assert weight.bits == (8 if qtype == Q.Q8_0 else 4) and (weight.offsets is None) == (qtype != Q.Q4_1)
    assert torch.equal(weight.dequantize(), expected)
    if cpu_kernels.available():  # the op the model's modules dequantize with
        assert torch.equal(cpu_kernels.quant_dequantize(weight), expected)


def test_q4_1_block_fields_land_in_codes_scales_and_offsets():
    """One hand-built Q4_1 block: d, m, then byte j = column j (low nibble) | column j + 16 (high)."""
    codes = (np.arange(32) * 7) % 16
    block = np.concatenate(
        [
            np.array([0.25], np.float16).view(np.uint8),
            np.array([-1.5], np.float16).view(np.uint8),
            (codes[:16] | (codes[16:] << 4)).astype(np.uint8),
        ]
    )
    weight = native_weight(block.reshape(1, 20), Q.Q4_1)
    assert weight.codes().tolist() == [codes.tolist()]
    assert weight.scales.tolist() == [[0.25]] and weight.offsets.tolist() == [[-1.5]]
    assert weight.dequantize().tolist() == [(codes * 0.25 - 1.5).tolist()]


def test_native_weight_refuses_other_types_and_bad_rows():
    assert set(NATIVE) == set(TYPES)
    with pytest.raises(KeyError):
        native_weight(np.zeros((2, 210), np.uint8), Q.Q6_K)
    with pytest.raises(ValueError):
        native_weight(np.zeros((2, 19), np.uint8), Q.Q4_1)


@pytest.mark.parametrize("heads,rows", [(9, 576), (3, 192), (2, 8)])
def test_rotary_rows_are_reordered_as_transformers_does(heads, rows):
    """Against transformers' own undo of llama.cpp's permutation, on floats and on raw bytes."""
    values = np.random.default_rng(0).standard_normal((rows, 64)).astype(np.float32)
    reference = LlamaTensorProcessor()._reverse_permute_weights(values, heads, heads)
    assert np.array_equal(unpermute_rotary_rows(values, heads), reference)
    raw = gguf_quantize(values, Q.Q4_1)
    dequantized_then_reordered = LlamaTensorProcessor()._reverse_permute_weights(
        gguf_dequantize(raw, Q.Q4_1), heads, heads
    )
    assert np.array_equal(
        gguf_dequantize(unpermute_rotary_rows(raw, heads), Q.Q4_1), dequantized_then_reordered
    )


def test_native_quant_is_refused_for_models_without_a_gguf():
    with pytest.raises(ConfigError, match="GGUF"):
        load_model("tiny-llama", native_quant=True)


@pytest.fixture(scope="module")
def native():
    """The embedded SmolLM2 at its shipped precision (the float twin is conftest's `smollm2`)."""
    return load_gguf_quantized("smollm2-135m")


@pytest.mark.integration
def test_embedded_gguf_types_and_every_native_tensor_is_transformers_float(native, smollm2):
    """The embedded file: 210 Q4_1 matrices, a Q8_0 embedding shared by the tied head, 61 F32 norms."""
    assert "210 Q4_1" in native.source and "1 Q8_0" in native.source and "61 F32" in native.source
    model = native.model
    assert model.config.kvlab_quantization == "gguf-q4_1-q8_0"
    floats = dict(smollm2.model.named_modules())
    converted = {
        name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear | QuantizedEmbedding)
    }
    assert len(converted) == 30 * 7 + 2
    for name, module in converted.items():
        assert torch.equal(module.qweight.dequantize(), floats[name].weight), name
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding) and model.model.embed_tokens.bits == 8
    assert model.lm_head.qweight is model.model.embed_tokens.qweight
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, smollm2.model.get_parameter(name)), name
    # In memory, the weights take the file's own bytes: 20 per Q4_1 block of 32, 34 per Q8_0 block.
    qweights = {id(m.qweight): m.qweight for m in converted.values()}.values()
    file_bytes = sum(w.out_features * w.in_features // 32 * (34 if w.bits == 8 else 20) for w in qweights)
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sum(w.nbytes for w in qweights) == file_bytes
    assert file_bytes + float_bytes < 0.2 * smollm2.weight_bytes


@pytest.mark.integration
def test_embedded_gguf_logits_and_greedy_tokens_match_the_float_model(native, smollm2):
    """Prefill (128 tokens: dequantized slabs) and decode (one row: the quantized C++ kernel)."""
    ids = torch.randint(10, 49000, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = smollm2.model(ids).logits
        logits = native.model(ids).logits
        assert (logits - reference).abs().max().item() < 1e-2
        prompt = smollm2.tokenizer("The quick brown fox jumps over the lazy dog because", return_tensors="pt")
        assert greedy(native.model, prompt.input_ids, 64) == greedy(smollm2.model, prompt.input_ids, 64)


def greedy(model, ids: torch.Tensor, steps: int) -> list[int]:
    """A plain greedy loop with HF's cache: after the prompt, one row per step (the kernel's regime)."""
    cache = DynamicCache(config=model.config)
    logits = model(ids, cache=cache, use_cache=True).logits
    tokens = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token.item())
        logits = model(token, cache=cache, use_cache=True).logits
    return tokens
