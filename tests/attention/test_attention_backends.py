"""Every registered backend equals the reference backend; the reference equals dense softmax attention."""

import dataclasses
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from kvlab.attention.backends.base import gather_context
from kvlab.attention.backends.registry import get_backend, list_backends, register_backend
from kvlab.attention.metadata import AttentionMetadata
from kvlab.errors import ConfigError
from kvlab.kernels import cpu as cpu_kernels

# (cached_len, new_len) per request: the shapes every backend must agree on.
CASES = {
    "prefill_one": [(0, 11)],
    "decode_batch": [(9, 1), (4, 1), (16, 1), (0, 1)],
    "decode_one": [(13, 1)],
    "chunked_prefill_mixed": [(7, 5), (0, 9), (12, 1), (3, 6)],
    "long_tiles": [(21, 30)],
}
HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = [name for name in list_backends() if name not in ("auto", "reference")]


def run_backend(backend, query, new_keys, new_values, key_cache, value_cache, metadata):
    """The backend's output for CPU inputs, on CPU; a GPU backend (triton on a CUDA machine) gets
    copies of the inputs on the GPU."""
    device = "cuda" if backend.name == "triton" and torch.cuda.is_available() else "cpu"
    query, new_keys, new_values = (t.to(device) for t in (query, new_keys, new_values))
    key_cache, value_cache = key_cache.to(device, copy=True), value_cache.to(device, copy=True)
    metadata = dataclasses.replace(
        metadata,
        **{
            f.name: getattr(metadata, f.name).to(device)
            for f in dataclasses.fields(metadata)
            if isinstance(getattr(metadata, f.name), torch.Tensor)
        },
    )
    backend.write_kv(new_keys, new_values, key_cache, value_cache, metadata.slot_mapping)
    return backend.forward(query, key_cache, value_cache, metadata, 1 / math.sqrt(query.shape[-1])).cpu()


def make_backend(name, monkeypatch):
    if name == "triton":
        if not HAS_TRITON:
            pytest.skip("triton is not importable")
        if not torch.cuda.is_available() and not triton_interpreter_active():
            pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run tests/attention first")
        return get_backend("triton", block_m=16, block_n=16)
    if name == "tiled":
        return get_backend("tiled", block_m=8, block_n=8)  # small tiles: many tiles per request
    if name == "cpu_paged" and not cpu_kernels.available():
        pytest.skip(f"kvlab CPU kernels: {cpu_kernels.build_failure()}")
    return get_backend(name)


def triton_interpreter_active() -> bool:
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.zeros, InterpretedFunction)


def dense_attention(query, keys, values, positions_q, scale):
    """Textbook softmax(QK^T / sqrt(d) + causal) V on one contiguous sequence, head by head."""
    out = torch.empty_like(query)
    group = query.shape[1] // keys.shape[1]
    for h in range(query.shape[1]):
        k, v = keys[:, h // group], values[:, h // group]
        for row, pos in enumerate(positions_q):
            scores = (k[: pos + 1] @ query[row, h]) * scale
            out[row, h] = torch.softmax(scores, dim=0) @ v[: pos + 1]
    return out


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa2", "mqa"])
def test_reference_equals_dense_attention(paged_case, heads):
    requests = CASES["chunked_prefill_mixed"]
    query, new_k, new_v, key_cache, value_cache, metadata = paged_case(
        requests, num_heads=heads[0], num_kv_heads=heads[1]
    )
    out = run_backend(get_backend("reference"), query, new_k, new_v, key_cache, value_cache, metadata)
    # Rebuild each request's contiguous sequence by hand from the cache and the new K/V.
    scale = 1 / math.sqrt(query.shape[-1])
    row = 0
    for i, (cached, new) in enumerate(requests):
        table = metadata.block_tables[i].tolist()
        old_slots = [table[p // 4] * 4 + p % 4 for p in range(cached)]
        flat_k, flat_v = key_cache.flatten(0, 1), value_cache.flatten(0, 1)
        keys = torch.cat([flat_k[old_slots], new_k[row : row + new]])
        values = torch.cat([flat_v[old_slots], new_v[row : row + new]])
        expected = dense_attention(query[row : row + new], keys, values, range(cached, cached + new), scale)
        torch.testing.assert_close(out[row : row + new], expected, atol=1e-5, rtol=1e-5)
        row += new


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_backend_equals_reference(name, heads, case_name, paged_case, monkeypatch):
    backend = make_backend(name, monkeypatch)
    inputs = paged_case(CASES[case_name], num_heads=heads[0], num_kv_heads=heads[1])
    expected = run_backend(get_backend("reference"), *inputs)
    torch.testing.assert_close(run_backend(backend, *inputs), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case_name", ["chunked_prefill_mixed", "decode_batch", "decode_one"])
def test_backend_bfloat16_close_to_reference(name, case_name, paged_case, monkeypatch):
    backend = make_backend(name, monkeypatch)
    inputs = paged_case(CASES[case_name], dtype=torch.bfloat16, block_size=8)
    expected = run_backend(get_backend("reference"), *inputs)
    out = run_backend(backend, *inputs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("emulated", [True, False], ids=["float32-math", "half-math"])
@pytest.mark.parametrize("case_name", ["decode_batch", "decode_one"])
def test_sdpa_half_decode_in_either_precision_matches_reference(emulated, case_name, paged_case, monkeypatch):
    """On CPUs without native bf16 the sdpa backend decodes in float32; both branches run here."""
    monkeypatch.setattr("kvlab.attention.backends.sdpa.emulated_half", lambda x: emulated)
    inputs = paged_case(CASES[case_name], num_heads=6, num_kv_heads=2, dtype=torch.bfloat16, block_size=8)
    expected = run_backend(get_backend("reference"), *inputs)
    out = run_backend(get_backend("sdpa"), *inputs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)


def test_write_kv_fills_exactly_the_slots(paged_case):
    query, new_k, new_v, key_cache, value_cache, metadata = paged_case(CASES["chunked_prefill_mixed"])
    before = key_cache.clone()
    get_backend("reference").write_kv(new_k, new_v, key_cache, value_cache, metadata.slot_mapping)
    flat_before, flat_after = before.flatten(0, 1), key_cache.flatten(0, 1)
    torch.testing.assert_close(flat_after[metadata.slot_mapping], new_k)
    untouched = torch.ones(flat_after.shape[0], dtype=torch.bool)
    untouched[metadata.slot_mapping] = False
    assert torch.equal(flat_after[untouched], flat_before[untouched])


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ConfigError, match="valid names: .*reference.*sdpa.*tiled"):
        get_backend("flash9000")


def test_unknown_option_is_an_error():
    with pytest.raises(ConfigError, match="block_m"):
        get_backend("tiled", blockm=3)


def test_auto_picks_the_compiled_cpu_backend_and_falls_back_to_sdpa(monkeypatch):
    expected = "cpu_paged" if cpu_kernels.available() else "sdpa"
    assert get_backend("auto", device="cpu").name == expected
    monkeypatch.setattr(cpu_kernels, "build_failure", lambda: "no C++ compiler on PATH")
    assert get_backend("auto", device="cpu").name == "sdpa"
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler"):
        get_backend("cpu_paged")


def test_register_backend_twice_is_an_error():
    with pytest.raises(ConfigError, match="twice"):
        register_backend("reference")(type("Other", (), {}))


def test_single_sequence_with_consecutive_blocks_reads_a_view(paged_case):
    """The bs-1 fast path: consecutive blocks are read in place, and the answer is unchanged."""
    query, new_k, new_v, key_cache, value_cache, _ = paged_case([(13, 1)])
    metadata = AttentionMetadata.from_lists([1], [14], [[2, 3, 4, 5]], block_size=4)
    context = gather_context(key_cache, [2, 3, 4, 5], 14)
    assert context.data_ptr() == key_cache[2].data_ptr() and context.shape[0] == 14
    inputs = (query, new_k, new_v, key_cache, value_cache, metadata)
    expected = run_backend(get_backend("reference"), *inputs)
    torch.testing.assert_close(run_backend(get_backend("sdpa"), *inputs), expected, atol=2e-5, rtol=2e-5)


def test_metadata_rejects_inconsistent_requests():
    with pytest.raises(ValueError, match="inconsistent"):
        AttentionMetadata.from_lists([5], [4], [[1]], block_size=4)
    with pytest.raises(ValueError, match="blocks"):
        AttentionMetadata.from_lists([1], [9], [[1, 2]], block_size=4)


COMPILE_FOR_H100 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvlab.attention.backends.triton_paged import paged_attention_kernel as kernel

names = kernel.arg_names
types = ["*bf16"] * 4 + ["*i32"] * 3 + ["fp32"] + ["i32"] * 11
constants = dict(QUERIES_PER_KV=3, PAGE_SIZE=16, HEAD_DIM=64, HEAD_DIM_PAD=64, BLOCK_M=16, BLOCK_N=64,
                 DOT_PRECISION=None, UPCAST=False)
signature = dict(zip(names, types + ["constexpr"] * len(constants), strict=True))
source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()})
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
assert "cubin" in compiled.asm
"""


def test_triton_kernel_compiles_for_a_gpu():
    """No GPU is needed to compile: the kernel type-checks and lowers to sm_90 machine code
    (the interpreter tests above cannot catch compiled-mode-only errors)."""
    if not HAS_TRITON:
        pytest.skip("triton is not importable")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_H100], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
