"""The quantized skinny GEMM and dequantization ops equal a float64 reference built from the codes, for
every variant this CPU runs, every format, awkward shapes (K and N tails, a short last group) and 1-32
input rows; and they refuse malformed weights."""

import pytest
import torch

from kvlab.kernels import cpu as cpu_kernels
from kvlab.quant import QuantSpec, linear, quantize_weight, quantized_linear
from kvlab.quant.formats import QuantizedWeight

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason=f"kvlab CPU kernels: {cpu_kernels.build_failure()}"
)
SPECS = ["int8", "int8-g32", "int4", "int4-g32", "int4-g128", "int4-g64-asym", "int4-g128-asym"]
SHAPES = [(37, 576), (9, 100), (64, 1536), (8, 33), (1, 32)]


def _variants():
    return cpu_kernels.quant_variants() if cpu_kernels.available() else ()


@pytest.mark.parametrize("variant", ["avx2", "avx512"])
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_quant_linear_equals_float64_reference(variant, spec, shape):
    if variant not in _variants():
        pytest.skip(f"this CPU lacks the {variant} variant's instructions")
    q = quantize_weight(torch.randn(shape), QuantSpec.parse(spec))
    reference_weight = q.dequantize(torch.float64)
    for rows in (1, 2, 3, 4, 5, 8, 17, 32):
        x = torch.randn(rows, shape[1])
        bias = torch.randn(shape[0])
        y = cpu_kernels.quant_linear(x, q, bias, variant)
        expected = x.double() @ reference_weight.T + bias.double()
        assert y.dtype == torch.float32 and y.shape == (rows, shape[0])
        assert torch.allclose(y.double(), expected, rtol=1e-4, atol=1e-4 * shape[1] ** 0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_come_back_in_their_dtype(dtype):
    q = quantize_weight(torch.randn(40, 128), QuantSpec.parse("int4-g32"))
    x = torch.randn(3, 128).to(dtype)
    y = cpu_kernels.quant_linear(x, q)
    expected = x.double() @ q.dequantize(torch.float64).T
    assert y.dtype == dtype and torch.allclose(y.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("spec", SPECS)
def test_dequantize_op_equals_the_python_reference(spec):
    q = quantize_weight(torch.randn(21, 200), QuantSpec.parse(spec))
    assert torch.equal(cpu_kernels.quant_dequantize(q), q.dequantize())
    rows = torch.tensor([20, 0, 3, 3])
    assert torch.equal(cpu_kernels.quant_dequantize(q, rows), q.dequantize()[rows])


def test_dequantize_op_writes_into_a_given_buffer():
    q = quantize_weight(torch.randn(21, 200), QuantSpec.parse("int4-g64-asym"))
    rows = torch.arange(3, 11)
    buffer = torch.full((8, 200), float("nan"))
    assert cpu_kernels.quant_dequantize(q, rows, buffer).data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer, q.dequantize()[rows])
    with pytest.raises(RuntimeError, match="out must be"):
        cpu_kernels.quant_dequantize(q, rows, torch.empty(8, 199))


def test_many_rows_take_the_slab_path_and_agree(monkeypatch):
    """Several slabs per matrix (each dequantized into the one reused buffer), and a second matrix after."""
    monkeypatch.setattr(linear, "SLAB_ELEMENTS", 64 * 96)
    for shape in [(300, 96), (130, 160)]:
        q = quantize_weight(torch.randn(*shape), QuantSpec.parse("int4-g32-asym"))
        x = torch.randn(70, shape[1])
        expected = x.double() @ q.dequantize(torch.float64).T
        assert torch.allclose(quantized_linear(x, q).double(), expected, rtol=1e-4, atol=1e-3)


def test_malformed_weights_are_refused():
    q = quantize_weight(torch.randn(8, 64), QuantSpec.parse("int4-g32"))
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="scale groups"):
        torch.ops.kvlab.quant_linear(x, q.data, q.scales[:, :1].contiguous(), None, 4, 32, 64, None, "avx2")
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.kvlab.quant_linear(x, q.data[:, :-1].contiguous(), q.scales, None, 4, 32, 64, None, "avx2")
    with pytest.raises(RuntimeError, match="x must be"):
        cpu_kernels.quant_linear(torch.randn(1, 63), q)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.quant_dequantize(q, torch.tensor([8]))
    with pytest.raises(ValueError):
        QuantizedWeight(q.data, q.scales, None, 8, 32, 64)


def quantized_inputs(x: torch.Tensor) -> torch.Tensor:
    """What the integer-dot-product variant multiplies: x rounded to int8 per 32-column block with the
    block's absmax / 127 as scale (computed in float32 as the kernel does), back in float64."""
    rows, k = x.shape
    padded = torch.zeros(rows, -(-k // 32) * 32)
    padded[:, :k] = x
    blocks = padded.view(rows, -1, 32)
    absmax = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    codes = torch.clamp(torch.round(blocks * inverse), -127, 127)
    return (codes.double() * (absmax / 127.0).double()).view(rows, -1)[:, :k]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", SHAPES + [(5, 64), (3, 96)])
def test_integer_variant_equals_the_product_of_its_quantized_inputs(spec, shape):
    """avx512vnni quantizes the inputs to int8 per 32 columns (llama.cpp's activation blocks) and is
    exact up to float32 rounding against the float64 product of those inputs and the weights."""
    if "avx512vnni" not in _variants():
        pytest.skip("this CPU lacks AVX512-VNNI")
    q = quantize_weight(torch.randn(shape), QuantSpec.parse(spec))
    for rows in (1, 2, 3, 4, 5, 8, 13):
        x = torch.randn(rows, shape[1])
        y = cpu_kernels.quant_linear(x, q, None, "avx512vnni")
        expected = quantized_inputs(x) @ q.dequantize(torch.float64).T
        assert torch.allclose(y.double(), expected, rtol=1e-4, atol=1e-4 * shape[1] ** 0.5)
        # and close to the unquantized product: int8 inputs cost well under a percent here
        exact = x.double() @ q.dequantize(torch.float64).T
        assert (y.double() - exact).norm() <= 0.02 * exact.norm()
