"""On a CUDA device: quantized weights (dequantized tile by tile into cuBLAS' GEMM) give the logits the
CPU kernels give on the same codes; the paged engine (Triton attention) decodes what kvlab.generate
decodes on the quantized model; quantized KV blocks and KIVI caches run there. Skipped where no GPU is
present (CI); run on a GPU machine with `pytest tests/quant/test_quant_cuda.py`."""

import copy
import dataclasses
import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import load_tiny

from kvlab.engine.llm_engine import LLMEngine
from kvlab.engine.request import SamplingParams
from kvlab.generate import generate
from kvlab.quant import QuantSpec, quantize_model
from kvlab.quant.kv_quant import KVQuantSpec
from kvlab.quant.methods import build_variant, parse_method

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SPECS = ["int8", "int4-g32", "int4-g64-asym"]
needs_bitsandbytes = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="needs a CUDA device and bitsandbytes",
)


def quantized_pair(name: str, spec: str):
    """The same quantized model on the CPU and on the GPU (codes quantized once, then copied)."""
    cpu = load_tiny(name)
    quantize_model(cpu.model, QuantSpec.parse(spec))
    return cpu, on_cuda(cpu)


def on_cuda(loaded):
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).to("cuda"))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt-neox"])
@pytest.mark.parametrize("spec", SPECS)
def test_quantized_logits_on_cuda_equal_the_cpu_kernels(name, spec):
    cpu, gpu = quantized_pair(name, spec)
    ids = torch.randint(0, 200, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = cpu.model(ids).logits
        got = gpu.model(ids.cuda()).logits.cpu()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("spec", SPECS)
def test_engine_on_cuda_decodes_what_kvlab_generate_decodes_on_the_quantized_model(spec):
    _, gpu = quantized_pair("tiny-llama", spec)
    prompts = [list(range(5, 30)), list(range(40, 52)), list(range(60, 101))]
    engine = LLMEngine.from_model(
        gpu, device="cuda", attention_backend="triton", block_size=16, num_blocks=32
    )
    outputs = engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    for prompt, output in zip(prompts, outputs, strict=True):
        direct = generate(gpu.model, torch.tensor([prompt], device="cuda"), 8).tokens[0].tolist()
        assert output.output_token_ids == direct


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "int4"])
def test_quantized_kv_blocks_on_cuda_decode_what_they_decode_on_the_cpu(kv_cache_dtype):
    cpu = load_tiny("tiny-llama")
    prompts = [list(range(5, 45)), list(range(50, 63))]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    common = dict(block_size=16, num_blocks=32, kv_cache_dtype=kv_cache_dtype)
    on_cpu = LLMEngine.from_model(cpu, device="cpu", **common).generate(prompts, params)
    on_gpu = LLMEngine.from_model(on_cuda(cpu), device="cuda", attention_backend="triton", **common).generate(
        prompts, params
    )
    assert [o.output_token_ids for o in on_gpu] == [o.output_token_ids for o in on_cpu]


def test_kivi_cache_on_cuda_decodes_what_it_decodes_on_the_cpu():
    cpu_model = load_tiny("tiny-llama").model
    gpu_model = copy.deepcopy(cpu_model).to("cuda")
    ids = torch.randint(0, 200, (1, 70), generator=torch.Generator().manual_seed(4))
    spec = KVQuantSpec(bits=8, group_size=32, residual_length=32)
    expected = generate(cpu_model, ids, 12, kv_quant=spec).tokens
    got = generate(gpu_model, ids.cuda(), 12, kv_quant=spec).tokens.cpu()
    assert torch.equal(got, expected)


def bitsandbytes_dequantized(module) -> torch.Tensor:
    """The float weight a bitsandbytes linear layer computes with, from its codes and scales."""
    import bitsandbytes as bnb

    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    codes = weight.CB if getattr(weight, "CB", None) is not None else weight.data
    return bnb.functional.int8_vectorwise_dequant(codes, weight.SCB).float()


@needs_bitsandbytes
@pytest.mark.parametrize(
    ("method", "error_band"),
    # Gaussian weights: row-wise absmax int8 loses ~0.6% (RMS, relative), NF4 in blocks of 64 ~9%.
    [("bnb-int8", (1e-3, 1.5e-2)), ("bnb-nf4", (5e-2, 0.12))],
)
def test_bitsandbytes_quantizes_the_float_weights_and_decodes_through_kvlab_generate(method, error_band):
    import bitsandbytes as bnb

    float_model = on_cuda(load_tiny("tiny-llama")).model
    model = build_variant(parse_method(method), float_model, None, SimpleNamespace(device="cuda"))
    kind = bnb.nn.Linear8bitLt if method == "bnb-int8" else bnb.nn.Linear4bit
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, kind)}
    assert len(quantized) == 7 * float_model.config.num_hidden_layers
    float_modules = dict(float_model.named_modules())
    for name, module in quantized.items():
        expected = float_modules[name].weight.float()
        error = ((bitsandbytes_dequantized(module) - expected).norm() / expected.norm()).item()
        assert error_band[0] < error < error_band[1], (name, error)
    prompt = torch.randint(0, 200, (1, 20), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.inference_mode():
        direct = generate(model, prompt, 8, path="hf").tokens
        reference = model.generate(
            prompt, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt)
        )[:, prompt.shape[1] :]
    assert torch.equal(direct, reference)


@needs_bitsandbytes
def test_the_quantization_bench_on_cuda_runs_bitsandbytes_beside_float32(tmp_path):
    from kvlab.cli import main

    args = [
        *("bench", "--technique", "quantization", "--model", "tiny-llama", "--experiment-name", "cuda"),
        *("--set", "device=cuda", "--set", "methods=[float32,bfloat16,int8,bnb-int8,bnb-nf4]"),
        *("--set", "repeats=1", "--set", "warmup=0", "--set", "new_tokens=6", "--set", "prompt_lengths=[24]"),
        *("--set", "ppl.max_tokens=200", "--set", "ppl.max_length=64", "--set", "ppl.stride=32"),
        *("--results-dir", str(tmp_path)),
    ]
    assert main(args) == 0
    payload = json.loads((tmp_path / "quantization" / "cuda" / "results.json").read_text())
    assert payload["skipped"] == {} and payload["device"] == "cuda"
    assert list(payload["speed"][0]["runs"]) == [
        "baseline",
        "float32",
        "bfloat16",
        "int8",
        "bnb-int8",
        "bnb-nf4",
    ]
    full = payload["methods_baseline_weight_bytes"]
    for name in ("bnb-int8", "bnb-nf4"):
        assert payload["methods"][name]["ppl"]["ppl"] > 1
        assert payload["methods"][name]["weight_bytes_per_token"] < full
    assert payload["methods"]["int8"]["engine"]["identical"]
    assert payload["speed"][0]["runs"]["baseline"][0]["memory_kind"] == "cuda max_memory_allocated"
