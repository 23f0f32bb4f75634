"""The per-step description of a flattened batch that every attention backend reads.

Passed explicitly from the model runner to the model to each attention call; there is no global
forward context. Request i owns query rows `query_start_loc[i]:query_start_loc[i+1]`; those rows are
the last `query_len_i` tokens of its context of `seq_lens[i]` tokens, so the new token j of request
i sits at absolute position `seq_lens[i] - query_len_i + j` and attends causally to positions <= it.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(slots=True)
class AttentionMetadata:
    """Shapes: query_start_loc (num_reqs+1,) int32; seq_lens (num_reqs,) int32; block_tables
    (num_reqs, max_blocks_per_req) int32 (padding 0); slot_mapping (num_tokens,) int64 with
    slot = block_id * block_size + offset for each new token's K/V.

    Construction checks only shapes, dtypes and ints (no data-dependent checks: those would sync a GPU).
    """

    query_start_loc: Tensor
    seq_lens: Tensor
    block_tables: Tensor
    slot_mapping: Tensor
    max_query_len: int
    max_seq_len: int
    block_size: int

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        num_reqs = self.seq_lens.shape[0]
        if self.query_start_loc.shape != (num_reqs + 1,):
            raise ValueError(
                f"query_start_loc must have shape ({num_reqs + 1},) for {num_reqs} requests, "
                f"got {tuple(self.query_start_loc.shape)}"
            )
        if self.block_tables.dim() != 2 or self.block_tables.shape[0] != num_reqs:
            raise ValueError(
                f"block_tables must be (num_reqs={num_reqs}, max_blocks), "
                f"got {tuple(self.block_tables.shape)}"
            )
        if self.slot_mapping.dtype != torch.int64:
            raise ValueError(f"slot_mapping must be int64, got {self.slot_mapping.dtype}")
        if not 0 < self.max_query_len <= self.max_seq_len:
            raise ValueError(
                f"need 0 < max_query_len <= max_seq_len, got {self.max_query_len} and {self.max_seq_len}"
            )

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @property
    def is_decode_only(self) -> bool:
        """Every request has exactly one new token (the batched-decode fast paths key on this)."""
        return self.max_query_len == 1

    @classmethod
    def from_lists(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> "AttentionMetadata":
        """Build metadata from host lists (tests, simple runners). Request i's new tokens are the
        last query_lens[i] of its seq_lens[i] tokens; its slots come from its block table."""
        if not len(query_lens) == len(seq_lens) == len(block_tables):
            raise ValueError("query_lens, seq_lens and block_tables need one entry per request")
        starts, slots = [0], []
        for query_len, seq_len, table in zip(query_lens, seq_lens, block_tables, strict=True):
            if not 0 < query_len <= seq_len or len(table) * block_size < seq_len:
                raise ValueError(
                    f"request with query_len {query_len}, seq_len {seq_len} and {len(table)} blocks of "
                    f"{block_size} is inconsistent (need 0 < query_len <= seq_len <= blocks * block_size)"
                )
            starts.append(starts[-1] + query_len)
            new_positions = range(seq_len - query_len, seq_len)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in new_positions)
        width = max(len(table) for table in block_tables)
        padded = [table + [0] * (width - len(table)) for table in block_tables]
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=block_size,
        )
