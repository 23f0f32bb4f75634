"""Triton paged attention for CUDA: one kernel for prefill, chunked prefill and decode.

Each program owns (request, query tile of BLOCK_M rows, query head) and streams the request's
context in BLOCK_N-position tiles, reading each key/value row straight from the page named by the
block table, with the FlashAttention-2 online softmax (Dao 2023, Alg. 1; see tiled.py for the
recurrence). Tiles past the tile's last query position are never visited (causal early exit).
On CPU it runs under Triton's interpreter, which is how the tests check it: TRITON_INTERPRET=1 must
be set before triton is first imported (triton jits its own library functions at import).
"""

import os

import torch
from torch import Tensor

from kvlab.attention.backends.base import AttentionBackend
from kvlab.attention.backends.registry import register_backend
from kvlab.attention.metadata import AttentionMetadata

try:
    import triton
    import triton.language as tl
except ImportError:  # the backend reports itself unavailable
    triton = None


def triton_importable() -> bool:
    return triton is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:

    @triton.jit
    def paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
        scale,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        QUERIES_PER_KV: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        req = tl.program_id(0)
        tile_m = tl.program_id(1)
        head = tl.program_id(2)
        q_start = tl.load(query_start_loc_ptr + req)
        q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
        if tile_m * BLOCK_M < q_len:
            seq_len = tl.load(seq_lens_ptr + req)
            context_len = seq_len - q_len
            kv_head = head // QUERIES_PER_KV

            offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, HEAD_DIM_PAD)
            row_ok = offs_m < q_len
            dim_ok = offs_d < HEAD_DIM
            q_rows = (q_start + offs_m).to(tl.int64)
            q = tl.load(
                q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0,
            )
            if UPCAST:  # the interpreter's tl.dot mishandles bfloat16/float16 operands
                q = q.to(tl.float32)
            query_pos = context_len + offs_m

            row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
            row_sum = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
            kv_end = tl.minimum(seq_len, context_len + (tile_m + 1) * BLOCK_M)
            for n0 in range(0, kv_end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                col_ok = offs_n < kv_end
                pages = tl.load(
                    block_tables_ptr + req * stride_bt + offs_n // PAGE_SIZE, mask=col_ok, other=0
                )
                in_page = offs_n % PAGE_SIZE
                kv_mask = col_ok[:, None] & dim_ok[None, :]
                k_rows = pages.to(tl.int64) * stride_kb + in_page * stride_ks + kv_head * stride_kh
                keys = tl.load(k_cache_ptr + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
                if UPCAST:
                    keys = keys.to(tl.float32)
                scores = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION) * scale
                visible = (offs_n[None, :] <= query_pos[:, None]) & col_ok[None, :]
                scores = tl.where(visible, scores, float("-inf"))
                new_max = tl.maximum(row_max, tl.max(scores, 1))
                # Padding rows (beyond q_len) can be fully masked; keep their exponents finite.
                safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
                probs = tl.exp(scores - safe_max[:, None])
                correction = tl.exp(row_max - safe_max)
                row_sum = row_sum * correction + tl.sum(probs, 1)
                v_rows = pages.to(tl.int64) * stride_vb + in_page * stride_vs + kv_head * stride_vh
                values = tl.load(v_cache_ptr + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
                if UPCAST:
                    values = values.to(tl.float32)
                acc = acc * correction[:, None] + tl.dot(
                    probs.to(values.dtype), values, input_precision=DOT_PRECISION
                )
                row_max = new_max
            acc = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
            tl.store(
                out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                acc.to(out_ptr.dtype.element_ty),
                mask=row_ok[:, None] & dim_ok[None, :],
            )


@register_backend("triton")
class TritonPagedBackend(AttentionBackend):
    def __init__(self, block_m: int = 0, block_n: int = 64, float32_dot: str = "tf32x3") -> None:
        """block_m = 0 picks 16 for decode batches and up to 64 for prefill. Both must be powers of
        two, and at least 16 on a GPU (tl.dot's minimum). float32_dot: how float32 tiles multiply on
        the GPU: "ieee" (CUDA cores) or "tf32x3" (three TF32 tensor-core products whose error is
        near float32's); never plain TF32."""
        if float32_dot not in ("ieee", "tf32x3"):
            raise ValueError(f"float32_dot must be 'ieee' or 'tf32x3', got {float32_dot!r}")
        self.float32_dot = float32_dot
        for name, value in (("block_m", block_m), ("block_n", block_n)):
            if value < 0 or (value and value & (value - 1)):
                raise ValueError(f"{name} must be 0 (auto) or a power of two, got {value}")
        if block_n == 0:
            raise ValueError("block_n must be a positive power of two")
        self.block_m = block_m
        self.block_n = block_n

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        return triton_importable() and (device.type == "cuda" or interpreting())

    def forward(
        self, query: Tensor, key_cache: Tensor, value_cache: Tensor, metadata: AttentionMetadata, scale: float
    ) -> Tensor:
        num_tokens, num_heads, head_dim = query.shape
        num_kv_heads = key_cache.shape[2]
        if query.stride(-1) != 1 or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
            raise ValueError("query and caches must be contiguous in head_dim")
        block_m = self.block_m or min(64, max(16, 1 << (metadata.max_query_len - 1).bit_length()))
        output = torch.empty_like(query)
        grid = (metadata.num_reqs, -(-metadata.max_query_len // block_m), num_heads)
        paged_attention_kernel[grid](
            query, key_cache, value_cache, output,
            metadata.block_tables, metadata.query_start_loc, metadata.seq_lens,
            scale,
            query.stride(0), query.stride(1), output.stride(0), output.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
            metadata.block_tables.stride(0),
            QUERIES_PER_KV=num_heads // num_kv_heads,
            PAGE_SIZE=metadata.block_size,
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=max(16, 1 << (head_dim - 1).bit_length()),
            BLOCK_M=block_m,
            BLOCK_N=self.block_n,
            # fp32 must not silently become tf32 on the GPU; 16-bit inputs use the native MMA.
            DOT_PRECISION="ieee" if interpreting() else self.float32_dot if query.dtype == torch.float32 else None,
            UPCAST=interpreting(),
        )  # fmt: skip
        return output
