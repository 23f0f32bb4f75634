"""Quantized weight storage and round-to-nearest: packing round-trips, every code dequantizes to
q * scale + offset exactly, the rounding error stays within half a step, and bad specs are refused."""

import pytest
import torch

from kvlab.errors import ConfigError
from kvlab.quant.formats import QuantizedWeight, QuantSpec, pack_int4, packed_columns, unpack_int4
from kvlab.quant.rtn import quantize_weight

SPECS = [
    "int8",
    "int8-tensor",
    "int8-g32",
    "int4",
    "int4-g32",
    "int4-g64",
    "int4-g128",
    "int4-g128-asym",
    "int4-g32-asym",
]
# Awkward shapes: K not a multiple of 32, of the group (576 = 4.5 groups of 128), one row, one column.
SHAPES = [(7, 576), (5, 100), (1, 33), (3, 1), (16, 1536)]


@pytest.mark.parametrize("shape", SHAPES)
def test_int4_packing_round_trips(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.int16)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], packed_columns(shape[1]))
    assert torch.equal(unpack_int4(packed, shape[1]), codes)


def test_int4_block_layout_is_ggufs():
    """Byte j of a 32-column block: column j in the low nibble, column j + 16 in the high one."""
    codes = torch.arange(32, dtype=torch.int16).remainder(16).view(1, 32)
    codes[0, 16:] = 15 - codes[0, 16:]
    packed = pack_int4(codes)
    for j in range(16):
        assert packed[0, j].item() == codes[0, j].item() | (codes[0, j + 16].item() << 4)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_to_nearest_is_within_half_a_step(spec, shape):
    spec = QuantSpec.parse(spec)
    weight = torch.randn(shape, dtype=torch.float64) * 0.05
    q = quantize_weight(weight, spec)
    assert q.shape == shape and q.bits == spec.bits
    scale = q.scales.double().repeat_interleave(q.group_size, dim=1)[:, : shape[1]]
    error = (q.dequantize(torch.float64) - weight).abs()
    # Half a step, plus float16's rounding of the stored scale / offset.
    assert (error <= 0.5 * scale * (1 + 1e-3) + 1e-4 * weight.abs().max()).all()


@pytest.mark.parametrize("spec", SPECS)
def test_dequantize_is_q_times_scale_plus_offset_in_float64(spec):
    spec = QuantSpec.parse(spec)
    q = quantize_weight(torch.randn(9, 200), spec)
    codes = q.codes().double()
    expected = torch.empty(9, 200, dtype=torch.float64)
    for n in range(9):
        for k in range(200):
            g = k // q.group_size
            scale = q.scales[n, g].double()
            if q.offsets is not None:
                offset = q.offsets[n, g].double()
            else:
                offset = -8 * scale if q.bits == 4 else 0.0
            expected[n, k] = codes[n, k] * scale + offset
    assert torch.allclose(q.dequantize(torch.float64), expected, rtol=1e-6, atol=1e-7)


def test_bytes_are_real():
    weight = torch.randn(576, 576)
    assert quantize_weight(weight, QuantSpec.parse("int8")).nbytes < 0.26 * weight.numel() * 4
    # int4 g128: 0.5 byte per weight + two float16 per 128 weights (asymmetric).
    assert quantize_weight(weight, QuantSpec.parse("int4-g128-asym")).nbytes <= 0.14 * weight.numel() * 4


def test_symmetric_int4_has_no_offsets_and_asymmetric_keeps_an_all_positive_group_exact_at_its_min():
    weight = torch.rand(4, 64) + 1.0
    sym = quantize_weight(weight, QuantSpec.parse("int4-g32"))
    asym = quantize_weight(weight, QuantSpec.parse("int4-g32-asym"))
    assert sym.offsets is None and asym.offsets is not None
    assert (asym.dequantize() - weight).abs().max() < (sym.dequantize() - weight).abs().max()


def test_cat_and_split_are_inverse():
    parts = [quantize_weight(torch.randn(n, 96), QuantSpec.parse("int4-g32-asym")) for n in (5, 3, 8)]
    joined = QuantizedWeight.cat(parts)
    assert joined.shape == (16, 96)
    for original, back in zip(parts, joined.split([5, 3, 8]), strict=True):
        assert torch.equal(original.dequantize(), back.dequantize())


@pytest.mark.parametrize(
    "text",
    [
        "int3",
        "int4-g48",
        "int4-g0",
        "int8-asym",
        "int4-x",
        "float8",
        "int4-g16",
        "int4-g64-g128",
        "int4-tensor-g128",
        "int4-g128-tensor",
        "int4-asym-asym",
        "int4-g\u00b2",
    ],
)
def test_bad_specs_are_refused(text):
    with pytest.raises(ConfigError):
        QuantSpec.parse(text)


def test_spec_names_round_trip():
    for text in SPECS:
        assert QuantSpec.parse(text).name == text
