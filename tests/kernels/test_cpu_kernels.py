"""The C++ CPU kernels (RMSNorm, RoPE, paged attention) equal torch references, check their inputs,
and kvlab works without them. The skinny GEMM and its calibration: test_skinny_gemm.py."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kvlab.attention.backends.registry import get_backend
from kvlab.kernels import cpu as cpu_kernels
from kvlab.rope import RotaryEmbedding

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason=f"kvlab CPU kernels: {cpu_kernels.build_failure()}"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [576, 100], ids=["whole-vectors", "vector-tail"])
def test_rms_norm_and_fused_add_equal_torch(dtype, hidden):
    """Rows of whole 8-lane vectors, and rows whose last 4 values take the kernel's scalar tail."""
    generator = torch.Generator().manual_seed(0)
    residual = torch.randn(7, hidden, generator=generator).to(dtype)
    x = torch.randn(7, hidden, generator=generator).to(dtype)
    weight = torch.randn(hidden, generator=generator).to(dtype)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(
        cpu_kernels.rms_norm(residual, weight, 1e-5),
        F.rms_norm(residual, (hidden,), weight, 1e-5),
        **tolerance,
    )
    summed = residual + x
    normed = cpu_kernels.add_rms_norm_(residual, x, weight, 1e-5)
    assert torch.equal(residual, summed)  # the residual stream is updated in place, rounded as torch's add
    torch.testing.assert_close(normed, F.rms_norm(summed, (hidden,), weight, 1e-5), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [64, 16], ids=["full", "partial"])
def test_rotary_in_place_on_a_strided_view_equals_the_torch_rotation(dtype, rotary_dim, monkeypatch):
    """q and k heads inside a fused QKV row (a strided view); the value part must stay untouched."""

    class Config:
        max_position_embeddings, rope_parameters = 64, {"rope_theta": 10000.0, "rope_type": "default"}

    rotary = RotaryEmbedding(Config, rotary_dim, dtype, torch.device("cpu"))
    qkv = torch.randn(5, 8 * 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    positions = torch.tensor([0, 3, 17, 40, 63])
    cos, sin = rotary.tables(positions)
    expected = qkv.clone()
    monkeypatch.setattr(cpu_kernels, "handles", lambda x: False)
    rotary.rotate_(expected[:, : 6 * 64].view(5, 6, 64), cos, sin)
    monkeypatch.undo()
    out = qkv.clone()
    cpu_kernels.rotary_(out[:, : 6 * 64].view(5, 6, 64), cos, sin)
    tolerance = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out, expected, **tolerance)
    assert torch.equal(out[:, 6 * 64 :], qkv[:, 6 * 64 :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_on_long_contexts_equals_reference(dtype, paged_case):
    """Contexts long enough that the work is split over threads; GQA groups of 3, head_dim 64."""
    import math

    inputs = paged_case(
        [(700, 1), (333, 1), (1, 1)], num_heads=6, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype
    )
    query, new_keys, new_values, key_cache, value_cache, metadata = inputs
    outputs = []
    for backend in (get_backend("reference"), get_backend("cpu_paged")):
        keys, values = key_cache.clone(), value_cache.clone()
        backend.write_kv(new_keys, new_values, keys, values, metadata.slot_mapping)
        outputs.append(backend.forward(query, keys, values, metadata, 1 / math.sqrt(64)))
    tolerance = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(outputs[1].float(), outputs[0].float(), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_split_along_one_long_context_equals_reference(dtype, paged_case):
    """One request's 3 kv heads on 2 threads: the op splits each context into shares (flash-decoding)
    and merges them; the result is the reference's, and within rounding of the unsplit one-thread run."""
    import math

    query, new_keys, new_values, key_cache, value_cache, metadata = paged_case(
        [(3000, 1)], num_heads=9, num_kv_heads=3, head_dim=64, block_size=16, dtype=dtype
    )
    reference, kernel = get_backend("reference"), get_backend("cpu_paged")
    reference.write_kv(new_keys, new_values, key_cache, value_cache, metadata.slot_mapping)
    expected = reference.forward(query, key_cache, value_cache, metadata, 1 / math.sqrt(64))
    threads = torch.get_num_threads()
    outputs = {}
    try:
        for count in (2, 1):
            torch.set_num_threads(count)
            outputs[count] = kernel.forward(query, key_cache, value_cache, metadata, 1 / math.sqrt(64))
    finally:
        torch.set_num_threads(threads)
    tolerance = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(outputs[2].float(), expected.float(), **tolerance)
    torch.testing.assert_close(outputs[2].float(), outputs[1].float(), **tolerance)


def test_without_the_kernels_kvlab_falls_back_to_torch():
    """KVLAB_CPU_KERNELS=0: reports say so, linear and auto attention use torch's kernels."""
    code = (
        "import torch\n"
        "from kvlab.kernels import cpu\n"
        "from kvlab.models.native import linear\n"
        "from kvlab.attention.backends.registry import get_backend\n"
        "x, w = torch.randn(2, 8), torch.randn(3, 8)\n"
        "assert torch.allclose(linear(x, w), x @ w.T)\n"
        "assert get_backend('auto', device='cpu').name == 'sdpa'\n"
        "print(cpu.describe())\n"
    )
    env = {**os.environ, "KVLAB_CPU_KERNELS": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "turned off by KVLAB_CPU_KERNELS=0" in result.stdout


def _paged_inputs(seq_len: int, table: list[int], num_blocks: int = 4, block_size: int = 4):
    """One request, one head of 8 dims, over `num_blocks` blocks; the table and length as given."""
    key_cache = torch.randn(num_blocks, block_size, 1, 8)
    return (
        torch.randn(1, 1, 8),
        key_cache,
        torch.randn_like(key_cache),
        torch.tensor([table], dtype=torch.int32),
        torch.tensor([seq_len], dtype=torch.int32),
        1.0,
    )


def test_paged_attention_rejects_an_empty_sequence():
    with pytest.raises(RuntimeError, match=r"seq_lens\[0\] = 0 .* >= 1 token"):
        cpu_kernels.paged_decode_attention(*_paged_inputs(0, [1, 2]))


def test_paged_attention_rejects_seq_len_beyond_table_capacity():
    """Two blocks of 4 hold 8 tokens; a 9th would be read from past the table row."""
    with pytest.raises(RuntimeError, match="exceeds its block table's capacity of 2 blocks x 4 = 8 tokens"):
        cpu_kernels.paged_decode_attention(*_paged_inputs(9, [1, 2]))


@pytest.mark.parametrize("block_id", [4, 1000, -1])
def test_paged_attention_rejects_block_id_out_of_range(block_id):
    with pytest.raises(
        RuntimeError, match=rf"block_tables\[0, 1\] = {block_id} is outside the cache's blocks \[0, 4\)"
    ):
        cpu_kernels.paged_decode_attention(*_paged_inputs(6, [1, block_id]))


def test_paged_attention_ignores_table_padding_past_the_sequence():
    """Entries past the blocks a request uses are padding (any value) and must not be rejected."""
    query, keys, values, _, _, scale = _paged_inputs(3, [2, 0])
    padded = torch.tensor([[2, 12345]], dtype=torch.int32)
    out = cpu_kernels.paged_decode_attention(
        query, keys, values, padded, torch.tensor([3], dtype=torch.int32), scale
    )
    k, v = keys[2, :3, 0], values[2, :3, 0]
    expected = torch.softmax(query[0] @ k.T, dim=-1) @ v
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("first", [0, 30, 34])
def test_paged_attention_equals_softmax_with_extreme_scores_anywhere(first):
    """Scores of 200, 199 and 150 at three adjacent positions among small ones, over 37 positions: the
    result is the float64 softmax only if the maximum subtracted before the exponentials saw those
    positions (at the start, across the end of a 32-wide pass, in the tail); one that missed them
    would saturate e^(s - max) and weigh them alike."""
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(10, 4, 1, 8, generator=generator)
    values = torch.randn_like(keys)
    query = torch.zeros(1, 1, 8)
    query[0, 0, 0] = 1.0
    for position, score in zip(range(first, first + 3), (200.0, 199.0, 150.0), strict=True):
        keys[position // 4, position % 4, 0, 0] = score
    table = torch.arange(10, dtype=torch.int32)[None]
    out = cpu_kernels.paged_decode_attention(
        query, keys, values, table, torch.tensor([37], dtype=torch.int32), 1.0
    )
    k, v = keys.reshape(40, 8)[:37].double(), values.reshape(40, 8)[:37].double()
    expected = torch.softmax(k @ query[0, 0].double(), dim=-1) @ v
    torch.testing.assert_close(out[0, 0].double(), expected, atol=1e-5, rtol=1e-5)


def test_rms_norm_rejects_a_non_contiguous_weight():
    x = torch.randn(3, 16)
    strided_weight = torch.randn(32)[::2]  # (16,) with stride 2: read with unit stride it is wrong
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        cpu_kernels.rms_norm(x, strided_weight, 1e-5)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        cpu_kernels.add_rms_norm_(x.clone(), x, strided_weight, 1e-5)


def test_paged_attention_rejects_metadata_of_the_wrong_rank_and_heads_it_cannot_divide():
    query, keys, values, table, _, scale = _paged_inputs(3, [1])
    with pytest.raises(RuntimeError, match=r"seq_lens \(B,\)"):  # it read a (B, 2) tensor flat
        cpu_kernels.paged_decode_attention(
            query, keys, values, table, torch.tensor([[3, 9]], dtype=torch.int32), scale
        )
    no_heads = keys[:, :, :0]
    with pytest.raises(RuntimeError, match="multiple"):  # a division by zero kv heads killed the process
        cpu_kernels.paged_decode_attention(
            query, no_heads, no_heads, table, torch.tensor([3], dtype=torch.int32), scale
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_of_a_nan_query_or_an_infinite_key_is_nan_as_the_softmax(dtype):
    # exp8's clamp turned a NaN score into e^88 and an infinite one into a mix of 0, +-inf and NaN.
    query, keys, values, table, lens, scale = _paged_inputs(6, [1, 2])
    query[0, 0, 0] = 1.0  # so the infinite key component gives a score of +inf
    bad_query = query.clone()
    bad_query[0, 0, 3] = float("nan")
    bad_keys = keys.clone()
    bad_keys[1, 2, 0, 0] = float("inf")
    for q, k in ((bad_query, keys), (query, bad_keys)):
        args = (q.to(dtype), k.to(dtype), values.to(dtype), table, lens, scale)
        assert cpu_kernels.paged_decode_attention(*args).float().isnan().all()


def test_rms_norm_and_rotary_take_empty_rows_and_heads():
    # Each divided by the row or head width to size its thread chunks (a SIGFPE at width 0).
    empty = torch.randn(2, 0)
    assert cpu_kernels.rms_norm(empty, torch.randn(0), 1e-5).shape == (2, 0)
    assert cpu_kernels.add_rms_norm_(empty.clone(), empty, torch.randn(0), 1e-5).shape == (2, 0)
    x = torch.randn(3, 0, 8)
    cpu_kernels.rotary_(x, torch.randn(3, 4), torch.randn(3, 4))
    x = torch.randn(3, 2, 8)
    before = x.clone()
    cpu_kernels.rotary_(x, torch.randn(3, 0), torch.randn(3, 0))
    assert torch.equal(x, before)


def test_rotary_refuses_a_view_whose_heads_share_memory():
    # An expanded view was rotated once per alias of the same values.
    x = torch.randn(1, 1, 8).expand(1, 4, 8)
    with pytest.raises(RuntimeError, match="more than one element"):
        cpu_kernels.rotary_(x, torch.randn(1, 4), torch.randn(1, 4))
