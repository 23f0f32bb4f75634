"""The quantized skinny GEMM and dequantization ops equal a float64 reference built from the codes, for
every variant this CPU runs, every format, awkward shapes (K and N tails, a short last group) and 1-32
input rows; and they refuse malformed weights."""

import json
import math
import time

import pytest
import torch

from kvlab.kernels import calibrate
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


def int16_inputs(x: torch.Tensor, q: QuantizedWeight) -> torch.Tensor:
    """What avx512vnni-x16 multiplies: each row rounded to int16 per span of columns (the weight group
    when it has at most 256 columns, else 256 columns) with the span's absmax / 32,767 as scale, in
    float32 as the kernel computes it, back in float64. int4 in groups of 32 takes the float kernel."""
    rows, k = x.shape
    per_channel = q.group_size >= k
    if q.bits == 4 and not per_channel and q.group_size % 64:
        return x.double()
    span = 256 if per_channel else math.gcd(q.group_size, 256)
    padded = torch.zeros(rows, -(-k // span) * span)
    padded[:, :k] = x
    spans = padded.view(rows, -1, span)
    absmax = spans.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(absmax > 0, 32767.0 / absmax, torch.zeros_like(absmax))
    codes = torch.round(spans * inverse)
    return (codes.double() * (absmax / 32767.0).double()).view(rows, -1)[:, :k]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", SHAPES + [(5, 64), (3, 96), (6, 600)])
def test_int16_variant_equals_the_product_of_its_rounded_inputs(spec, shape):
    """avx512vnni-x16 rounds the inputs to int16 and multiplies integers: equal to the float64 product
    of those rounded inputs and the dequantized weights up to float32 summation, and within 2e-4 of
    the unrounded product (int8 inputs would be ~1e-2 off)."""
    if "avx512vnni-x16" not in _variants():
        pytest.skip("this CPU lacks AVX512-VNNI")
    q = quantize_weight(torch.randn(shape), QuantSpec.parse(spec))
    weight = q.dequantize(torch.float64)
    for rows in (1, 2, 3, 4, 5, 8, 13):
        x = torch.randn(rows, shape[1])
        y = cpu_kernels.quant_linear(x, q, None, "avx512vnni-x16").double()
        expected = int16_inputs(x, q) @ weight.T
        assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        exact = x.double() @ weight.T
        assert (y - exact).norm() <= 2e-4 * exact.norm()


@pytest.mark.parametrize("spec", ["int8", "int4-g128", "int4-g64-asym"])
def test_int16_variant_computes_each_row_as_if_alone(spec):
    """Integer sums are exact and each row has its own input scales, so a row's output does not depend
    on the rows beside it (a decode step's batch): bitwise the same alone or among 13."""
    if "avx512vnni-x16" not in _variants():
        pytest.skip("this CPU lacks AVX512-VNNI")
    q = quantize_weight(torch.randn(70, 320), QuantSpec.parse(spec))
    x = torch.randn(13, 320)
    together = cpu_kernels.quant_linear(x, q, None, "avx512vnni-x16")
    alone = torch.cat([cpu_kernels.quant_linear(x[i : i + 1], q, None, "avx512vnni-x16") for i in range(13)])
    assert torch.equal(together, alone)


def _measure_quant(quant_linear):
    return calibrate.measure_quant(
        quant_linear, ["avx512", "avx512vnni-x16"], shapes=((8, 64),), working_set=4096, rounds=3
    )


def test_quant_calibration_picks_the_faster_variant_per_format():
    def quant_linear(x, weight, variant):
        if (variant == "avx512vnni-x16") == (weight.bits == 8):
            time.sleep(0.002)
        return x

    decisions = _measure_quant(quant_linear)
    assert decisions["int8"].variant == "avx512" and decisions["int4-g128"].variant == "avx512vnni-x16"
    assert decisions["int8"].ms["avx512vnni-x16"] > decisions["int8"].ms["avx512"]
    assert set(decisions) == set(calibrate.QUANT_FORMATS.values())


def test_quant_calibration_gives_a_tie_to_the_float_variant():
    """Candidates go float variants first, and within 3% the earlier one is kept."""
    order = cpu_kernels.calibrated_quant_variants()
    assert "avx512vnni" not in order  # int8 inputs: opt-in only
    if "avx512vnni-x16" in order:
        assert order[-1] == "avx512vnni-x16"
    assert (
        calibrate._fastest(["avx512", "avx512vnni-x16"], {"avx512": 1.02, "avx512vnni-x16": 1.0}) == "avx512"
    )
    assert (
        calibrate._fastest(["avx512", "avx512vnni-x16"], {"avx512": 1.1, "avx512vnni-x16": 1.0}) != "avx512"
    )


def test_quant_calibration_is_stored_with_the_skinny_table(tmp_path):
    calls = []

    def quant_linear(x, weight, variant):
        calls.append((variant, weight.bits))
        return x

    def load():
        return calibrate.load_or_measure(
            tmp_path,
            "digest",
            ["avx2"],
            lambda x, w, name: x,
            ((8, 64),),
            working_set=4096,
            quant_variants=["avx2"],
            quant_linear=quant_linear,
        )

    table = load()
    assert {bits for _, bits in calls} == {8, 4} and table.quant["int4-g128"].variant == "avx2"
    stored = json.loads(table.path.read_text())
    assert stored["key"]["quant_variants"] == ["avx2"] and set(stored["quant"]) == {"int8", "int4-g128"}
    calls.clear()
    again = load()
    assert not calls and again.quant == table.quant


def test_quant_variant_follows_the_calibration_unless_forced(monkeypatch):
    fastest = {"int8": "avx512", "int4-g128": "avx2"}
    table = calibrate.Calibration(
        {}, {}, quant={name: calibrate.Decision(v, v, {}) for name, v in fastest.items()}
    )
    monkeypatch.setattr(cpu_kernels, "calibration", lambda: table)
    monkeypatch.delenv("KVLAB_QUANT_VARIANT", raising=False)
    assert cpu_kernels.quant_variant(8) == "avx512" and cpu_kernels.quant_variant(4) == "avx2"
    monkeypatch.setenv("KVLAB_QUANT_VARIANT", "avx2")
    assert cpu_kernels.quant_variant(8) == "avx2"


@pytest.mark.parametrize("variant", ["avx512vnni-x16", "avx512vnni"])
@pytest.mark.parametrize("spec", ["int8", "int4-g128"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_integer_variants_keep_a_non_finite_input_visible(variant, spec, bad):
    """Rounding to int16 or int8 must not turn a NaN or inf activation into finite numbers: its row's
    outputs are non-finite, as the float variants' are; the other rows are untouched."""
    if variant not in _variants():
        pytest.skip(f"this CPU lacks the {variant} variant")
    q = quantize_weight(torch.randn(24, 320), QuantSpec.parse(spec))
    x = torch.randn(3, 320)
    clean = cpu_kernels.quant_linear(x, q, None, variant)
    x[1, 300] = bad
    y = cpu_kernels.quant_linear(x, q, None, variant)
    assert not torch.isfinite(y[1]).any()
    assert torch.equal(y[[0, 2]], clean[[0, 2]])


def test_dequantize_op_takes_integer_row_indices_only():
    # A bool mask was read as the indices 0 and 1, a float index truncated.
    q = quantize_weight(torch.randn(4, 64), QuantSpec.parse("int8"))
    for rows in (torch.tensor([False, False, True, True]), torch.tensor([2.9, 0.5])):
        with pytest.raises(RuntimeError, match="int64 or int32 indices"):
            cpu_kernels.quant_dequantize(q, rows)
