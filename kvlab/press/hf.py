"""`PressCache`: a transformers `Cache` that runs a press inside `update()`, so the saving is physical.

    cache = PressCache(get_press("h2o"), model, max_cache_tokens=256)
    with cache.hooks(model):                 # observation hooks, removed on exit
        out = model.generate(ids, cache=cache, max_new_tokens=64)
        # or: kvlab.generate(model, ids, 64, cache=cache)

Presses that need neither queries nor per-layer/per-head masks (streaming_llm, knorm, random) also
work without `hooks()`; the others raise `ConfigError` there.

Per layer, per forward of q_len new tokens (candidates = cached slots + new tokens):
- decode-evicting press, q_len == 1, cache full: the press names one slot to free and the new token
  is written into it -- O(1) copies, K/V stay one buffer of exactly the budget (ring buffer for
  StreamingLLM). Attention this step runs over the budget.
- otherwise: attention runs over all candidates; if they exceed the budget (on the first forward
  for prefill-time presses, on any forward for decode-evicting ones) the kept slots are gathered
  into new, smaller storage afterwards. Kept slots are stored in position order.
Positions are counted per layer from 0 (batches without left padding).

`kv_quant="int8" | "int4"` (or a `KVQuantSpec`) stores the kept K/V quantized between forwards
(kvlab/quant/press_kv.py): compressed and quantized bytes.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from kvlab.errors import ConfigError
from kvlab.models.adapters import Adapter, get_adapter, observe
from kvlab.press.base import Observations, Press
from kvlab.press.budget import Budget
from kvlab.press.wrappers import KeyRerotationPress
from kvlab.quant.kv_quant import KVQuantSpec


class PressLayer(CacheLayerMixin):
    """One layer: keys/values (batch, kv_heads, capacity, head_dim), the first `length` slots filled."""

    is_sliding = False
    is_croppable = False

    def __init__(self, cache: "PressCache", layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.length = 0  # filled slots
        self.seen = 0  # tokens ever appended (next true position)
        self.num_evicted = 0
        self.budget: int | None = None
        self.positions: torch.Tensor | None = None  # (batch, kv_heads, length) RoPE position of each slot
        self.valid: torch.Tensor | None = None  # (batch, kv_heads, length) bool, per-head budgets only
        self.state: dict[str, torch.Tensor] = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        """Forget everything (a new request); the budget is resolved again on the next forward."""
        self.keys = self.values = self.positions = self.valid = None
        self.length = self.seen = self.num_evicted = 0
        self.budget, self.state = None, {}

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.next_kv_length(query_length), 0

    def is_ring_step(self, q_len: int) -> bool:
        press = self.cache.press
        return (
            press.evicts_during_decode
            and q_len == 1
            and self.budget is not None
            and self.length >= self.budget
        )

    def next_kv_length(self, q_len: int) -> int:
        """Keys the attention of the next forward of q_len tokens will see."""
        return self.length if self.is_ring_step(q_len) else self.length + q_len

    def _observations(self, new_pos: torch.Tensor, q_len: int) -> Observations:
        old = self.positions[..., : self.length] if self.positions is not None else new_pos[..., :0]
        cache = self.cache
        return Observations(
            positions=torch.cat((old, new_pos), dim=-1),
            num_new=q_len,
            queries=cache.take_queries(self.layer_idx),
            scaling=cache.adapter.scaling,
            rotary=cache.adapter.rotary,
            state=self.state,
            num_evicted=self.num_evicted,
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, q_len, _ = key_states.shape
        new_pos = torch.arange(self.seen, self.seen + q_len, device=key_states.device).expand(
            batch, heads, q_len
        )
        first_forward = self.seen == 0
        self.seen += q_len
        if self.budget is None:
            self.budget = self.cache.layer_budget(self.layer_idx, q_len)
        obs = self._observations(new_pos, q_len)
        if self.is_ring_step(q_len):
            return self._ring_step(key_states, value_states, obs)
        return self._append(
            key_states, value_states, obs, compress=first_forward or self.cache.press.evicts_during_decode
        )

    def _ring_step(self, key: torch.Tensor, value: torch.Tensor, obs: Observations):
        press, budget = self.cache.press, self.budget
        if press.scores_candidates:
            cand_k = torch.cat((self.keys, key), dim=-2)
            cand_v = torch.cat((self.values, value), dim=-2)
        else:
            cand_k, cand_v = self.keys, self.values
        if obs.queries is not None:
            obs.state = press.update_state(self.layer_idx, cand_k, obs)
        slot = press.evict_slot(self.layer_idx, cand_k, cand_v, obs, budget)
        new_pos = obs.positions[..., -1:]
        if isinstance(slot, int):
            self.keys[:, :, slot] = key[:, :, 0]
            self.values[:, :, slot] = value[:, :, 0]
            self.positions[..., slot] = new_pos[..., 0]
            self.state = {name: _put(s[..., :-1], slot, s[..., -1:]) for name, s in obs.state.items()}
        else:
            index = slot[..., None, None].expand(-1, -1, 1, key.shape[-1])
            self.keys.scatter_(2, index, key)
            self.values.scatter_(2, index, value)
            self.positions.scatter_(-1, slot[..., None], new_pos)
            self.state = {
                name: s[..., :-1].scatter(-1, slot[..., None], s[..., -1:]) for name, s in obs.state.items()
            }
        self.num_evicted += 1
        self._reposition()
        return self.keys, self.values

    def _append(self, key: torch.Tensor, value: torch.Tensor, obs: Observations, compress: bool):
        press, budget, q_len = self.cache.press, self.budget, key.shape[-2]
        start, n = self.length, self.length + q_len
        if (
            self.keys is not None
            and press.evicts_during_decode
            and self.keys.shape[-2] == budget
            and n <= budget
        ):
            # Filling the budget-sized buffer: write in place, no concatenation.
            self.keys[:, :, start:n] = key
            self.values[:, :, start:n] = value
            keys, values = self.keys[:, :, :n], self.values[:, :, :n]
        elif start:
            keys = torch.cat((self.keys[:, :, :start], key), dim=-2)
            values = torch.cat((self.values[:, :, : self.length], value), dim=-2)
        else:
            keys, values = key, value
        if obs.queries is not None:
            obs.state = press.update_state(self.layer_idx, keys, obs)
        valid = None
        if self.valid is not None:
            valid = torch.cat((self.valid, self.valid.new_ones(*self.valid.shape[:2], q_len)), dim=-1)
        positions, state = obs.positions, obs.state
        if compress and n > budget:
            selection = press.keep(self.layer_idx, keys, values, obs, budget)
            # Store kept slots in position order (the ring buffer of StreamingLLM relies on it).
            order = positions.gather(-1, selection.indices).argsort(dim=-1)
            indices = selection.indices.gather(-1, order)
            gather = indices[..., None].expand(-1, -1, -1, keys.shape[-1])
            kept_k, kept_v = keys.gather(2, gather), values.gather(2, gather)
            positions = positions.gather(-1, indices)
            state = {name: s.gather(-1, indices) for name, s in state.items()}
            valid = None if selection.valid is None else selection.valid.gather(-1, order)
            self.num_evicted = 0
        else:
            kept_k, kept_v = keys, values
        self._store(kept_k, kept_v, positions, valid, state)
        if kept_k is not keys:
            self._reposition()
        return keys, values  # this forward attends to every candidate; the eviction applies afterwards

    def _store(self, keys, values, positions, valid, state) -> None:
        length = keys.shape[-2]
        if self.cache.press.evicts_during_decode and length <= self.budget:
            # One buffer of exactly the budget, written in place from now on.
            if self.keys is None or self.keys.shape[-2] != self.budget:
                shape = (*keys.shape[:2], self.budget, keys.shape[-1])
                self.keys, self.values = keys.new_zeros(shape), values.new_zeros(shape)
                self.positions = positions.new_zeros(shape[:3])
            if keys.data_ptr() != self.keys.data_ptr():
                self.keys[:, :, :length] = keys
                self.values[:, :, :length] = values
            self.positions[..., :length] = positions
        else:
            self.keys, self.values, self.positions = keys, values, positions
        self.length, self.valid, self.state = length, valid, state

    def _reposition(self) -> None:
        n = self.length
        current = self.keys[:, :, :n]
        keys, positions = self.cache.press.reposition(
            current, self.positions[..., :n], self.cache.adapter.rotary
        )
        if keys is not current:
            self.keys[:, :, :n] = keys
            self.positions[..., :n] = positions


def _put(tensor: torch.Tensor, slot: int, value: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[..., slot : slot + 1] = value
    return tensor


class PressCache(Cache):
    """A transformers `Cache` whose layers keep only what `press` selects, within a token budget.

    Budget: `max_cache_tokens` (per layer, average over layers for PyramidKV) or `compression_ratio`
    (fraction of the first forward's tokens removed, kvpress' convention); exactly one, or a
    `Budget` object (`budget=`), which resolves every layer's count (kvlab.press.budget).
    """

    def __init__(
        self,
        press: Press,
        model: nn.Module,
        *,
        max_cache_tokens: int | None = None,
        compression_ratio: float | None = None,
        budget: Budget | None = None,
        kv_quant: KVQuantSpec | str | None = None,
    ):
        if budget is None:
            budget = Budget(max_cache_tokens, compression_ratio)
        elif max_cache_tokens is not None or compression_ratio is not None:
            raise ConfigError("give a Budget or max_cache_tokens / compression_ratio, not both")
        self.press = press
        self.adapter: Adapter = get_adapter(model)
        self.budget = budget
        self.max_cache_tokens = budget.max_cache_tokens
        self.compression_ratio = budget.compression_ratio
        self._layer_budgets: tuple[int, tuple[int, ...]] | None = None  # (first forward's n, per layer)
        self._queries: dict[int, torch.Tensor] = {}
        self._observing = False
        self.kv_quant = KVQuantSpec.parse(kv_quant)
        if self.kv_quant is None:
            layers = [PressLayer(self, i) for i in range(self.adapter.num_layers)]
        else:
            if _rewrites_kept_keys(press):
                raise ConfigError(
                    f"{press.describe()} rewrites kept keys every step; it cannot store them quantized"
                )
            # Imported here: the quantized layer subclasses PressLayer, defined above.
            from kvlab.quant.press_kv import QuantizedPressLayer

            layers = [QuantizedPressLayer(self, i, self.kv_quant) for i in range(self.adapter.num_layers)]
        super().__init__(layers=layers)

    def layer_budget(self, layer_idx: int, first_forward_len: int) -> int:
        """Tokens layer `layer_idx` keeps for a first forward of `first_forward_len` tokens (ConfigError
        when the press cannot run that budget); resolved once per length for all layers."""
        if self._layer_budgets is None or self._layer_budgets[0] != first_forward_len:
            budgets = self.budget.layers(self.press, self.adapter.num_layers, first_forward_len)
            self._layer_budgets = (first_forward_len, budgets)
        return self._layer_budgets[1][layer_idx]

    def take_queries(self, layer_idx: int) -> torch.Tensor | None:
        queries = self._queries.pop(layer_idx, None)
        if not self._observing and (self.press.needs_queries or self.press.needs_mask_hook):
            raise ConfigError(
                f"{self.press.describe()} observes queries or fixes masks: "
                "run the model inside `with cache.hooks(model):`"
            )
        return queries

    @contextmanager
    def hooks(self, model: nn.Module) -> Iterator["PressCache"]:
        """Install observation hooks on `model` for the block; they are removed on exit, even on error."""
        on_queries = self._queries.__setitem__ if self.press.needs_queries else None
        try:
            with observe(model, on_queries=on_queries, on_mask=self._attention_mask):
                self._observing = True
                yield self
        finally:
            self._observing = False
            self._queries.clear()

    def _attention_mask(self, layer_idx: int, q_len: int, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Per-layer mask when this layer's length differs from layer 0's or heads keep different counts."""
        layer: PressLayer = self.layers[layer_idx]
        kv_len = layer.next_kv_length(q_len)
        if layer.valid is None and (mask is None or mask.shape[-1] == kv_len):
            return mask
        device = mask.device if mask is not None else layer.device
        visible = (
            torch.arange(kv_len, device=device)
            <= torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        )
        visible = visible[None, None]
        if layer.valid is not None:
            valid = torch.cat((layer.valid, layer.valid.new_ones(*layer.valid.shape[:2], q_len)), dim=-1)
            groups = self.adapter.num_heads // self.adapter.num_kv_heads
            visible = visible & valid.repeat_interleave(groups, dim=1)[:, :, None, :]
        if mask is None or mask.dtype == torch.bool:
            return visible
        dtype = mask.dtype
        return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(
            ~visible, torch.finfo(dtype).min
        )


def _rewrites_kept_keys(press: Press) -> bool:
    while press is not None:
        if isinstance(press, KeyRerotationPress):
            return True
        press = getattr(press, "press", None)
    return False
