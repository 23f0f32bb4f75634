"""The two forward passes `kvlab.generate` can run, behind one small interface.

    path.prefill(input_ids) -> logits (batch, vocab) of each row's last prompt token
    path.decode(tokens)     -> logits (batch, vocab) after feeding one new token per row
    with path.hooks(): ...  -> the context generation runs in (a press cache's observation hooks)

`HFForward` calls the Hugging Face model with a transformers `Cache` (any cache: the preallocated
one, a KV-compression `PressCache`). `NativeForward` runs the model's engine-native twin
(kvlab/models/llama.py, gpt_neox.py), which shares the HF weights, over a static K/V buffer of
`batch x capacity` slots: one "block" per row, so the engine's attention backends read each row's
context as a view. It exists because at batch 1 the HF module tree's per-layer Python overhead is
a visible share of a decode step; measured in `results/static-cache/`.

A KV press runs natively where `native_press_support` allows (prefill-time presses, StreamingLLM
as a ring; kvlab/native_press.py) and on the HF modules through `PressCache` otherwise (presses that
score every decode eviction: h2o, tova; per-head budgets); the chosen path's `name` says which ran.

KV quantization (`kv_quant`) runs on the HF modules: its cache (`QuantizedCache`, KIVI's per-channel
keys with a full-precision residual window) is a transformers `Cache`, while the twin's static
buffer is a paged float cache whose backends read float blocks (the engine's quantized blocks,
kvlab/quant/paged_kv.py, are per-token and keep no residual).
"""

import contextlib

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from kvlab.attention.backends.registry import get_backend
from kvlab.attention.metadata import AttentionMetadata
from kvlab.cache import PreallocatedCache, kv_cache_bytes
from kvlab.errors import ConfigError
from kvlab.models.native import ARCHITECTURES, build_engine_model
from kvlab.native_press import NativePressCache, native_press_support
from kvlab.press.base import Press
from kvlab.press.budget import Budget
from kvlab.press.hf import PressCache
from kvlab.quant.kv_cache import QuantizedCache
from kvlab.quant.kv_quant import KVQuantSpec


class HFForward:
    """model(input_ids, cache=...) with positions and the left-padding mask of `model.generate`."""

    name = "hf"

    def __init__(
        self,
        model: PreTrainedModel,
        cache: Cache,
        attention_mask: Tensor | None,
        total: int,
        observe: bool = False,
    ):
        self.model, self.cache, self.attention_mask = model, cache, attention_mask
        self.observe = observe  # a PressCache built here: its observation hooks are ours to install
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

    def hooks(self) -> contextlib.AbstractContextManager:
        """Where generation runs: inside the press cache's observation hooks when this path built it."""
        return self.cache.hooks(self.model) if self.observe else contextlib.nullcontext()


class NativeForward:
    """The engine-native twin over a static buffer. Left padding is dropped, not masked: row r's
    real tokens occupy slots r * capacity + [0, len_r), at positions 0..len_r - 1 as in HF.

    With a press (`kvlab.native_press`), each layer keeps its own budget-sized buffer, filled by
    compression inside the prefill forward; a slot then no longer equals a position, so the two are
    tracked apart: `positions` (true RoPE position of each row's next token) and the cache's slots.
    """

    name = "native"

    def __init__(
        self,
        model: PreTrainedModel,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        max_new: int,
        press: Press | None = None,
        budget: Budget | None = None,
    ):
        self.engine_model = build_engine_model(model, fuse_projections=False)
        self.device = input_ids.device
        batch, prompt_len = input_ids.shape
        if attention_mask is None:
            self.lengths = [prompt_len] * batch
        else:
            self.lengths = attention_mask.sum(-1).tolist()
        # Positions past the model's context are untrained but computable (HF computes RoPE on the
        # fly); a bounded press cache may stream there, so the tables cover every position fed.
        self.engine_model.rotary.reserve(max(self.lengths) + max_new)
        self.backend = get_backend("auto", self.device)
        self.press_cache = None
        if press is not None:
            self.press_cache = NativePressCache(self.engine_model, press, budget, self.lengths, max_new)
            self.kv_caches = self.press_cache.kv_caches
        else:
            # The last sampled token is never fed back, so a row holds at most len + max_new - 1 tokens.
            self.capacity = max(self.lengths) + max_new - 1
            self.kv_caches = self.engine_model.allocate_kv_caches(num_blocks=batch, block_size=self.capacity)
            self.row_start = torch.arange(batch, device=self.device) * self.capacity
        # Decode metadata that never changes: one query per row, row r owns block r.
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=self.device)
        self.block_tables = torch.arange(batch, dtype=torch.int32, device=self.device)[:, None]
        self.positions = torch.tensor(self.lengths, device=self.device)  # of the next token fed
        self.host_positions = list(self.lengths)
        self.decode_metadata = None if self.press_cache is not None else self._decode_metadata()
        self.logits_variant: str | None = None  # decided on the first decode step ("": op by op)

    def _decode_metadata(self) -> AttentionMetadata:
        """The metadata of the first decode step, which each step then advances in place: without a
        press, row r's token at position p goes to slot p of block r. Rebuilt every step, its tensors and
        checks cost ~70 us per token, cold after the step streamed the weights through the caches."""
        # positions and slots are rows of one tensor, so one add moves both
        state = torch.stack([self.positions, self.row_start + self.positions])
        self.positions, slots = state[0], state[1]
        self.step_state = state
        return AttentionMetadata(
            query_start_loc=self.query_start_loc,
            seq_lens=(self.positions + 1).int(),
            block_tables=self.block_tables,
            slot_mapping=slots,
            max_query_len=1,
            max_seq_len=max(self.lengths) + 1,
            block_size=self.capacity,
        )

    def prefill(self, input_ids: Tensor) -> Tensor:
        batch, prompt_len = input_ids.shape
        lengths = self.lengths
        flat = torch.cat([input_ids[row, prompt_len - n :] for row, n in enumerate(lengths)])
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        if self.press_cache is not None:
            metadata, backend = self.press_cache.prefill(self.backend)
        else:
            metadata = AttentionMetadata.from_lists(
                lengths, lengths, [[row] for row in range(batch)], self.capacity, self.device
            )
            backend = self.backend
        hidden = self.engine_model(flat, positions, self.kv_caches, metadata, backend)
        return self.engine_model.compute_logits(hidden[metadata.query_start_loc[1:].long() - 1])

    def decode(self, tokens: Tensor) -> Tensor:
        if self.press_cache is not None:
            metadata, backend = self.press_cache.decode(self.host_positions, self.backend)
            logits = self.engine_model.decode_logits(
                tokens, self.positions, self.kv_caches, metadata, backend
            )
            self.positions = self.positions + 1
            self.host_positions = [p + 1 for p in self.host_positions]
            return logits
        metadata = self.decode_metadata
        if self.logits_variant is None:  # every step of a generation has the first one's shape
            self.logits_variant = (
                self.engine_model.decode_logits_variant(tokens, self.kv_caches, metadata, self.backend) or ""
            )
        if self.logits_variant:
            logits = self.engine_model.fused_decode_logits(
                tokens, self.positions, self.kv_caches, metadata, self.backend, self.logits_variant
            )
        else:
            logits = self.engine_model.decode_logits(
                tokens, self.positions, self.kv_caches, metadata, self.backend
            )
        self.step_state.add_(1)  # positions and slots
        metadata.seq_lens.add_(1)
        metadata.max_seq_len += 1
        return logits

    @property
    def cache_bytes(self) -> int:
        if self.press_cache is not None:
            return self.press_cache.cache_bytes
        # numel, not the storage: the caches are views of one huge-page arena (allocate_kv_caches)
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv_caches)

    def hooks(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def check_left_padding(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> None:
    """An attention mask as `model.generate` takes it: input_ids' shape, 0 / 1, zeros (padding) only
    before the ones of each row, and at least one token per row."""
    if attention_mask.shape != input_ids.shape:
        raise ConfigError(
            f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ConfigError("attention_mask must hold only 0 (padding) and 1")
    if not bool((attention_mask[:, 1:] >= attention_mask[:, :-1]).all()):
        raise ConfigError("attention_mask must be left padding (zeros before ones in every row)")
    if not bool(attention_mask[:, -1].all()):
        raise ConfigError("every row of attention_mask needs at least one token (a 1)")


def select_forward(
    model: PreTrainedModel,
    input_ids: Tensor,
    max_new: int,
    *,
    cache: Cache | None,
    attention_mask: Tensor | None,
    path: str,
    press: Press | None = None,
    budget: Budget | None = None,
    kv_quant: KVQuantSpec | str | None = None,
) -> HFForward | NativeForward:
    """ "auto": native when the caller passed no cache, the architecture has a twin and the press
    (if any) runs natively (`native_press_support`); else HF with `cache`, a `PressCache` for the
    press, or a `PreallocatedCache` sized for the request."""
    if path not in ("auto", "native", "hf"):
        raise ConfigError(f"unknown forward path {path!r}; choose auto, native or hf")
    if attention_mask is not None:
        check_left_padding(attention_mask, input_ids)
    if path == "native" and cache is not None:
        raise ConfigError("the native path keeps its own static K/V buffer; pass cache=None or path='hf'")
    why_not_native = None if model.config.model_type in ARCHITECTURES else "no engine-native twin"
    kv_quant = KVQuantSpec.parse(kv_quant)
    if kv_quant is not None:
        if cache is not None:
            raise ConfigError("give kv_quant (kvlab builds a quantized cache) or a cache, not both")
        why_not_native = "KV quantization runs on the HF modules (QuantizedCache)"
    if press is not None:
        if cache is not None:
            raise ConfigError("give a press (kvlab builds its cache) or a cache, not both")
        if budget is None:
            raise ConfigError(
                "a press needs a budget: Budget(max_cache_tokens=...) or Budget(compression_ratio=...)"
            )
        for n in {input_ids.shape[1]} if attention_mask is None else set(attention_mask.sum(-1).tolist()):
            budget.layers(
                press, model.config.num_hidden_layers, n
            )  # a budget the press cannot run fails here
        why_not_native = why_not_native or native_press_support(press)
    elif budget is not None:
        raise ConfigError("budget is the press's token budget; it needs a press")
    if path == "native" and why_not_native is not None:
        raise ConfigError(f"the native path cannot run this request: {why_not_native}")
    if path == "native" or (path == "auto" and cache is None and why_not_native is None):
        try:
            return NativeForward(model, input_ids, attention_mask, max_new, press, budget)
        except ConfigError:
            if path == "native":
                raise  # auto falls back to HF where the twin cannot run (e.g. dynamic RoPE)
    total = input_ids.shape[1] + max_new
    if press is not None:
        if attention_mask is not None and not bool(attention_mask.all()):
            # A PressCache counts positions and budgets from a row's first slot, padding included.
            raise ConfigError(
                f"{press.describe()} on the HF modules takes batches without padding; run the rows one "
                "at a time (the native path runs padded batches for the presses it supports)"
            )
        cache = PressCache(press, model, budget=budget, kv_quant=kv_quant)
        return HFForward(model, cache, attention_mask, total, observe=True)
    if kv_quant is not None:
        cache = QuantizedCache(model.config.num_hidden_layers, kv_quant)
    if cache is None:
        # The last sampled token is never fed back, so the cache holds total - 1 positions.
        cache = PreallocatedCache(model.config.num_hidden_layers, total - 1)
    return HFForward(model, cache, attention_mask, total)
