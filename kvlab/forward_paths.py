"""The two forward passes `kvlab.generate` can run, behind one small interface.

    path.prefill(input_ids) -> logits (batch, vocab) of each row's last prompt token
    path.decode(tokens)     -> logits (batch, vocab) after feeding one new token per row

`HFForward` calls the Hugging Face model with a transformers `Cache` (any cache: the preallocated
one, a KV-compression `PressCache`). `NativeForward` runs the model's engine-native twin
(kvlab/models/llama.py, gpt_neox.py), which shares the HF weights, over a static K/V buffer of
`batch x capacity` slots: one "block" per row, so the engine's attention backends read each row's
context as a view. It exists because at batch 1 the HF module tree's per-layer Python overhead is
a visible share of a decode step; measured in `results/static-cache/`.
"""

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from kvlab.attention.backends.registry import get_backend
from kvlab.attention.metadata import AttentionMetadata
from kvlab.cache import PreallocatedCache, kv_cache_bytes
from kvlab.errors import ConfigError
from kvlab.models.native import ARCHITECTURES, build_engine_model


class HFForward:
    """model(input_ids, cache=...) with positions and the left-padding mask of `model.generate`."""

    name = "hf"

    def __init__(self, model: PreTrainedModel, cache: Cache, attention_mask: Tensor | None, total: int):
        self.model, self.cache, self.attention_mask = model, cache, attention_mask
        self.mask = None  # the prompt's mask extended with ones for every generated token
        if attention_mask is not None:
            batch, prompt_len = attention_mask.shape
            self.mask = attention_mask.new_ones(batch, total)
            self.mask[:, :prompt_len] = attention_mask
        self.length = 0
        self.position: Tensor | None = None

    def _forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        self.length += input_ids.shape[1]
        return self.model(
            input_ids=input_ids,
            attention_mask=None if self.mask is None else self.mask[:, : self.length],
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]

    def prefill(self, input_ids: Tensor) -> Tensor:
        # Positions follow model.generate: count only real (unpadded) tokens.
        if self.attention_mask is not None:
            positions = (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(
                input_ids.shape[0], -1
            )
        self.position = positions[:, -1:] + 1
        return self._forward(input_ids, positions)

    def decode(self, tokens: Tensor) -> Tensor:
        logits = self._forward(tokens[:, None], self.position)
        self.position = self.position + 1
        return logits

    @property
    def cache_bytes(self) -> int:
        return kv_cache_bytes(self.cache)


class NativeForward:
    """The engine-native twin over a static buffer. Left padding is dropped, not masked: row r's
    real tokens occupy slots r * capacity + [0, len_r), at positions 0..len_r - 1 as in HF."""

    name = "native"

    def __init__(
        self, model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor | None, max_new: int
    ):
        self.engine_model = build_engine_model(model, fuse_projections=False)
        self.device = input_ids.device
        batch, prompt_len = input_ids.shape
        if attention_mask is None:
            self.lengths = [prompt_len] * batch
        else:
            if not torch.equal(attention_mask, attention_mask.sort(dim=-1).values):
                raise ConfigError("attention_mask must be left padding (zeros before ones in every row)")
            self.lengths = attention_mask.sum(-1).tolist()
        # The last sampled token is never fed back, so a row holds at most len + max_new - 1 tokens.
        self.capacity = max(self.lengths) + max_new - 1
        self.backend = get_backend("auto", self.device)
        self.kv_caches = self.engine_model.allocate_kv_caches(num_blocks=batch, block_size=self.capacity)
        # Decode metadata that never changes: one query per row, row r owns block r.
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=self.device)
        self.block_tables = torch.arange(batch, dtype=torch.int32, device=self.device)[:, None]
        self.row_start = torch.arange(batch, device=self.device) * self.capacity
        self.positions = torch.tensor(self.lengths, device=self.device)  # of the next token fed
        self.max_seq_len = max(self.lengths)

    def prefill(self, input_ids: Tensor) -> Tensor:
        batch, prompt_len = input_ids.shape
        lengths = self.lengths
        flat = torch.cat([input_ids[row, prompt_len - n :] for row, n in enumerate(lengths)])
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        metadata = AttentionMetadata.from_lists(
            lengths, lengths, [[row] for row in range(batch)], self.capacity, self.device
        )
        hidden = self.engine_model(flat, positions, self.kv_caches, metadata, self.backend)
        return self.engine_model.compute_logits(hidden[metadata.query_start_loc[1:].long() - 1])

    def decode(self, tokens: Tensor) -> Tensor:
        self.max_seq_len += 1
        metadata = AttentionMetadata(
            query_start_loc=self.query_start_loc,
            seq_lens=(self.positions + 1).int(),
            block_tables=self.block_tables,
            slot_mapping=self.row_start + self.positions,
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            block_size=self.capacity,
        )
        hidden = self.engine_model(tokens, self.positions, self.kv_caches, metadata, self.backend)
        self.positions = self.positions + 1
        return self.engine_model.compute_logits(hidden)

    @property
    def cache_bytes(self) -> int:
        return sum(k.untyped_storage().nbytes() + v.untyped_storage().nbytes() for k, v in self.kv_caches)


def select_forward(
    model: PreTrainedModel,
    input_ids: Tensor,
    max_new: int,
    *,
    cache: Cache | None,
    attention_mask: Tensor | None,
    path: str,
) -> HFForward | NativeForward:
    """ "auto": native when the caller passed no cache and the architecture has a twin; else HF with
    `cache`, or a `PreallocatedCache` sized for the request."""
    if path not in ("auto", "native", "hf"):
        raise ConfigError(f"unknown forward path {path!r}; choose auto, native or hf")
    if path == "native" and cache is not None:
        raise ConfigError("the native path keeps its own static K/V buffer; pass cache=None or path='hf'")
    if path == "native" or (path == "auto" and cache is None and model.config.model_type in ARCHITECTURES):
        try:
            return NativeForward(model, input_ids, attention_mask, max_new)
        except ConfigError:
            if path == "native":
                raise  # auto falls back to HF where the twin cannot run (e.g. dynamic RoPE)
    total = input_ids.shape[1] + max_new
    if cache is None:
        # The last sampled token is never fed back, so the cache holds total - 1 positions.
        cache = PreallocatedCache(model.config.num_hidden_layers, total - 1)
    return HFForward(model, cache, attention_mask, total)
